"""Processor-level oracles: diffusers' own IPAdapterAttnProcessor2_0 and exact relations between variants."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from anyms_core.layout import GridLayout
from anyms_core.processor import AnyMSAttnProcessor, DecoupledState

HEADS, HEAD_DIM, TEXT_DIM, TOKENS, BATCH = 4, 8, 24, 4, 2
HEIGHT, WIDTH = 12, 10
BOXES = [[0.0, 0.0, 0.6, 0.5], [0.3, 0.25, 1.0, 1.0], [0.05, 0.6, 0.35, 0.95]]


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    channels = HEADS * HEAD_DIM
    attn = Attention(query_dim=channels, cross_attention_dim=TEXT_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()
    stock = IPAdapterAttnProcessor2_0(hidden_size=channels, cross_attention_dim=TEXT_DIM, num_tokens=(TOKENS,), scale=0.7)
    for linear in [*stock.to_k_ip, *stock.to_v_ip]:
        torch.nn.init.normal_(linear.weight, std=0.3)
    hidden = torch.randn(BATCH, HEIGHT * WIDTH, channels)
    text = torch.randn(BATCH, 7, TEXT_DIM)
    images = torch.randn(BATCH, len(BOXES), TOKENS, TEXT_DIM)
    return attn, stock, hidden, text, images


def run(layer, variant, num_subjects=len(BOXES), order=None, scales=None):
    attn, stock, hidden, text, images = layer
    state = DecoupledState(variant=variant, boxes=BOXES[:num_subjects], paint_order=order or list(range(num_subjects)),
                           subject_scales=scales)
    state.latent_size = (HEIGHT, WIDTH)
    with torch.no_grad():
        return AnyMSAttnProcessor(stock, "layer", state)(attn, hidden, (text, [images[:, :num_subjects]]))


def stock_output(layer, num_subjects, masks=None):
    attn, stock, hidden, text, images = layer
    with torch.no_grad():
        return stock(attn, hidden, (text, [images[:, :num_subjects]]), ip_adapter_masks=masks)


def as_grid(output):
    return output.view(BATCH, HEIGHT, WIDTH, -1)


def test_none_with_one_subject_equals_stock(layer):
    assert torch.equal(run(layer, "none", 1), stock_output(layer, 1))


def test_joint_equals_stock_with_several_images(layer):
    assert torch.equal(run(layer, "joint"), stock_output(layer, len(BOXES)))


def test_mask_equals_stock_with_hard_masks_at_layer_resolution(layer):
    masks = GridLayout.build(BOXES, [0, 1, 2], HEIGHT, WIDTH).masks.view(1, len(BOXES), HEIGHT, WIDTH)
    assert torch.equal(run(layer, "mask"), stock_output(layer, len(BOXES), masks=[masks]))


def test_anyms_equals_mask_outside_overlaps_and_owner_inside(layer):
    grid = GridLayout.build(BOXES, [0, 1, 2], HEIGHT, WIDTH)
    coverage = grid.masks.sum(0).view(HEIGHT, WIDTH)
    owner = grid.owner.view(HEIGHT, WIDTH)
    anyms, mask, text = as_grid(run(layer, "anyms")), as_grid(run(layer, "mask")), as_grid(run(layer, "text"))
    single = coverage == 1
    assert torch.equal(anyms[:, single], mask[:, single])
    assert torch.equal(anyms[:, coverage == 0], text[:, coverage == 0])
    overlap = coverage > 1
    assert overlap.any()
    assert not torch.allclose(anyms[:, overlap], mask[:, overlap])  # priority vs sum differ there
    for subject in range(len(BOXES)):
        # the owner's full output is what "mask" gives with only that subject's scale switched on
        alone = [0.0] * len(BOXES)
        alone[subject] = 0.7
        owned = overlap & (owner == subject)
        if owned.any():
            assert torch.equal(anyms[:, owned], as_grid(run(layer, "mask", scales=alone))[:, owned])


def test_anyms_priority_changes_only_overlaps(layer):
    forward, backward = as_grid(run(layer, "anyms")), as_grid(run(layer, "anyms", order=[2, 1, 0]))
    coverage = GridLayout.build(BOXES, [0, 1, 2], HEIGHT, WIDTH).masks.sum(0).view(HEIGHT, WIDTH)
    assert torch.equal(forward[:, coverage <= 1], backward[:, coverage <= 1])
    assert not torch.equal(forward[:, coverage > 1], backward[:, coverage > 1])


def test_anyms_computes_only_box_rows(layer, monkeypatch):
    """Crop-and-merge attends with the boxes' queries only (padded to the largest box), not with all of them."""
    import anyms_core.processor as processor

    seen = []
    original = processor.F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append(tuple(query.shape))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(processor.F, "scaled_dot_product_attention", spy)
    run(layer, "anyms")
    grid = GridLayout.build(BOXES, [0, 1, 2], HEIGHT, WIDTH)
    largest_box = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in grid.cells)
    assert seen[0][2] == HEIGHT * WIDTH  # the text attention sees every query
    assert seen[1:] == [(BATCH, HEADS * len(BOXES), largest_box, HEAD_DIM)]  # one call, box rows only
    assert largest_box < HEIGHT * WIDTH


def test_per_subject_scales(layer):
    zero_first = as_grid(run(layer, "none", 2, scales=[0.0, 0.7]))
    only_second = as_grid(run(layer, "mask", 2, scales=[0.0, 0.7]))
    # none with subject 0 switched off == stock with only subject 1
    attn, stock, hidden, text, images = layer
    with torch.no_grad():
        expected = stock(attn, hidden, (text, [images[:, 1:2]]))
    assert torch.equal(zero_first.view(BATCH, HEIGHT * WIDTH, -1), expected)
    assert not torch.equal(zero_first, only_second)


def test_wrong_number_of_images_is_a_clear_error(layer):
    attn, stock, hidden, text, images = layer
    state = DecoupledState(variant="anyms", boxes=BOXES, paint_order=[0, 1, 2])
    state.latent_size = (HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="reference images for 3 subjects"):
        AnyMSAttnProcessor(stock, "layer", state)(attn, hidden, (text, [images[:, :2]]))


def test_joint_rejects_per_subject_scales(layer):
    with pytest.raises(ValueError, match="one scale"):
        run(layer, "joint", 2, scales=[0.5, 1.0])


def test_anyms_per_subject_scales_match_mask_outside_overlaps(layer):
    scales = [0.3, 1.0, 2.0]
    coverage = GridLayout.build(BOXES, [0, 1, 2], HEIGHT, WIDTH).masks.sum(0).view(HEIGHT, WIDTH)
    anyms = as_grid(run(layer, "anyms", scales=scales))
    mask = as_grid(run(layer, "mask", scales=scales))
    assert torch.equal(anyms[:, coverage == 1], mask[:, coverage == 1])
    assert not torch.equal(anyms, as_grid(run(layer, "anyms")))


def test_each_variant_is_one_named_function_chosen_once():
    import anyms_core
    from anyms_core import processor, variants

    expected = {"anyms": processor.crop_and_merge, "mask": processor.masked_sum, "none": processor.global_sum,
                "joint": processor.joint_softmax, "text": None}
    for variant in variants.VARIANTS:
        assert DecoupledState(variant=variant, boxes=BOXES, paint_order=[0, 1, 2]).image_branch is expected[variant]
    assert anyms_core.VARIANTS is variants.VARIANTS is processor.VARIANTS
    for bad in ("crop", "ANYMS", None, 3):
        with pytest.raises(ValueError, match="Unknown AnyMS variant"):
            DecoupledState(variant=bad, boxes=BOXES, paint_order=[0, 1, 2])


def test_layout_tensors_are_built_once_per_latent_size():
    state = DecoupledState(variant="anyms", boxes=BOXES, paint_order=[0, 1, 2])
    state.latent_size = (HEIGHT, WIDTH)
    level = state.levels[HEIGHT * WIDTH]
    assert set(state.levels) == {120, 30, 9, 4, 1}  # 12x10, 6x5, 3x3, 2x2, 1x1
    state.prepare((HEIGHT, WIDTH))
    assert state.levels[HEIGHT * WIDTH] is level
    assert level.crop.shape[1] >= 2 and level.merge.shape == (HEIGHT * WIDTH,)
    one_cell = state.levels[1]  # every box covers the single cell: crops padded to two rows
    assert one_cell.crop.shape == (3, 2) and one_cell.merge.tolist() == [2 * 2]  # subject 2 owns it, row 0 of its crop
