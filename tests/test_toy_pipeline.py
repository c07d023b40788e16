"""ToyWorldPipeline: diffusers' IP-Adapter path, offline save/load, seeded determinism, pixel folding."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from anyms_core.toy import pipeline as toy_pipeline
from anyms_core.toy import world


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A randomly initialised pipeline written in the shipped layout (so the test does not need training)."""
    pipe = toy_pipeline.ToyWorldPipeline(**toy_pipeline.build_components(seed=0))
    state = toy_pipeline.initial_ip_adapter_state_dict(pipe.unet, pipe.image_encoder.config.projection_dim)
    pipe.load_ip_adapter(state, subfolder=None, weight_name=None)
    directory = tmp_path_factory.mktemp("toy_weights")
    toy_pipeline.save_toy_pipeline(pipe, directory)
    return directory


def _weights_dirs(random_weights):
    dirs = [random_weights]
    if (toy_pipeline.DEFAULT_WEIGHTS_DIR / "unet" / "config.json").exists():
        dirs.append(None)  # the shipped weights
    return dirs


def test_fold_is_an_exact_rotation_of_pixel_space():
    x = torch.randn(2, 3, 32, 64)
    latents = toy_pipeline.fold(x)
    assert latents.shape == (2, 48, 8, 16)
    assert torch.allclose(toy_pipeline.unfold(latents), x, atol=1e-5)
    assert torch.allclose(latents.norm(), x.norm(), rtol=1e-5)  # Gaussian noise stays white
    flat = toy_pipeline.fold(torch.full((1, 3, 8, 8), 0.5))
    assert torch.allclose(flat.view(1, 3, 16, 2, 2)[:, :, 1:], torch.zeros(1, 3, 15, 2, 2), atol=1e-6)  # flat = LL band only


def test_loads_offline_with_stock_ip_adapter_processors(random_weights):
    for directory in _weights_dirs(random_weights):
        pipe = toy_pipeline.load_toy_pipeline(directory)
        processors = pipe.unet.attn_processors
        cross = {k: v for k, v in processors.items() if k.endswith("attn2.processor")}
        assert cross and all(type(p) is IPAdapterAttnProcessor2_0 for p in cross.values())
        assert all(type(p) is AttnProcessor2_0 for k, p in processors.items() if k.endswith("attn1.processor"))
        assert pipe.unet.encoder_hid_proj is not None and pipe.unet.config.encoder_hid_dim_type == "ip_image_proj"


def test_generation_is_deterministic_and_multi_image_reaches_processors(random_weights):
    pipe = toy_pipeline.load_toy_pipeline(random_weights)
    refs = [world.sprite_reference("red circle"), world.sprite_reference("cyan cross")]
    seen = []
    processor = next(p for k, p in pipe.unet.attn_processors.items() if k.endswith("attn2.processor"))
    original = type(processor).__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        seen.append((encoder_hidden_states[0].shape, encoder_hidden_states[1][0].shape))
        return original(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    kwargs = dict(prompt=world.DEFAULT_PROMPTS["grass"], ip_adapter_image=[refs], num_inference_steps=3, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    type(processor).__call__ = spy
    try:
        b = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    finally:
        type(processor).__call__ = original
    c = pipe(generator=torch.Generator().manual_seed(2), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    text, ip = seen[0]
    assert text[0] == 2 and ip[:2] == (2, 2) and ip[2] == 4  # [uncond; cond], 2 images, 4 tokens each


def test_preview_from_latents_and_call_signature(random_weights):
    pipe = toy_pipeline.load_toy_pipeline(random_weights)
    preview = pipe.preview_from_latents(torch.zeros(1, 48, 16, 16))
    assert preview.shape == (1, 3, 64, 64) and torch.allclose(preview, torch.full_like(preview, 0.5))
    steps = []
    out = pipe(
        "a photo at night", ip_adapter_image=[[world.sprite_reference("lime square")]], num_inference_steps=2,
        guidance_scale=1.0, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {}, output_type="pil",
    )
    assert steps == [0, 1] and out.images[0].size == (64, 64)
    with pytest.raises(ValueError, match="multiples"):
        pipe("a photo on sand", height=30, ip_adapter_image=[[world.sprite_reference("red square")]])
