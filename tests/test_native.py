"""AnyMS where a diffusers user works: several IP-Adapters, the dynamic-CFG callback recipe, and what the
user changes on the pipeline inside a session (kept on exit, or refused loudly, never silently undone)."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from anyms_core import AnyMS, Subject, decoupled
from anyms_core.processor import AnyMSAttnProcessor, DecoupledState
from anyms_core.testing import (
    random_ip_adapter_state_dict,
    random_reference_image,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

FAMILIES = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
CALL = dict(num_inference_steps=3, height=64, width=64, output_type="np")
FULL = [0.0, 0.0, 1.0, 1.0]
TWO_BOXES = [[0.0, 0.0, 0.6, 0.6], [0.4, 0.4, 1.0, 1.0]]


def generate(pipe, images, **kwargs):
    return pipe("a photo", ip_adapter_image=images, generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs}).images


def ip_processors(pipe):
    return [p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]


# --- Several IP-Adapters: the named one is decoupled, the others stay stock ------------------------------

def two_adapter_pipeline(family):
    """A tiny pipeline with two adapters loaded: 0 a base adapter, 1 a "plus" one (say, a style adapter)."""
    pipe = FAMILIES[family](ip_adapter=None)
    pipe.load_ip_adapter(
        [random_ip_adapter_state_dict(pipe.unet, seed=1), random_ip_adapter_state_dict(pipe.unet, plus=True, seed=2)],
        subfolder=["", ""], weight_name=["", ""], image_encoder_folder=None,
    )
    pipe.set_ip_adapter_scale([0.8, 0.6])
    return pipe


@pytest.fixture(scope="module", params=list(FAMILIES))
def two_adapters(request):
    return two_adapter_pipeline(request.param)


@pytest.mark.parametrize("adapter_index", [0, 1])
def test_one_full_image_subject_on_either_adapter_equals_stock(two_adapters, adapter_index):
    pipe, reference, style = two_adapters, random_reference_image(0), random_reference_image(9)
    other = 1 - adapter_index
    stock_images = [None, None]
    stock_images[adapter_index], stock_images[other] = [reference], style
    stock = generate(pipe, stock_images)
    for variant in ("anyms", "mask", "none", "joint"):
        with decoupled(pipe, [Subject(reference, FULL)], variant=variant, adapter_index=adapter_index,
                       other_adapter_images={other: style}) as session:
            assert session.ip_adapter_image == stock_images
            ours = generate(pipe, session.ip_adapter_image)
        assert np.array_equal(ours, stock), variant
    run = AnyMS(pipe).generate("a photo", [Subject(reference, FULL)], adapter_index=adapter_index,
                               other_adapter_images={other: style}, num_inference_steps=3, height=64, width=64,
                               seed=0)
    stock_pil = generate(pipe, stock_images, output_type="pil")[0]
    assert np.array_equal(np.asarray(run.image), np.asarray(stock_pil))


def test_the_other_adapter_is_added_as_in_stock_whatever_the_boxes(two_adapters):
    """With the decoupled adapter's subjects switched off (the ``text`` variant, or scale 0), the image is
    stock diffusers' with only the other adapter on, for any layout: its contribution ignores the boxes."""
    pipe, style = two_adapters, random_reference_image(9)
    images = [random_reference_image(0), random_reference_image(1)]
    pipe.set_ip_adapter_scale([0.0, 0.6])
    try:
        stock = generate(pipe, [images, style])
    finally:
        pipe.set_ip_adapter_scale([0.8, 0.6])
    for boxes in (TWO_BOXES, [[0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.3, 1.0]]):
        subjects = [Subject(image, box) for image, box in zip(images, boxes)]
        with decoupled(pipe, subjects, variant="text", other_adapter_images={1: style}) as session:
            assert np.array_equal(generate(pipe, session.ip_adapter_image), stock)
        with decoupled(pipe, subjects, ip_adapter_scale=0.0, other_adapter_images={1: style}) as session:
            assert np.array_equal(generate(pipe, session.ip_adapter_image), stock)


def test_processor_adds_the_other_adapter_independently_of_the_layout():
    """Processor level, subjects on: the other adapter adds what diffusers adds, for two different layouts."""
    torch.manual_seed(0)
    heads, head_dim, text_dim, tokens, height, width = 4, 8, 24, 4, 12, 10
    attn = Attention(query_dim=heads * head_dim, cross_attention_dim=text_dim, heads=heads, dim_head=head_dim).eval()
    stock = IPAdapterAttnProcessor2_0(hidden_size=heads * head_dim, cross_attention_dim=text_dim,
                                      num_tokens=(tokens, tokens), scale=[0.7, 0.5])
    for linear in [*stock.to_k_ip, *stock.to_v_ip]:
        torch.nn.init.normal_(linear.weight, std=0.3)
    hidden, text = torch.randn(2, height * width, heads * head_dim), torch.randn(2, 7, text_dim)
    subjects, style = torch.randn(2, 2, tokens, text_dim), torch.randn(2, 1, tokens, text_dim)

    def anyms(boxes, style_scale):
        stock.scale[1] = style_scale
        state = DecoupledState(variant="anyms", boxes=boxes, paint_order=[0, 1])
        state.prepare((height, width))
        with torch.no_grad():
            return AnyMSAttnProcessor(stock, "layer", state)(attn, hidden, (text, [subjects, style]))

    def stock_call(scales):
        stock.scale[:] = scales
        with torch.no_grad():
            return stock(attn, hidden, (text, [subjects[:, :1], style]))

    style_only = stock_call([0.0, 0.5]) - stock_call([0.0, 0.0])
    for boxes in (TWO_BOXES, [[0.5, 0.0, 1.0, 0.5], [0.0, 0.5, 0.3, 1.0]]):
        added = anyms(boxes, 0.5) - anyms(boxes, 0.0)
        torch.testing.assert_close(added, style_only, rtol=1e-4, atol=1e-5)
    stock.scale[:] = [0.7, 0.5]


def test_several_adapters_need_a_valid_index_and_the_others_images(two_adapters):
    subject = [Subject(random_reference_image(0), FULL)]
    with pytest.raises(ValueError, match=r"pass other_adapter_images .* keys \[1\]"):
        with decoupled(two_adapters, subject):
            pass
    with pytest.raises(ValueError, match=r"adapter_index=2, but 2 IP-Adapter\(s\) are loaded"):
        with decoupled(two_adapters, subject, adapter_index=2, other_adapter_images={0: None, 1: None}):
            pass
    with pytest.raises(ValueError, match="keys \\[0\\]; got keys \\[0, 1\\]"):
        with decoupled(two_adapters, subject, adapter_index=1, other_adapter_images={0: None, 1: None}):
            pass


# --- diffusers' dynamic-CFG recipe: the callback drops the unconditional half mid-run ---------------------

def dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
    """The recipe of diffusers' docs ("dynamic classifier-free guidance"), at the second step."""
    if step_index == 1:
        for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
            if name in callback_kwargs:
                callback_kwargs[name] = callback_kwargs[name].chunk(2)[-1]
        pipe._guidance_scale = 0.0
    return callback_kwargs


def dynamic_cfg_kwargs(family):
    inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"] if family == "sdxl" else ["prompt_embeds"]
    return dict(callback_on_step_end=dynamic_cfg, callback_on_step_end_tensor_inputs=inputs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dynamic_cfg_callback_equals_stock_and_records_the_conditional_row(family):
    pipe = FAMILIES[family](ip_adapter="plus")
    reference, kwargs = random_reference_image(0), dynamic_cfg_kwargs(family)
    stock = generate(pipe, [[reference]], num_inference_steps=4, **kwargs)
    assert not np.array_equal(stock, generate(pipe, [[reference]], num_inference_steps=4))  # the callback acts
    with decoupled(pipe, [Subject(reference, FULL)], record=["affinity"]) as session:
        rows = []
        begin_step = session.recorder.begin_step
        session.recorder.begin_step = lambda *a, **k: (begin_step(*a, **k), rows.append(session.recorder.batch_index))
        ours = generate(pipe, session.ip_adapter_image, num_inference_steps=4, **kwargs)
    assert np.array_equal(ours, stock)
    assert rows == [1, 1, 0, 0]  # [uncond; cond] -> the conditional row, then the only row
    assert session.attention.maps("affinity", per_step=True).shape[:2] == (4, 1)

    subjects = [Subject(random_reference_image(i), box) for i, box in enumerate(TWO_BOXES)]
    run = AnyMS(pipe).generate("a photo", subjects, num_inference_steps=4, height=64, width=64, guidance_scale=6.0,
                               **kwargs)
    assert run.config.guidance_scale == 6.0  # what was asked for, not the 0 the callback left behind
    assert run.attention.maps("affinity", per_step=True).shape[:2] == (4, 2)


# --- What the user changes inside a session ---------------------------------------------------------------

def subjects(count=2):
    return [Subject(random_reference_image(i), box) for i, box in enumerate(TWO_BOXES[:count])]


def test_set_ip_adapter_scale_inside_a_session_is_kept():
    pipe = tiny_sd15_pipeline()
    reference = random_reference_image(0)
    with decoupled(pipe, subjects()) as session:
        pipe.set_ip_adapter_scale(0.3)
        generate(pipe, session.ip_adapter_image)
    assert all(p.scale == [0.3] for p in ip_processors(pipe))
    after = generate(pipe, [[reference]])
    fresh = tiny_sd15_pipeline()
    fresh.set_ip_adapter_scale(0.3)
    assert np.array_equal(after, generate(fresh, [[reference]]))


def test_unload_ip_adapter_inside_a_session_stays_unloaded():
    pipe = tiny_sd15_pipeline()
    with decoupled(pipe, subjects()):
        pipe.unload_ip_adapter()
        text_only = generate(pipe, None)  # the session steps aside: nothing left to decouple
    assert not ip_processors(pipe) and pipe.unet.encoder_hid_proj is None
    assert not any(isinstance(p, AnyMSAttnProcessor) for p in pipe.unet.attn_processors.values())
    plain = tiny_sd15_pipeline(ip_adapter=None)
    assert np.array_equal(text_only, generate(plain, None))
    assert np.array_equal(generate(pipe, None), text_only)
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        with decoupled(pipe, subjects()):
            pass


def test_attention_slicing_inside_a_session_is_refused_at_the_call_and_kept_on_exit():
    pipe = tiny_sd15_pipeline()
    with pytest.raises(RuntimeError, match="replaced inside the `with decoupled"):
        with decoupled(pipe, subjects()) as session:
            pipe.enable_attention_slicing()
            generate(pipe, session.ip_adapter_image)
    processors = pipe.unet.attn_processors.values()
    assert {type(p).__name__ for p in processors} == {"SlicedAttnProcessor"}  # kept, as the user asked
    assert not pipe.unet._forward_pre_hooks


@pytest.mark.parametrize("change", ["slicing", "fused"])
def test_slicing_or_fused_qkv_before_a_session_get_an_accurate_error(change):
    pipe = tiny_sdxl_pipeline()
    reference = random_reference_image(0)
    if change == "slicing":
        pipe.enable_attention_slicing()
    else:
        pipe.fuse_qkv_projections()
    with pytest.raises(Exception):  # stock diffusers cannot run the adapter with these processors either
        generate(pipe, [[reference]])
    with pytest.raises(ValueError, match="An IP-Adapter is loaded, but its cross-attention processors were replaced"):
        with decoupled(pipe, subjects()):
            pass


def test_fused_qkv_inside_a_session_is_refused_at_the_call_and_unfuse_brings_the_stock_adapter_back():
    pipe = tiny_sdxl_pipeline()
    reference = random_reference_image(0)
    before = generate(pipe, [[reference]])
    with decoupled(pipe, subjects()) as session:
        pipe.fuse_qkv_projections()
        with pytest.raises(RuntimeError, match="replaced inside the `with decoupled"):
            generate(pipe, session.ip_adapter_image)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    pipe.unfuse_qkv_projections()  # gives back the stock processors, not the session's
    assert not any(isinstance(p, AnyMSAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert ip_processors(pipe)
    assert np.array_equal(generate(pipe, [[reference]]), before)


def test_embeds_with_more_rows_than_queries_are_attended_per_subject_as_diffusers_does_per_image():
    """After the dynamic-CFG callback the image embeds keep [negative; positive] rows while the queries have
    one: diffusers (with ip_adapter_masks, one attention per image) lets the sample attend to both rows'
    tokens of each image; the ``mask`` variant does the same per subject."""
    from anyms_core.layout import GridLayout

    torch.manual_seed(0)
    heads, head_dim, text_dim, tokens, height, width = 4, 8, 24, 4, 12, 10
    attn = Attention(query_dim=heads * head_dim, cross_attention_dim=text_dim, heads=heads, dim_head=head_dim).eval()
    stock = IPAdapterAttnProcessor2_0(hidden_size=heads * head_dim, cross_attention_dim=text_dim,
                                      num_tokens=(tokens,), scale=0.7)
    for linear in [*stock.to_k_ip, *stock.to_v_ip]:
        torch.nn.init.normal_(linear.weight, std=0.3)
    hidden, text = torch.randn(1, height * width, heads * head_dim), torch.randn(1, 7, text_dim)
    images = torch.randn(2, 2, tokens, text_dim)  # two rows (negative, positive) for one sample
    state = DecoupledState(variant="mask", boxes=TWO_BOXES, paint_order=[0, 1])
    state.prepare((height, width))
    masks = GridLayout.build(TWO_BOXES, [0, 1], height, width).masks.view(1, 2, height, width)
    with torch.no_grad():
        ours = AnyMSAttnProcessor(stock, "layer", state)(attn, hidden, (text, [images]))
        expected = stock(attn, hidden, (text, [images]), ip_adapter_masks=[masks])
    assert torch.equal(ours, expected)
