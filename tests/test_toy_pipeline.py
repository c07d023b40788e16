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


def test_shift_fold_rolls_the_pixel_image_and_undoes_exactly():
    x = torch.randn(2, 3, 32, 64)
    latents = toy_pipeline.fold(x)
    for shift in toy_pipeline.FOLD_SHIFTS:
        moved = toy_pipeline.shift_fold(latents, shift)
        assert torch.allclose(toy_pipeline.unfold(moved), torch.roll(x, shift, dims=(-2, -1)), atol=1e-5)
        assert torch.allclose(toy_pipeline.shift_fold(moved, (-shift[0], -shift[1])), latents, atol=1e-5)
    assert toy_pipeline.shift_fold(latents, (0, 0)) is latents
    shifts = np.array(toy_pipeline.FOLD_SHIFTS)
    assert np.abs(shifts).max() <= 2  # half a fold block at most
    # with the unshifted first half, every row and column phase of the 4-px grid has a step
    assert {0} | {d % toy_pipeline.FOLD for d in shifts[:, 0]} == {0} | {d % toy_pipeline.FOLD for d in shifts[:, 1]} == {0, 1, 2, 3}


def test_unshift_mean_inverts_each_shift_and_keeps_the_guidance_groups():
    uncond, cond = torch.randn(1, 48, 8, 8), torch.randn(1, 48, 8, 8)
    shifts = [(1, -1), (-1, 1)]
    pred = torch.cat([toy_pipeline.shift_fold(g, s) for g in (uncond, cond) for s in shifts])  # [uncond x 2; cond x 2]
    out = toy_pipeline._unshift_mean(pred, shifts, groups=2)
    assert out.shape == (2, 48, 8, 8)
    assert torch.allclose(out[:1], uncond, atol=1e-5) and torch.allclose(out[1:], cond, atol=1e-5)
    a, b = torch.zeros(1, 2), torch.ones(1, 2)
    assert toy_pipeline._repeat_groups(torch.cat([a, b]), 2, 3).tolist() == [[0, 0]] * 3 + [[1, 1]] * 3


def test_fold_shifts_move_the_unet_input_and_keep_the_batch_layout(random_weights):
    pipe = toy_pipeline.load_toy_pipeline(random_weights)
    assert pipe.default_fold_shifts is False  # save_toy_pipeline wrote the pipeline's own default
    refs = [world.sprite_reference("red circle"), world.sprite_reference("cyan cross")]
    seen = []

    def before_unet(module, args, kwargs):
        seen.append((args[0].clone(), kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]["image_embeds"][0]))

    kwargs = dict(prompt=world.DEFAULT_PROMPTS["grass"], ip_adapter_image=[refs], num_inference_steps=3, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    handle = pipe.unet.register_forward_pre_hook(before_unet, with_kwargs=True)
    try:
        shifted = pipe(generator=torch.Generator().manual_seed(1), fold_shifts=True, **kwargs).images
    finally:
        handle.remove()
    again = pipe(generator=torch.Generator().manual_seed(1), fold_shifts=True, **kwargs).images
    assert np.array_equal(shifted, again) and not np.array_equal(plain, shifted)
    assert [s[0].shape[0] for s in seen] == [2, 2, 4]  # the last step: two shifts in one call
    first, _, _ = seen[0]
    assert torch.equal(first[0], first[1])  # step 0 (the first half) is not shifted: [uncond; cond] of the same latents
    last, text, image_embeds = seen[-1]
    # [uncond at shift a, uncond at shift b, cond at a, cond at b]: the same latents, moved half a block apart
    dy, dx = toy_pipeline.FOLD_SHIFTS[0]  # the last step's
    back = [toy_pipeline.shift_fold(last[i : i + 1], (-dy, -dx)) for i in (0, 2)]
    assert torch.allclose(back[0], back[1], atol=1e-5)
    assert torch.allclose(toy_pipeline.shift_fold(back[0], (dy + (-2 if dy > 0 else 2), dx + (-2 if dx > 0 else 2))), last[1:2], atol=1e-5)
    assert torch.equal(text[0], text[1]) and torch.equal(text[2], text[3]) and not torch.equal(text[1], text[2])
    assert image_embeds.shape[:2] == (4, 2) and torch.equal(image_embeds[2], image_embeds[3])


@pytest.mark.skipif(not (toy_pipeline.DEFAULT_WEIGHTS_DIR / "unet" / "config.json").exists(), reason="no shipped weights")
def test_fold_shifts_under_anyms_record_every_step_and_previews_are_rolled_back():
    from anyms_core import AnyMS, Subject

    pipe = toy_pipeline.load_toy_pipeline()
    pipe.default_fold_shifts = True
    subjects = [Subject(world.sprite_reference("red circle"), [0.1, 0.1, 0.5, 0.6]),
                Subject(world.sprite_reference("cyan square"), [0.5, 0.3, 0.9, 0.9])]
    run = AnyMS(pipe).generate(world.DEFAULT_PROMPTS["grass"], subjects, num_inference_steps=3, seed=3)
    assert pipe.fold_shift == (0, 0)
    assert run.num_steps == 3 and len(run.previews) == 3 and run.timings["unet_calls"] == 3
    assert run.attention.steps == [0, 1, 2]
    # The last step's x0 is the image; its preview, made in the UNet's rolled frame and rolled back, lines up with
    # it better than at any other offset (without the roll-back it would sit at FOLD_SHIFTS[0])
    image = np.asarray(run.image, dtype=np.float32)
    last = run.previews[-1].astype(np.float32)
    errors = {(a, b): np.abs(np.roll(last, (a, b), axis=(0, 1)) - image).mean() for a in range(-2, 3) for b in range(-2, 3)}
    assert min(errors, key=errors.get) == (0, 0)


def test_tuning_the_sampling_defaults_keeps_the_fold_shift_choice(random_weights, tmp_path):
    import json
    import shutil

    from anyms_core.toy.evaluate import tune_sampling

    folder = tmp_path / "weights"
    shutil.copytree(random_weights, folder)
    sampling = json.loads((folder / "sampling.json").read_text())
    sampling.update(fold_shifts=True, fold_shifts_chosen_on="a validation A/B")
    (folder / "sampling.json").write_text(json.dumps(sampling))
    chosen = tune_sampling(folder, [1.0], [3.0], [2], n_cases=1)
    saved = json.loads((folder / "sampling.json").read_text())
    # (compared as JSON: identity is NaN when random weights place nothing, and NaN != NaN)
    assert json.dumps(saved, sort_keys=True) == json.dumps(chosen, sort_keys=True)
    assert saved["num_inference_steps"] == 2 and len(saved["trials"]) == 1
    assert saved["fold_shifts"] is True and saved["fold_shifts_chosen_on"] == "a validation A/B"
    assert toy_pipeline.load_toy_pipeline(folder).default_fold_shifts is True


def test_fold_shifts_keep_each_image_of_a_batch_its_own(random_weights):
    pipe = toy_pipeline.load_toy_pipeline(random_weights)
    refs = [world.sprite_reference("red circle"), world.sprite_reference("cyan cross")]
    latents = torch.randn(2, toy_pipeline.LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(4))
    kwargs = dict(prompt=world.DEFAULT_PROMPTS["grass"], ip_adapter_image=[refs], num_inference_steps=3,
                  output_type="np", fold_shifts=True)
    both = pipe(latents=latents, num_images_per_prompt=2, **kwargs).images
    alone = [pipe(latents=latents[i : i + 1], **kwargs).images[0] for i in range(2)]
    assert not np.allclose(both[0], both[1], atol=1e-2)
    for i in range(2):
        np.testing.assert_allclose(both[i], alone[i], atol=1e-4)


def test_the_tuning_rule_keeps_none_a_picture_unless_no_trial_can():
    from anyms_core.toy.evaluate import choose_trial

    def trial(scale, guidance, placed, identity, none_fidelity, background=1.0):
        return {"ip_adapter_scale": scale, "guidance_scale": guidance, "num_inference_steps": 8, "placed": placed,
                "identity": identity, "background": background, "none_fidelity_2": none_fidelity}

    strong = trial(1.5, 4.0, 0.81, 0.34, 0.76)  # the best mean, but `none` turns to noise
    kept = trial(1.5, 3.0, 0.80, 0.33, 0.81)
    assert choose_trial([strong, kept]) is kept
    assert choose_trial([strong, kept], min_none_fidelity=0.7) is strong
    assert choose_trial([strong, trial(1.0, 3.0, 0.6, 0.3, 0.79)]) is strong  # no trial meets it: dropped
    assert choose_trial([trial(1.5, 3.0, 0.9, 0.4, 0.9, background=0.5), kept]) is kept  # backgrounds first
