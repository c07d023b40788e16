"""Whole-pipeline tests on tiny SDXL / SD1.5 models with random weights."""

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from anyms_core import AnyMS, Subject, decoupled
from anyms_core.processor import AnyMSAttnProcessor
from anyms_core.testing import random_reference_image as reference_image

CALL = dict(num_inference_steps=3, height=64, width=64, output_type="np")


def subjects(count=2):
    boxes = [[0.0, 0.0, 0.6, 0.6], [0.4, 0.4, 1.0, 1.0], [0.1, 0.55, 0.45, 0.95], [0.6, 0.0, 1.0, 0.35], [0.3, 0.3, 0.7, 0.7]]
    return [Subject(reference_image(i), boxes[i], name=f"s{i}") for i in range(count)]


def generate(pipe, images, seed=0, **kwargs):
    return pipe("a photo", ip_adapter_image=images, generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


def processor_types(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


def test_none_with_one_subject_equals_stock_pipeline(tiny_sdxl):
    subject = subjects(1)
    stock = generate(tiny_sdxl, [[subject[0].image]])
    with decoupled(tiny_sdxl, subject, variant="none") as session:
        ours = generate(tiny_sdxl, session.ip_adapter_image)
    assert np.array_equal(stock, ours)


def test_joint_equals_stock_pipeline_with_several_images(tiny_sdxl):
    subject = subjects(3)
    stock = generate(tiny_sdxl, [[s.image for s in subject]])
    with decoupled(tiny_sdxl, subject, variant="joint") as session:
        ours = generate(tiny_sdxl, session.ip_adapter_image)
    assert np.array_equal(stock, ours)


@pytest.mark.parametrize("variant", ["anyms", "mask", "none", "joint", "text"])
def test_variants_run_and_are_deterministic(tiny_sdxl, variant):
    with decoupled(tiny_sdxl, subjects(3), variant=variant) as session:
        first = generate(tiny_sdxl, session.ip_adapter_image)
        second = generate(tiny_sdxl, session.ip_adapter_image)
    assert np.array_equal(first, second)


def test_variants_differ_where_they_should(tiny_sdxl):
    images = {}
    for variant in ("anyms", "mask", "none", "text"):
        with decoupled(tiny_sdxl, subjects(2), variant=variant) as session:
            images[variant] = generate(tiny_sdxl, session.ip_adapter_image)
    assert not np.array_equal(images["anyms"], images["text"])
    assert not np.array_equal(images["anyms"], images["mask"])  # the boxes overlap
    assert not np.array_equal(images["mask"], images["none"])


def test_processors_restored_after_exit_and_after_exception(tiny_sdxl):
    before = dict(tiny_sdxl.unet.attn_processors)
    with decoupled(tiny_sdxl, subjects(2)):
        assert AnyMSAttnProcessor in processor_types(tiny_sdxl)
    assert tiny_sdxl.unet.attn_processors == before
    with pytest.raises(RuntimeError, match="boom"):
        with decoupled(tiny_sdxl, subjects(2)):
            raise RuntimeError("boom")
    assert tiny_sdxl.unet.attn_processors == before
    with pytest.raises(ValueError):
        with decoupled(tiny_sdxl, subjects(2)) as session:
            generate(tiny_sdxl, [[session.subjects[0].image]])  # one image for two subjects
    assert tiny_sdxl.unet.attn_processors == before
    assert not tiny_sdxl.unet._forward_pre_hooks


def test_set_ip_adapter_scale_and_unload_keep_working():
    from anyms_core.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    with decoupled(pipe, subjects(2)) as session:
        pipe.set_ip_adapter_scale(0.0)
        switched_off = generate(pipe, session.ip_adapter_image)
        pipe.set_ip_adapter_scale(1.0)
        switched_on = generate(pipe, session.ip_adapter_image)
    with decoupled(pipe, subjects(2), variant="text") as session:
        text_only = generate(pipe, session.ip_adapter_image)
    assert np.array_equal(switched_off, text_only)
    assert not np.array_equal(switched_on, text_only)
    assert all(p.scale == [1.0] for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0))
    pipe.unload_ip_adapter()
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        with decoupled(pipe, subjects(1)):
            pass


@pytest.mark.parametrize("adapter", ["base", "plus"])
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_pipelines_and_adapters(family, adapter):
    from anyms_core.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipe = (tiny_sdxl_pipeline if family == "sdxl" else tiny_sd15_pipeline)(ip_adapter=adapter)
    tokens = 4 if adapter == "base" else 16
    run = AnyMS(pipe).generate("a photo", subjects(2), num_inference_steps=2, height=64, width=64)
    assert run.image.size == (64, 64)
    affinity = run.attention.maps("affinity")
    np.testing.assert_allclose(affinity.mean(axis=(1, 2)), 1.0, rtol=0.02)  # 1 = uniform over positions
    # "plus" adapters give 16 tokens per subject: the projection output says so
    with decoupled(pipe, subjects(2)) as session:
        embeds = pipe.prepare_ip_adapter_image_embeds(session.ip_adapter_image, None, "cpu", 1, True)
        projected = pipe.unet.encoder_hid_proj(embeds)
    assert projected[0].shape[1:3] == (2, tokens)


def test_batches_and_guidance_off(tiny_sdxl):
    with decoupled(tiny_sdxl, subjects(2), record=True) as session:
        batch = generate(tiny_sdxl, session.ip_adapter_image, num_images_per_prompt=2)
    assert batch.shape[0] == 2 and session.recorder.batch_index == 2
    with decoupled(tiny_sdxl, subjects(2), record=True) as session:
        single = generate(tiny_sdxl, session.ip_adapter_image, guidance_scale=1.0)
    assert single.shape[0] == 1 and session.recorder.batch_index == 0
    assert session.attention.maps("affinity").shape[0] == 2


def transformer_grids(pipe):
    """The real (height, width) of every cross-attention layer's input, seen by forward pre-hooks."""
    grids, handles = {}, []
    for name, module in pipe.unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: grids.__setitem__(name, tuple(args[0].shape[-2:]))))
    return grids, handles


@pytest.mark.parametrize("latent", [(8, 8), (9, 15), (114, 143), (145, 112)])
def test_box_grids_match_real_feature_maps(tiny_sdxl, latent):
    """64x64, 72x120, 912x1144 and 1156x896 images give these SDXL latents (odd sizes exercise ceil)."""
    grids, handles = transformer_grids(tiny_sdxl)
    unet = tiny_sdxl.unet
    with decoupled(tiny_sdxl, subjects(2), record={"policy": "layer"}) as session:
        try:
            with torch.no_grad():
                image_embeds = torch.randn(1, 2, 32)  # pooled CLIP image embeddings of two subjects
                unet(torch.randn(1, 4, *latent), 10, encoder_hidden_states=torch.randn(1, 7, unet.config.cross_attention_dim),
                     added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6), "image_embeds": [image_embeds]})
        finally:
            for handle in handles:
                handle.remove()
    recorded = session.attention.layer_grids
    assert recorded
    for layer, grid in recorded.items():
        block = layer.split(".transformer_blocks")[0]
        assert grids[block] == grid
        level = round(math.log2(latent[0] / grid[0])) if grid[0] != latent[0] else 0
        assert grid == (math.ceil(latent[0] / 2**level), math.ceil(latent[1] / 2**level))


def test_pipeline_sizes_that_are_not_square(tiny_sdxl):
    run = AnyMS(tiny_sdxl).generate("a photo", subjects(2), num_inference_steps=2, height=72, width=120)
    assert run.image.size == (120, 72)
    assert run.attention.maps("affinity").shape == (2, 36, 60)


def test_same_seed_same_image_and_other_seed_differs(tiny_sdxl):
    anyms = AnyMS(tiny_sdxl)
    a = anyms.generate("a photo", subjects(2), seed=3, num_inference_steps=2, height=64, width=64, record=None)
    b = anyms.generate("a photo", subjects(2), seed=3, num_inference_steps=2, height=64, width=64, record=None)
    c = anyms.generate("a photo", subjects(2), seed=4, num_inference_steps=2, height=64, width=64, record=None)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.attention is None


def test_bad_session_inputs(tiny_sdxl):
    with pytest.raises(ValueError, match="Unknown AnyMS variant"):
        with decoupled(tiny_sdxl, subjects(1), variant="crop"):
            pass
    with pytest.raises(ValueError, match="at least one subject"):
        with decoupled(tiny_sdxl, []):
            pass
    with pytest.raises(ValueError, match="has 1 values for 2 subjects"):
        with decoupled(tiny_sdxl, subjects(2), ip_adapter_scale=[0.5]):
            pass
    with pytest.raises(ValueError, match="no diffusers UNet"):
        with decoupled(object(), subjects(1)):
            pass
    from anyms_core.testing import tiny_sd15_pipeline

    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        with decoupled(tiny_sd15_pipeline(ip_adapter=None), subjects(1)):
            pass


def test_second_session_on_one_pipeline_is_refused_and_the_first_restores(tiny_sdxl):
    before = dict(tiny_sdxl.unet.attn_processors)
    plain = generate(tiny_sdxl, [[s.image for s in subjects(2)]])
    with decoupled(tiny_sdxl, subjects(2)) as session:
        installed = dict(tiny_sdxl.unet.attn_processors)
        with pytest.raises(RuntimeError, match="already has an AnyMS session open"):
            with decoupled(tiny_sdxl, subjects(2), variant="mask"):
                pass
        assert tiny_sdxl.unet.attn_processors == installed  # the refused session touched nothing
        generate(tiny_sdxl, session.ip_adapter_image)
    assert tiny_sdxl.unet.attn_processors == before and not tiny_sdxl.unet._forward_pre_hooks
    assert np.array_equal(generate(tiny_sdxl, [[s.image for s in subjects(2)]]), plain)
    with decoupled(tiny_sdxl, subjects(2)):  # and a session can be opened again afterwards
        pass


def test_a_second_thread_is_refused_while_a_session_is_open(tiny_sdxl):
    import threading

    before = dict(tiny_sdxl.unet.attn_processors)
    plain = generate(tiny_sdxl, [[s.image for s in subjects(2)]])
    entered, release, results = threading.Event(), threading.Event(), {}

    def first():
        with decoupled(tiny_sdxl, subjects(2)) as session:
            entered.set()
            release.wait(timeout=60)
            results["first"] = generate(tiny_sdxl, session.ip_adapter_image)

    def second():
        entered.wait(timeout=60)
        try:
            with decoupled(tiny_sdxl, subjects(2), variant="mask"):
                results["second"] = "ran"
        except RuntimeError as error:
            results["second"] = error
        finally:
            release.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(results["second"], RuntimeError)
    assert "already has an AnyMS session open" in str(results["second"])
    with decoupled(tiny_sdxl, subjects(2)) as session:
        assert np.array_equal(results["first"], generate(tiny_sdxl, session.ip_adapter_image))  # the first was undisturbed
    assert tiny_sdxl.unet.attn_processors == before and not tiny_sdxl.unet._forward_pre_hooks
    assert np.array_equal(generate(tiny_sdxl, [[s.image for s in subjects(2)]]), plain)


def test_each_session_records_its_own_steps_from_zero(tiny_sdxl):
    for _ in range(2):
        with decoupled(tiny_sdxl, subjects(2), record=True) as session:
            generate(tiny_sdxl, session.ip_adapter_image)
        assert session.attention.steps == [0, 1, 2]
