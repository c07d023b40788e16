"""Promises of the processor, the recorder and the session that the mutation run (issue 13) found untested.

Each test states a promise and checks it against an independent computation (diffusers' own processor, or
the formula written out by hand on small tensors), not against the line that implements it.
"""

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from anyms_core.layout import GridLayout
from anyms_core.processor import (
    AnyMSAttnProcessor,
    DecoupledState,
    _rows_per_subject,
    attention_probabilities,
    joint_share,
    subject_affinity,
)
from anyms_core.recording import AttentionMaps, AttentionRecorder, RecordConfig, find_word_tokens
from anyms_core.session import DecoupledSession, check_other_adapter_images, check_pipeline

torch.set_num_threads(1)

HEADS, HEAD_DIM, TEXT_DIM, TOKENS, BATCH = 4, 8, 6, 3, 2  # 32 channels: SpatialNorm has 32 groups
CHANNELS = HEADS * HEAD_DIM
HEIGHT, WIDTH = 4, 6
TEXT_LEN = 5
BOXES = [[0.0, 0.0, 0.6, 0.75], [0.4, 0.25, 1.0, 1.0]]  # overlapping on the 4x6 grid
FULL = [[0.0, 0.0, 1.0, 1.0]]


def _randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        with torch.no_grad():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 + (1.0 if parameter.ndim == 1 else 0.0))


def _stock(num_tokens=(TOKENS,), scale=0.6, seed=1):
    stock = IPAdapterAttnProcessor2_0(hidden_size=CHANNELS, cross_attention_dim=TEXT_DIM, num_tokens=num_tokens, scale=scale)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in [*stock.to_k_ip, *stock.to_v_ip]:
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.5)
    return stock


def _plain_attn(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=CHANNELS, cross_attention_dim=TEXT_DIM, heads=HEADS, dim_head=HEAD_DIM).eval()


def _state(variant, boxes, order=None, scales=None, recorder=None, adapter_index=0, size=(HEIGHT, WIDTH)):
    state = DecoupledState(variant=variant, boxes=boxes, paint_order=order or list(range(len(boxes))),
                           subject_scales=scales, recorder=recorder, adapter_index=adapter_index)
    state.prepare(size)
    return state


def _call(processor, attn, hidden, text, images, **kwargs):
    with torch.no_grad():
        return processor(attn, hidden, (text, images), **kwargs)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- 1. diffusers' attention options, honoured exactly --------------------------------------------------------

def _option_layer(four_d):
    """An Attention with every option the processor forwards: mask, residual, rescale, group norm, norm_cross
    (layer norm) and, on 4-D input, a spatial norm fed by temb."""
    torch.manual_seed(3)
    attn = Attention(query_dim=CHANNELS, cross_attention_dim=TEXT_DIM, heads=HEADS, dim_head=HEAD_DIM,
                     residual_connection=True, rescale_output_factor=1.7, norm_num_groups=4,
                     cross_attention_norm="layer_norm", spatial_norm_dim=3 if four_d else None).eval()
    _randomise(attn.group_norm, 4)
    _randomise(attn.norm_cross, 5)
    if four_d:
        hidden = _randn(BATCH, CHANNELS, HEIGHT, WIDTH, seed=6)
        temb = _randn(BATCH, 3, 2, 3, seed=7)
    else:
        hidden, temb = _randn(BATCH, HEIGHT * WIDTH, CHANNELS, seed=6), None
    text = _randn(BATCH, TEXT_LEN, TEXT_DIM, seed=8)
    mask = torch.zeros(BATCH, 1, TEXT_LEN)
    mask[0, 0, 1] = mask[1, 0, 3] = mask[1, 0, 0] = -1e4  # a different token hidden in each row
    return attn, hidden, text, mask, temb


@pytest.mark.parametrize("four_d", [True, False], ids=["4d-spatial-norm", "3d"])
@pytest.mark.parametrize("variant", ["joint", "none", "anyms", "mask"])
def test_attention_options_are_honoured_exactly_as_diffusers(variant, four_d):
    attn, hidden, text, mask, temb = _option_layer(four_d)
    num_subjects = 2 if variant == "joint" else 1
    stock = _stock()
    images = _randn(BATCH, num_subjects, TOKENS, TEXT_DIM, seed=9)
    state = _state(variant, (BOXES if variant == "joint" else FULL)[:num_subjects])
    ours = _call(AnyMSAttnProcessor(stock, "layer", state), attn, hidden, text, [images], attention_mask=mask, temb=temb)
    expected = _call(stock, attn, hidden, text, [images], attention_mask=mask, temb=temb)
    assert ours.shape == hidden.shape
    assert torch.equal(ours, expected)
    # a mask per query and text token ([batch, queries, text]) as well
    per_query = torch.zeros(BATCH, HEIGHT * WIDTH, TEXT_LEN)
    per_query[:, ::3, 2] = -1e4
    per_query[1, 1::2, 4] = -1e4
    ours = _call(AnyMSAttnProcessor(stock, "layer", state), attn, hidden, text, [images], attention_mask=per_query, temb=temb)
    assert torch.equal(ours, _call(stock, attn, hidden, text, [images], attention_mask=per_query, temb=temb))
    # and each option matters here (so the equality above is not vacuous)
    without_mask = _call(AnyMSAttnProcessor(stock, "layer", state), attn, hidden, text, [images], temb=temb)
    assert not torch.allclose(without_mask, ours)


# --- 2. which row of the CFG batch is recorded ----------------------------------------------------------------

def _softmax(logits, dim):
    return torch.softmax(logits.double(), dim=dim)


def _heads(x):  # [..., tokens, C] -> [heads, tokens, d]
    return x.reshape(-1, HEADS, HEAD_DIM).transpose(0, 1).double()


def _hand_maps(attn, stock, hidden, text, images, row, variant, scales, boxes, word_tokens):
    """Every kind of map for one batch row, written out from the formulas in recording.py's docstring."""
    with torch.no_grad():
        q = _heads(attn.to_q(hidden[row]))  # [h, N, d]
        k_text = _heads(attn.to_k(text[row]))
        keys = _heads(stock.to_k_ip[0](images[row]).reshape(-1, CHANNELS))  # [h, S*T, d]
        values = _heads(stock.to_v_ip[0](images[row]).reshape(-1, CHANNELS))
    num, size = len(boxes), q.shape[1]
    scale = 1 / math.sqrt(HEAD_DIM)
    text_probs = _softmax(q @ k_text.transpose(1, 2) * scale, -1).mean(0)  # [N, text]
    logits = q @ keys.transpose(1, 2) * scale  # [h, N, S*T]
    affinity = _softmax(logits, 1).view(HEADS, size, num, TOKENS).mean(-1).mean(0) * size
    share = _softmax(logits, -1).view(HEADS, size, num, TOKENS).sum(-1).mean(0)
    layout = GridLayout.build(boxes, list(range(num)), HEIGHT, WIDTH)
    per_subject = []
    for j in range(num):
        sl = slice(j * TOKENS, (j + 1) * TOKENS)
        z = _softmax(logits[..., sl], -1) @ values[:, sl]  # [h, N, d]
        per_subject.append(scales[j] * z.transpose(0, 1).reshape(size, -1))  # [N, C]
    if variant == "none":
        contribution = torch.stack([z.norm(dim=-1) for z in per_subject], -1)
    elif variant == "mask":
        contribution = torch.stack([(z * layout.masks[j][:, None]).norm(dim=-1) for j, z in enumerate(per_subject)], -1)
    elif variant == "anyms":
        contribution = torch.zeros(size, num, dtype=torch.float64)
        for cell in range(size):
            owner = int(layout.owner[cell])
            if owner >= 0:
                contribution[cell, owner] = per_subject[owner][cell].norm()
    else:  # joint: each subject's share of the one softmax, its probabilities times its values
        probs = _softmax(logits, -1).view(HEADS, size, num, TOKENS)
        shares = torch.einsum("hnst,hstd->hnsd", probs, values.view(HEADS, num, TOKENS, HEAD_DIM))
        contribution = (scales[0] * shares).pow(2).sum(dim=(0, -1)).sqrt()
    text_maps = torch.stack([text_probs[:, idx].sum(-1) for idx in word_tokens.values()], -1)
    return {"affinity": affinity, "joint_share": share, "contribution": contribution, "text": text_maps}


@pytest.mark.parametrize("variant", ["anyms", "mask", "none", "joint"])
def test_recorded_maps_are_those_of_the_conditional_row(variant):
    attn, stock = _plain_attn(), _stock()
    batch = 4  # [uncond, uncond, cond, cond]: the first conditional sample is row 2
    hidden = _randn(batch, HEIGHT * WIDTH, CHANNELS, seed=11) * 2
    text = _randn(batch, TEXT_LEN, TEXT_DIM, seed=12)
    images = _randn(batch, 2, TOKENS, TEXT_DIM, seed=13)
    scales = [0.6, 0.6] if variant == "joint" else [0.5, 1.5]
    word_tokens = {"ab": [1, 2], "c": [4]}  # "ab" spans two tokens: its map is their sum
    config = RecordConfig(kinds=("affinity", "joint_share", "contribution"), words=("ab", "c"), policy="layer")
    recorder = AttentionRecorder(config, ["s0", "s1"], word_tokens)
    recorder.begin_step(batch, guided=True)
    assert recorder.batch_index == 2
    state = _state(variant, BOXES, scales=scales, recorder=recorder)
    processor = AnyMSAttnProcessor(stock, "down.attn2", state)
    out = _call(processor, attn, hidden, text, [images])
    maps = recorder.finish()
    # recording changes nothing in the output
    assert torch.equal(out, _call(AnyMSAttnProcessor(stock, "down.attn2", _state(variant, BOXES, scales=scales)),
                                  attn, hidden, text, [images]))
    expected = _hand_maps(attn, stock, hidden, text, images, 2, variant, scales, BOXES, word_tokens)
    other = _hand_maps(attn, stock, hidden, text, images, 0, variant, scales, BOXES, word_tokens)
    for kind in ("affinity", "joint_share", "contribution", "text"):
        got = maps.entries[(kind, 0, "down.attn2")].float()
        assert got.shape == (expected[kind].shape[1], HEIGHT, WIDTH)
        want = expected[kind].float().T.reshape(-1, HEIGHT, WIDTH)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        assert not torch.allclose(got, other[kind].float().T.reshape(-1, HEIGHT, WIDTH), atol=1e-2)
    assert maps.layer_grids == {"down.attn2": (HEIGHT, WIDTH)}


def test_begin_step_picks_the_first_conditional_row():
    recorder = AttentionRecorder(RecordConfig(), ["a"], {})
    assert recorder.step == -1 and recorder.batch_index == 0
    for batch, guided, row in [(2, True, 1), (6, True, 3), (4, False, 0), (1, True, 0), (1, False, 0)]:
        recorder.begin_step(batch, guided=guided)
        assert recorder.batch_index == row
    assert recorder.step == 4
    recorder.begin_step()
    assert recorder.batch_index == 0 and recorder.step == 5
    recorder.begin_step(4)  # not guided unless told
    assert recorder.batch_index == 0
    recorder.begin_step(guided=True)  # a batch of one by default
    assert recorder.batch_index == 0


# --- 3. aggregation policies and the grids maps are resized to -------------------------------------------------

def _recorder(policy, kinds=("affinity",), words=(), word_tokens=None, budget=None, subjects=("a", "b"), layers=None):
    config = RecordConfig(kinds=kinds, words=words, policy=policy, layers=layers,
                          **({} if budget is None else {"budget_bytes": budget}))
    return AttentionRecorder(config, list(subjects), word_tokens or {})


def _resize_ref(rows, grid, size):  # [h*w, items] -> [items, H, W], bilinear, half-pixel centres
    maps = rows.T.reshape(-1, *grid)[None].float()
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("small_first", [True, False])
@pytest.mark.parametrize("small_grid, large_grid", [((2, 3), (4, 6)), ((3, 12), (5, 24)), ((12, 3), (24, 5))])
def test_mean_policy_averages_on_the_largest_grid(small_first, small_grid, large_grid):
    small = _randn(small_grid[0] * small_grid[1], 2, seed=20)
    large = _randn(large_grid[0] * large_grid[1], 2, seed=21)
    recorder = _recorder("mean")
    recorder.begin_step()
    adds = [("up.attn2", small, small_grid), ("down.attn2", large, large_grid)]
    for layer, values, grid in (adds if small_first else adds[::-1]):
        recorder.add(layer, "affinity", values, grid)
    maps = recorder.finish()
    assert maps.grids == {"mean": large_grid} and maps.keys == ["mean"]
    expected = (large.T.reshape(2, *large_grid) + _resize_ref(small, small_grid, large_grid)) / 2
    torch.testing.assert_close(maps.entries[("affinity", 0, "mean")].float(), expected, atol=2e-3, rtol=2e-3)
    assert maps.layer_grids == {"up.attn2": small_grid, "down.attn2": large_grid}


def test_maps_handed_over_before_the_first_step_are_dropped():
    recorder = _recorder("layer")
    recorder.add("l.attn2", "affinity", torch.ones(24, 2), (4, 6))
    assert recorder.finish().entries == {} and recorder.maps.nbytes == 0


def test_resolution_and_layer_policies_key_and_average():
    a, b, c = _randn(24, 2, seed=22), _randn(24, 2, seed=23), _randn(6, 2, seed=24)
    for policy in ("resolution", "layer"):
        recorder = _recorder(policy)
        recorder.begin_step()
        recorder.add("down.0.attn2", "affinity", a, (4, 6))
        recorder.add("up.1.attn2", "affinity", b, (4, 6))
        recorder.add("mid.attn2", "affinity", c, (3, 2))
        recorder.begin_step()
        recorder.add("down.0.attn2", "affinity", b, (4, 6))
        maps = recorder.finish()
        if policy == "resolution":
            assert maps.keys == ["4x6", "3x2"] and maps.grids == {"4x6": (4, 6), "3x2": (3, 2)}
            expected = ((a + b) / 2).T.reshape(2, 4, 6)
            torch.testing.assert_close(maps.entries[("affinity", 0, "4x6")].float(), expected, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(maps.entries[("affinity", 0, "3x2")].float(), c.T.reshape(2, 3, 2), atol=2e-3, rtol=2e-3)
            assert set(maps.entries) == {("affinity", 0, "4x6"), ("affinity", 0, "3x2"), ("affinity", 1, "4x6")}
        else:
            assert maps.keys == ["down.0.attn2", "up.1.attn2", "mid.attn2"]
            torch.testing.assert_close(maps.entries[("affinity", 0, "up.1.attn2")].float(), b.T.reshape(2, 4, 6), atol=2e-3, rtol=2e-3)
        assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in maps.entries.values())
        assert maps.steps == [0, 1]


def test_maps_query_resizes_to_the_largest_selected_grid_and_averages():
    recorder = _recorder("layer")
    large, small = _randn(24, 2, seed=25), _randn(6, 2, seed=26)
    for step in range(3):
        recorder.begin_step()
        recorder.add("down.attn2", "affinity", large * (step + 1), (4, 6))
        recorder.add("up.attn2", "affinity", small * (step + 1), (2, 3))
    maps = recorder.finish()
    stored = {k: maps.entries[("affinity", 0, k)].float() for k in ("down.attn2", "up.attn2")}
    per_layer = [F.interpolate(stored[k][None], size=(4, 6), mode="bilinear", align_corners=False)[0] for k in stored]
    both = maps.maps("affinity", steps=[0])
    assert both.dtype == np.float32 and both.shape == (2, 4, 6)
    np.testing.assert_allclose(both, torch.stack(per_layer).mean(0).numpy(), atol=1e-6)
    only_up = maps.maps("affinity", layers="up", steps=0)
    assert only_up.shape == (2, 2, 3)  # default size: the largest *selected* grid
    np.testing.assert_allclose(only_up, stored["up.attn2"].numpy(), atol=1e-6)
    bigger = maps.maps("affinity", layers=["up"], steps=[0], size=(4, 6), items=["b"])
    np.testing.assert_allclose(bigger, per_layer[1][1:2].numpy(), atol=1e-6)
    assert maps.maps("affinity", resolution=2).shape == (2, 2, 3)
    assert maps.maps("affinity", resolution=(4, 6), items=[1, 0]).shape == (2, 4, 6)
    np.testing.assert_allclose(maps.maps("affinity", resolution=(4, 6), items=[1, 0], steps=[0]),
                               stored["down.attn2"].numpy()[::-1], atol=1e-6)
    per_step = maps.maps("affinity", layers="down", per_step=True)
    assert per_step.shape == (3, 2, 4, 6) and maps.averaged_steps == [0, 1, 2]
    np.testing.assert_allclose(maps.maps("affinity", layers="down"), per_step.mean(0), atol=1e-6)
    assert maps.maps("affinity", steps=slice(1, None), layers="down").shape == (2, 4, 6)
    assert maps.averaged_steps == [1, 2]
    np.testing.assert_allclose(maps.maps("affinity", steps=slice(1, None), layers="down"), per_step[1:].mean(0), atol=1e-6)
    np.testing.assert_allclose(maps.maps("affinity", layers="down", steps=[0]), stored["down.attn2"].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"Steps \[7\] were not recorded; recorded steps: \[0, 1, 2\]\.$"):
        maps.maps("affinity", steps=[1, 7])
    with pytest.raises(ValueError, match="selects none"):
        maps.maps("affinity", steps=slice(5, None))
    with pytest.raises(ValueError, match="out of range"):
        maps.maps("affinity", items=[2])
    with pytest.raises(ValueError, match="out of range"):
        maps.maps("affinity", items=[-1])
    with pytest.raises(ValueError, match="not recorded"):
        maps.maps("contribution")
    assert maps.items("affinity") == ["a", "b"] and maps.resolutions == [(4, 6), (2, 3)]


@pytest.mark.parametrize("grids", [[(16, 8), (9, 9)], [(9, 9), (8, 16)], [(9, 15), (5, 8), (3, 4)], [(5, 8), (9, 15)]])
def test_default_size_is_the_grid_with_most_cells(grids):
    """Two latent sizes in one session (policy "resolution") can leave grids of any aspect side by side."""
    recorder = _recorder("resolution")
    recorder.begin_step()
    for index, grid in enumerate(grids):
        recorder.add(f"l{index}.attn2", "affinity", torch.rand(grid[0] * grid[1], 2), grid)
    maps = recorder.finish()
    largest = max(grids, key=lambda g: g[0] * g[1])
    assert maps.maps().shape == (2, *largest)  # the default kind is affinity
    np.testing.assert_array_equal(maps.maps(), maps.maps("affinity", size=largest))
    assert maps.resolutions[0] == largest and maps.keys[0] == f"{largest[0]}x{largest[1]}"


def test_keys_sort_largest_grid_first_then_by_name():
    maps = AttentionMaps(kinds=["affinity"], subjects=["a"], words=[], policy="layer", budget_bytes=10**6)
    maps.grids = {"b": (2, 2), "a": (2, 2), "c": (4, 4), "d": (1, 1)}
    assert maps.keys == ["c", "a", "b", "d"]
    assert maps.resolutions == [(4, 4), (2, 2), (1, 1)]


# --- 4. prompt words that span several tokens ----------------------------------------------------------------

class _ByteTokenizer:
    """A tokenizer like the toy world's (one token per byte, BOS/EOS added, truncation to ``max_length``)."""

    model_max_length = 12
    bos_token_id, eos_token_id = 1000, 1001

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        ids = list(text.encode())
        if add_special_tokens:
            ids = [self.bos_token_id, *ids, self.eos_token_id]
            if truncation and max_length is not None and len(ids) > max_length:
                ids = ids[:max_length - 1] + [self.eos_token_id]
        return SimpleNamespace(input_ids=ids)


def test_words_spanning_several_tokens_find_every_occurrence():
    tokenizer = _ByteTokenizer()  # every word of n letters spans n tokens
    found = find_word_tokens(tokenizer, "a dog, dog", ["dog", "a", "g, d"])
    # positions, BOS counted: "a"=1, " "=2, "dog"=3..5, ","=6, " "=7, "dog"=8..10
    assert found == {"dog": [3, 4, 5, 8, 9, 10], "a": [1], "g, d": [5, 6, 7, 8]}
    assert list(found) == ["dog", "a", "g, d"]
    with pytest.raises(ValueError, match="not in the prompt"):
        find_word_tokens(tokenizer, "a cat", ["dog"])
    with pytest.raises(ValueError, match="not in the prompt"):
        find_word_tokens(tokenizer, "a cat", [""])
    # the prompt is truncated like the text encoder's input: a word past model_max_length is not found
    assert find_word_tokens(tokenizer, "x dog xxxxxxxxxx", ["dog"]) == {"dog": [3, 4, 5]}
    with pytest.raises(ValueError, match="not in the prompt"):
        find_word_tokens(tokenizer, "xxxxxxxxxx dog", ["dog"])
    assert find_word_tokens(tokenizer, "xxxxxx dog", ["dog"]) == {"dog": [8, 9, 10]}  # up to the last slot


def test_text_maps_sum_a_words_tokens():
    word_tokens = {"dog": [2, 3, 4], "a": [1, 6]}
    recorder = _recorder("layer", kinds=(), words=("dog", "a"), word_tokens=word_tokens)
    assert recorder.maps.words == ["dog", "a"] and recorder.kinds == ("text",)
    probs = torch.softmax(_randn(24, 8, seed=30), -1)
    recorder.begin_step()
    recorder.add("l.attn2", "text", probs, (4, 6))
    maps = recorder.finish()
    expected = torch.stack([probs[:, [2, 3, 4]].sum(-1), probs[:, [1, 6]].sum(-1)], 0).view(2, 4, 6)
    torch.testing.assert_close(maps.entries[("text", 0, "l.attn2")].float(), expected, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(maps.maps("text", items=["a"]), expected[1:].numpy(), atol=1e-3)


# --- 5. layout levels are never stale when the latent size changes ----------------------------------------

def _levels_equal(a, b):
    assert set(a) == set(b)
    for n in a:
        x, y = a[n], b[n]
        assert (x.height, x.width) == (y.height, y.width)
        for field_name in ("masks", "crop", "merge", "owner_one_hot"):
            tx, ty = getattr(x, field_name), getattr(y, field_name)
            assert tx.dtype == ty.dtype and tx.device == ty.device and torch.equal(tx, ty), (n, field_name)


def test_switching_latent_sizes_gives_the_levels_of_a_fresh_state():
    boxes, order = [[0.1, 0.0, 0.55, 0.5], [0.3, 0.35, 0.9, 1.0], [0.0, 0.6, 0.3, 0.95]], [2, 0, 1]
    sizes = [(8, 8), (9, 15), (8, 8), (5, 3), (9, 15), (1, 1)]
    state = DecoupledState(variant="anyms", boxes=boxes, paint_order=order)
    for size in sizes:
        for dtype in (torch.float32, torch.float16):
            state.prepare(size, "cpu", dtype)
            fresh = DecoupledState(variant="anyms", boxes=boxes, paint_order=order)
            fresh.prepare(size, torch.device("cpu"), dtype)
            _levels_equal(state.levels, fresh.levels)
            assert state.latent_size == size
            assert state.levels[size[0] * size[1]].masks.dtype == dtype
    state.latent_size = (9, 15)
    assert state.latent_size == (9, 15) and state.levels[9 * 15].masks.dtype == torch.float32
    assert set(state.levels) == {135, 5 * 8, 3 * 4, 2 * 2, 1}


def test_levels_live_on_the_device_and_dtype_they_were_prepared_for():
    state = DecoupledState(variant="anyms", boxes=BOXES, paint_order=[0, 1])
    state.prepare((HEIGHT, WIDTH), "meta", torch.float16)  # a device other than the CPU, no accelerator needed
    for level in state.levels.values():
        assert level.masks.device.type == level.crop.device.type == level.merge.device.type == "meta"
        assert level.owner_one_hot.device.type == "meta"
        assert level.masks.dtype == torch.float16 and level.owner_one_hot.dtype == torch.float32
        assert level.crop.dtype == level.merge.dtype == torch.long
        # the crop length (largest box's cell count) is what a compiled graph must treat as dynamic, nothing else
        assert getattr(level.crop, "_dynamo_weak_dynamic_indices", None) == {1}
    cpu_levels = dict(state.levels)
    state.prepare((HEIGHT, WIDTH))
    assert all(level.crop.device.type == "cpu" for level in state.levels.values())
    assert state.levels is not cpu_levels


def test_levels_match_the_grid_layout_of_each_unet_level():
    boxes, order = [[0.0, 0.0, 0.5, 0.6], [0.25, 0.3, 1.0, 1.0]], [1, 0]
    state = _state("anyms", boxes, order=order, size=(9, 7))
    height, width = 9, 7
    for _ in range(5):
        level = state.levels[height * width]
        layout = GridLayout.build(boxes, order, height, width)
        assert (level.height, level.width) == (height, width)
        assert torch.equal(level.masks, layout.masks)
        assert torch.equal(level.owner_one_hot, (layout.owner[:, None] == torch.arange(2)).float())
        assert level.crop.dtype == torch.long and level.crop.shape[1] >= 2
        # every cell's merge row points at a crop row holding that very cell, of its owner (or the zero row)
        rows = level.crop.shape[1]
        for cell in range(height * width):
            owner, row = int(layout.owner[cell]), int(level.merge[cell])
            if owner < 0:
                assert row == 2 * rows
            else:
                assert row // rows == owner and int(level.crop[owner, row % rows]) == cell
        height, width = -(-height // 2), -(-width // 2)


def test_one_cell_boxes_are_padded_and_still_merged_right():
    # on the 4x6 grid both boxes are single cells; the crops are padded to two rows and merge doubles
    boxes = [[0.0, 0.0, 0.1, 0.1], [0.9, 0.9, 1.0, 1.0]]
    attn, stock = _plain_attn(), _stock()
    hidden = _randn(1, HEIGHT * WIDTH, CHANNELS, seed=40)
    text = _randn(1, TEXT_LEN, TEXT_DIM, seed=41)
    images = _randn(1, 2, TOKENS, TEXT_DIM, seed=42)
    level = _state("anyms", boxes).levels[HEIGHT * WIDTH]
    assert level.crop.shape == (2, 2) and level.crop[:, 0].tolist() == [0, HEIGHT * WIDTH - 1]
    assert level.merge[0] == 0 and level.merge[-1] == 2 and level.merge[1] == 4
    anyms = _call(AnyMSAttnProcessor(stock, "l", _state("anyms", boxes)), attn, hidden, text, [images])
    mask = _call(AnyMSAttnProcessor(stock, "l", _state("mask", boxes)), attn, hidden, text, [images])
    # Not torch.equal: `anyms` runs SDPA on 2 query rows, `mask` on all 24, and on AVX-512 CPUs (measured:
    # torch 2.13 CPU) the kernel rounds a row differently with the query count (1 ulp, 6e-8 here). A wrong
    # pad or merge would put another cell's or subject's output there: differences of order 1.
    torch.testing.assert_close(anyms, mask, rtol=0, atol=1e-6)


# --- 6. a second, stock adapter; more embed rows than queries; per-subject scales --------------------------

def _two_adapter_inputs():
    attn = _plain_attn()
    stock = _stock(num_tokens=(TOKENS, 2), scale=[0.6, 0.4])
    hidden = _randn(BATCH, HEIGHT * WIDTH, CHANNELS, seed=50)
    text = _randn(BATCH, TEXT_LEN, TEXT_DIM, seed=51)
    subject = _randn(BATCH, 1, TOKENS, TEXT_DIM, seed=52)
    style = _randn(BATCH, 2, 2, TEXT_DIM, seed=53)  # two style images: one softmax over both, as diffusers does
    return attn, stock, hidden, text, subject, style


@pytest.mark.parametrize("adapter_index", [0, 1])
def test_a_second_adapter_is_added_exactly_as_diffusers_adds_it(adapter_index):
    attn, stock, hidden, text, subject, style = _two_adapter_inputs()
    if adapter_index == 1:
        stock = _stock(num_tokens=(2, TOKENS), scale=[0.4, 0.6])
    images = [subject, style] if adapter_index == 0 else [style, subject]
    expected = _call(stock, attn, hidden, text, images)
    for variant in ("none", "anyms", "mask"):
        state = _state(variant, FULL, adapter_index=adapter_index)
        assert torch.equal(_call(AnyMSAttnProcessor(stock, "l", state), attn, hidden, text, images), expected)
    only_subject = _call(AnyMSAttnProcessor(stock, "l", _state("none", FULL, adapter_index=adapter_index)),
                         attn, hidden, text, [subject if i == adapter_index else torch.zeros_like(style) for i in range(2)])
    assert not torch.allclose(only_subject, expected)  # the style adapter contributes


def test_a_second_adapter_switched_off_or_given_per_image_scales():
    attn, stock, hidden, text, subject, style = _two_adapter_inputs()
    images = [subject, style]
    processor = AnyMSAttnProcessor(stock, "l", _state("none", FULL))
    stock.scale = processor.scale = [0.6, 0.0]
    expected = _call(stock, attn, hidden, text, images)
    assert torch.equal(_call(processor, attn, hidden, text, images), expected)
    stock.scale = processor.scale = [0.6, [0.0, 0.0]]
    assert torch.equal(_call(processor, attn, hidden, text, images), expected)
    stock.scale = processor.scale = [0.6, [0.0, 0.3]]
    with pytest.raises(ValueError, match="Per-image scales"):
        _call(processor, attn, hidden, text, images)
    for scales in ([0.0, 0.4], [0.6, 1.0], [1.0, 1.0]):
        stock.scale = processor.scale = scales
        assert torch.equal(_call(processor, attn, hidden, text, images), _call(stock, attn, hidden, text, images))
    assert not torch.equal(_call(processor, attn, hidden, text, images), expected)


def test_rows_per_subject_layout():
    projected = torch.arange(4 * 2 * 3 * 1, dtype=torch.float32).view(4, 2, 3, 1)
    assert _rows_per_subject(projected, 4) is projected
    out = _rows_per_subject(projected, 2)
    assert out.shape == (2, 2, 6, 1)
    for b in range(2):
        for j in range(2):
            assert torch.equal(out[b, j], torch.cat([projected[2 * b, j], projected[2 * b + 1, j]]))
    three = _rows_per_subject(torch.arange(6 * 2 * 2 * 3.0).view(6, 2, 2, 3), 2)
    assert three.shape == (2, 2, 6, 3)
    assert torch.equal(three[1, 0], torch.arange(6 * 2 * 2 * 3.0).view(6, 2, 2, 3)[3:6, 0].reshape(6, 3))


def test_more_embed_rows_than_queries_per_subject():
    attn, stock = _plain_attn(), _stock()
    hidden = _randn(BATCH, HEIGHT * WIDTH, CHANNELS, seed=60)
    text = _randn(BATCH, TEXT_LEN, TEXT_DIM, seed=61)
    images = _randn(2 * BATCH, 2, TOKENS, TEXT_DIM, seed=62)  # the unconditional half of the image embeds kept
    # one subject: exactly diffusers
    one = images[:, :1]
    ours = _call(AnyMSAttnProcessor(stock, "l", _state("none", FULL)), attn, hidden, text, [one])
    assert torch.equal(ours, _call(stock, attn, hidden, text, [one]))
    # several: joint is diffusers' softmax over all tokens of all rows
    joint = _call(AnyMSAttnProcessor(stock, "l", _state("joint", BOXES)), attn, hidden, text, [images])
    torch.testing.assert_close(joint, _call(stock, attn, hidden, text, [images]), atol=1e-5, rtol=1e-5)
    # none: subject j attends to its own tokens of every row of its sample
    none = _call(AnyMSAttnProcessor(stock, "l", _state("none", BOXES)), attn, hidden, text, [images])
    text_only = _call(AnyMSAttnProcessor(stock, "l", _state("text", BOXES)), attn, hidden, text, [images])
    with torch.no_grad():
        expected = []
        for b in range(BATCH):
            q = _heads(attn.to_q(hidden[b]))
            total = 0
            for j in range(2):
                rows = images[2 * b:2 * b + 2, j].reshape(-1, TEXT_DIM)
                k, v = _heads(stock.to_k_ip[0](rows)), _heads(stock.to_v_ip[0](rows))
                z = _softmax(q @ k.transpose(1, 2) / math.sqrt(HEAD_DIM), -1) @ v
                total = total + 0.6 * z.transpose(0, 1).reshape(q.shape[1], -1)
            expected.append(attn.to_out[0](total.float()) - attn.to_out[0].bias)
    torch.testing.assert_close(none - text_only, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_per_subject_scales_from_set_ip_adapter_scale():
    attn, stock = _plain_attn(), _stock()
    hidden = _randn(BATCH, HEIGHT * WIDTH, CHANNELS, seed=70)
    text = _randn(BATCH, TEXT_LEN, TEXT_DIM, seed=71)
    images = _randn(BATCH, 2, TOKENS, TEXT_DIM, seed=72)
    for variant in ("anyms", "mask", "none"):
        stock.scale = [[0.3, 1.2]]  # what pipe.set_ip_adapter_scale([[0.3, 1.2]]) sets
        from_adapter = _call(AnyMSAttnProcessor(stock, "l", _state(variant, BOXES)), attn, hidden, text, [images])
        stock.scale = [1.0]
        from_session = _call(AnyMSAttnProcessor(stock, "l", _state(variant, BOXES, scales=[0.3, 1.2])), attn, hidden, text, [images])
        assert torch.equal(from_adapter, from_session)
        stock.scale = [0.8]
        single = _call(AnyMSAttnProcessor(stock, "l", _state(variant, BOXES)), attn, hidden, text, [images])
        stock.scale = [1.0]
        assert torch.equal(single, _call(AnyMSAttnProcessor(stock, "l", _state(variant, BOXES, scales=[0.8, 0.8])),
                                         attn, hidden, text, [images]))
        stock.scale = [5.0]  # the session's scales win over the adapter's
        assert torch.equal(_call(AnyMSAttnProcessor(stock, "l", _state(variant, BOXES, scales=[0.3, 1.2])), attn, hidden, text, [images]),
                           from_session)
    stock.scale = [[0.3, 1.2, 0.5]]
    with pytest.raises(ValueError, match="3 per-image scales for 2 subjects"):
        _call(AnyMSAttnProcessor(stock, "l", _state("none", BOXES)), attn, hidden, text, [images])
    stock.scale = [[0.0, 0.0]]
    off = _call(AnyMSAttnProcessor(stock, "l", _state("none", BOXES)), attn, hidden, text, [images])
    assert torch.equal(off, _call(AnyMSAttnProcessor(stock, "l", _state("text", BOXES)), attn, hidden, text, [images]))
    stock.scale = [[0.0, 0.7]]  # one subject off is not all off
    assert not torch.equal(_call(AnyMSAttnProcessor(stock, "l", _state("none", BOXES)), attn, hidden, text, [images]), off)


def _branch_inputs(batch: int, seed: int):
    """Zero hidden states, random query / two subjects' keys and values, and the anyms level of BOXES."""
    query = _randn(batch, HEADS, HEIGHT * WIDTH, HEAD_DIM, seed=seed)
    keys = _randn(batch, HEADS, 2 * TOKENS, HEAD_DIM, seed=seed + 1)
    values = _randn(batch, HEADS, 2 * TOKENS, HEAD_DIM, seed=seed + 2)
    hidden = torch.zeros(batch, HEIGHT * WIDTH, CHANNELS)
    return hidden, query, keys, values, _state("anyms", BOXES).levels[HEIGHT * WIDTH]


def test_image_branches_skip_the_contribution_without_a_row_and_joint_takes_one_scale():
    from anyms_core.processor import IMAGE_BRANCHES

    hidden, query, keys, values, level = _branch_inputs(2, seed=85)
    for variant in ("anyms", "mask", "none", "joint"):
        out, contribution = IMAGE_BRANCHES[variant](hidden, query, keys, values, [0.7, 0.7], level, None)
        assert contribution is None and out.shape == hidden.shape
        _, contribution = IMAGE_BRANCHES[variant](hidden, query, keys, values, [0.7, 0.7], level, 1)
        assert contribution.shape == (HEIGHT * WIDTH, 2) and contribution.dtype == torch.float32
    with pytest.raises(ValueError, match="one scale"):
        IMAGE_BRANCHES["joint"](hidden, query, keys, values, [0.7, 1.0], level, None)
    # half precision in, half precision out; the contribution norms are float32 whatever the layer's dtype
    low = [t.to(torch.bfloat16) for t in (hidden, query, keys, values)]
    for variant in ("anyms", "mask", "none", "joint"):
        out, contribution = IMAGE_BRANCHES[variant](*low, [0.7, 0.7], level, 0)
        assert out.dtype == torch.bfloat16 and contribution.dtype == torch.float32
        if variant == "anyms":  # the owner's norm, accumulated in float32 (not rounded to bfloat16 first)
            exact = out[0].float().norm(dim=-1)
            torch.testing.assert_close(contribution.sum(-1), exact, atol=1e-6, rtol=1e-6)
        if variant != "joint":
            out, other_scales = IMAGE_BRANCHES[variant](*low, [0.7, 1.3], level, 0)
            assert out.dtype == torch.bfloat16 and other_scales.dtype == torch.float32
    # and every tensor they build is made on the inputs' device ("meta": a device other than the CPU)
    meta_level = DecoupledState(variant="anyms", boxes=BOXES, paint_order=[0, 1])
    meta_level.prepare((HEIGHT, WIDTH), "meta")
    meta = [t.to("meta") for t in (hidden, query, keys, values)]
    for variant in ("anyms", "mask", "none", "joint"):
        for scales in ([0.7, 0.7], [0.7, 1.3]):
            if variant == "joint" and scales[0] != scales[1]:
                continue
            out, contribution = IMAGE_BRANCHES[variant](*meta, scales, meta_level.levels[HEIGHT * WIDTH], 1)
            assert out.device.type == contribution.device.type == "meta"
    # joint with a single subject is diffusers' single-image adapter
    one = _state("joint", FULL).levels[HEIGHT * WIDTH]
    joint, _ = IMAGE_BRANCHES["joint"](hidden, query, keys[:, :, :TOKENS], values[:, :, :TOKENS], [0.7], one, 0)
    none, _ = IMAGE_BRANCHES["none"](hidden, query, keys[:, :, :TOKENS], values[:, :, :TOKENS], [0.7], one, 0)
    assert torch.equal(joint, none)


def test_image_branches_scale_linearly():
    from anyms_core.processor import IMAGE_BRANCHES

    hidden, query, keys, values, level = _branch_inputs(1, seed=91)
    for variant in ("anyms", "mask", "none", "joint"):
        unit, _ = IMAGE_BRANCHES[variant](hidden, query, keys, values, [1.0, 1.0], level, None)
        assert unit.abs().amax() > 0.1
        for scale in (2.0, 0.5, 3.0):
            scaled, _ = IMAGE_BRANCHES[variant](hidden, query, keys, values, [scale, scale], level, None)
            torch.testing.assert_close(scaled, scale * unit, atol=1e-6, rtol=1e-6)


def test_sequence_of_floats():
    from anyms_core.processor import sequence_of_floats

    assert sequence_of_floats(None, 3, "x") is None
    assert sequence_of_floats(0.5, 3, "x") == [0.5, 0.5, 0.5]
    assert sequence_of_floats(2, 2, "x") == [2.0, 2.0] and isinstance(sequence_of_floats(2, 2, "x")[0], float)
    assert sequence_of_floats((1, 0.25), 2, "x") == [1.0, 0.25]
    with pytest.raises(ValueError, match="ip_adapter_scale has 1 values for 2 subjects"):
        sequence_of_floats([0.5], 2, "ip_adapter_scale")


def test_mask_variant_in_a_lower_precision_than_its_level():
    """The levels were built for float32 latents but the layer runs in bfloat16 (or the other way round)."""
    attn, stock = _plain_attn(), _stock()
    hidden = _randn(BATCH, HEIGHT * WIDTH, CHANNELS, seed=88)
    text = _randn(BATCH, TEXT_LEN, TEXT_DIM, seed=89)
    images = _randn(BATCH, 2, TOKENS, TEXT_DIM, seed=90)
    low = lambda t: t.to(torch.bfloat16)  # noqa: E731
    attn_low, stock_low = attn.to(torch.bfloat16), stock.to(torch.bfloat16)
    state32 = _state("mask", BOXES)
    state16 = DecoupledState(variant="mask", boxes=BOXES, paint_order=[0, 1])
    state16.prepare((HEIGHT, WIDTH), dtype=torch.bfloat16)
    out32 = _call(AnyMSAttnProcessor(stock_low, "l", state32), attn_low, low(hidden), low(text), [low(images)])
    out16 = _call(AnyMSAttnProcessor(stock_low, "l", state16), attn_low, low(hidden), low(text), [low(images)])
    assert out32.dtype == torch.bfloat16 and torch.equal(out32, out16)


def test_processor_shares_the_adapter_and_rejects_wrong_inputs():
    attn, stock = _plain_attn(), _stock()
    processor = AnyMSAttnProcessor(stock, "layer.x", _state("anyms", BOXES))
    assert processor.to_k_ip is stock.to_k_ip and processor.to_v_ip is stock.to_v_ip and processor.scale is stock.scale
    assert (processor.hidden_size, processor.cross_attention_dim, processor.num_tokens) == (CHANNELS, TEXT_DIM, (TOKENS,))
    assert processor.layer_name == "layer.x"
    hidden = _randn(1, HEIGHT * WIDTH, CHANNELS, seed=80)
    text = _randn(1, TEXT_LEN, TEXT_DIM, seed=81)
    images = _randn(1, 2, TOKENS, TEXT_DIM, seed=82)
    with pytest.raises(ValueError, match="layer.x: AnyMS expects encoder_hidden_states"):
        processor(attn, hidden, text)
    with pytest.raises(ValueError, match="ip_adapter_masks"):
        processor(attn, hidden, (text, [images]), ip_adapter_masks=torch.ones(1, 2, HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="for 2 IP-Adapters, 1 are loaded"):
        processor(attn, hidden, (text, [images, images]))
    with pytest.raises(RuntimeError, match="has 7 positions"):
        processor(attn, hidden[:, :7], (text, [images]))
    unprepared = DecoupledState(variant="anyms", boxes=BOXES, paint_order=[0, 1])
    assert unprepared.latent_size is None and unprepared.levels == {}
    with pytest.raises(RuntimeError, match="no UNet level of the None latent"):
        AnyMSAttnProcessor(stock, "layer.x", unprepared)(attn, hidden, (text, [images]))


# --- exact definitions of the recorded quantities ------------------------------------------------------------

def test_subject_affinity_and_joint_share_definitions():
    heads, size, num, tokens, dim = 2, 5, 2, 3, 4
    q = _randn(heads, size, dim, seed=90) * 2
    k = _randn(heads, num * tokens, dim, seed=91) * 2
    logits = torch.einsum("hnd,hkd->hnk", q.double(), k.double()) / math.sqrt(dim)
    affinity = torch.zeros(size, num, dtype=torch.float64)
    share = torch.zeros(size, num, dtype=torch.float64)
    for h in range(heads):
        over_space = torch.exp(logits[h]) / torch.exp(logits[h]).sum(0, keepdim=True)
        over_keys = torch.exp(logits[h]) / torch.exp(logits[h]).sum(1, keepdim=True)
        for j in range(num):
            cols = slice(j * tokens, (j + 1) * tokens)
            affinity[:, j] += over_space[:, cols].mean(1) * size / heads
            share[:, j] += over_keys[:, cols].sum(1) / heads
    got_affinity, got_share = subject_affinity(q, k, num), joint_share(q, k, num)
    assert got_affinity.dtype == got_share.dtype == torch.float32 and got_affinity.shape == (size, num)
    torch.testing.assert_close(got_affinity.double(), affinity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_share.double(), share, atol=1e-6, rtol=1e-5)
    probs = attention_probabilities(q.to(torch.bfloat16), k.to(torch.bfloat16))
    assert probs.dtype == torch.float32 and probs.shape == (heads, size, num * tokens)
    torch.testing.assert_close(attention_probabilities(q, k).double(), torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)
    assert subject_affinity(q.half(), k.half(), num).dtype == torch.float32


# --- the recorder's config, selection and budget --------------------------------------------------------------

def test_record_config_normalises_its_arguments():
    config = RecordConfig(kinds=["affinity"], words=["dog"], layers="up_blocks", budget_bytes=1024.0)
    assert config.kinds == ("affinity", "text") and config.words == ("dog",)
    assert config.layers == ("up_blocks",) and config.budget_bytes == 1024 and isinstance(config.budget_bytes, int)
    assert RecordConfig(layers=["a", "b"]).layers == ("a", "b") and RecordConfig().layers is None
    assert RecordConfig().kinds == ("affinity", "contribution") and RecordConfig().policy == "resolution"
    assert RecordConfig().budget_bytes == 64 * 2**20
    assert RecordConfig(kinds=("text",), words=("a",)).kinds == ("text",)
    with pytest.raises(ValueError, match="needs `words`"):
        RecordConfig(kinds=("affinity", "text"))
    with pytest.raises(ValueError, match="Unknown attention kind"):
        RecordConfig(kinds=("affinity", "attention"))
    with pytest.raises(ValueError, match="Unknown aggregation policy"):
        RecordConfig(policy="layers")
    with pytest.raises(ValueError, match="record= takes"):
        RecordConfig.from_arg(3)
    with pytest.raises(ValueError, match="budget_bytes"):
        RecordConfig(budget_bytes=0)
    assert RecordConfig(budget_bytes=1).budget_bytes == 1
    assert RecordConfig.from_arg(None) is None and RecordConfig.from_arg(False) is None
    assert RecordConfig.from_arg(True) == RecordConfig()
    given = RecordConfig(policy="mean")
    assert RecordConfig.from_arg(given) is given
    assert RecordConfig.from_arg("joint_share").kinds == ("joint_share",)
    assert RecordConfig.from_arg(["affinity", "text"][:1]).kinds == ("affinity",)
    assert RecordConfig.from_arg(("contribution",)).kinds == ("contribution",)
    assert RecordConfig.from_arg({"policy": "layer", "kinds": ["affinity"]}) == RecordConfig(kinds=("affinity",), policy="layer")


def test_recorder_wants_its_layers_only():
    assert _recorder("layer").wants("anything")
    recorder = _recorder("layer", layers=("up_blocks.1", "mid"))
    assert recorder.wants("unet.up_blocks.1.attn2") and recorder.wants("mid_block.attn2")
    assert not recorder.wants("down_blocks.0.attn2")
    recorder = _recorder("layer", kinds=("joint_share",))
    assert recorder.kinds == ("joint_share",) and recorder.subject_names == ["a", "b"]
    assert recorder.maps.kinds == ["joint_share"] and recorder.maps.policy == "layer"
    assert recorder.maps.budget_bytes == 64 * 2**20 and recorder.maps.subjects == ["a", "b"]


def test_unwanted_layers_record_nothing_and_compute_as_usual():
    attn, stock = _plain_attn(), _stock()
    hidden = _randn(2, HEIGHT * WIDTH, CHANNELS, seed=95)
    text = _randn(2, TEXT_LEN, TEXT_DIM, seed=96)
    images = _randn(2, 2, TOKENS, TEXT_DIM, seed=97)
    recorder = _recorder("layer", kinds=("affinity", "contribution", "joint_share"), layers=("up",))
    recorder.begin_step(2, guided=True)
    out = _call(AnyMSAttnProcessor(stock, "down.attn2", _state("anyms", BOXES, recorder=recorder)), attn, hidden, text, [images])
    assert recorder.finish().entries == {}
    assert torch.equal(out, _call(AnyMSAttnProcessor(stock, "down.attn2", _state("anyms", BOXES)), attn, hidden, text, [images]))


def test_budget_keeps_a_step_that_fits_exactly_and_warns_once():
    step_bytes = 2 * 4 * 6 * 2  # two subjects, 4x6, fp16
    recorder = _recorder("layer", budget=2 * step_bytes)
    for step in range(3):
        recorder.begin_step()
        recorder.add("l.attn2", "affinity", torch.full((24, 2), float(step)), (4, 6))
    with pytest.warns(UserWarning, match=r"dropped steps \[2\] whole"):
        maps = recorder.finish()
    assert maps.steps == [0, 1] and maps.nbytes == 2 * step_bytes and maps.dropped == [("affinity", 2, "l.attn2")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert recorder.finish() is maps  # warned once
    assert maps.dropped_steps == [2]
    with pytest.raises(ValueError, match=r"Steps \[2\] were not recorded; recorded steps: \[0, 1\] \(dropped by the budget: \[2\]\)"):
        maps.maps("affinity", steps=[2])


def test_maps_round_trip_through_saved_tensors():
    recorder = _recorder("resolution", kinds=("affinity",), words=("dog",), word_tokens={"dog": [1, 2]}, budget=400)
    for step in range(3):
        recorder.begin_step()
        recorder.add("l.attn2", "affinity", _randn(24, 2, seed=step), (4, 6))
        recorder.add("m.attn2", "affinity", _randn(6, 2, seed=step + 9), (2, 3))
        recorder.add("l.attn2", "text", torch.softmax(_randn(24, 4, seed=step), -1), (4, 6))
    with pytest.warns(UserWarning):
        maps = recorder.finish()
    assert maps.dropped_steps == [2]
    tensors = maps.to_tensors()
    assert set(tensors) == {f"attention/{k}/{s}/{key}" for k, s, key in maps.entries}
    loaded = AttentionMaps.from_saved(maps.metadata(), {**tensors, "image": torch.zeros(1)})
    for name in ("kinds", "subjects", "words", "policy", "budget_bytes", "grids", "layer_grids", "dropped", "nbytes"):
        assert getattr(loaded, name) == getattr(maps, name), name
    assert loaded.grids == {"4x6": (4, 6), "2x3": (2, 3)} and loaded.dropped[0] == tuple(maps.dropped[0])
    assert set(loaded.entries) == set(maps.entries)
    assert all(torch.equal(loaded.entries[k], maps.entries[k]) for k in maps.entries)
    for kind in ("affinity", "text"):
        np.testing.assert_array_equal(loaded.maps(kind, per_step=True), maps.maps(kind, per_step=True))
    meta = maps.metadata()
    assert meta["kinds"] == ["affinity", "text"] and meta["words"] == ["dog"] and meta["policy"] == "resolution"
    assert meta["budget_bytes"] == 400 and meta["nbytes"] == maps.nbytes and meta["grids"]["2x3"] == [2, 3]
    assert meta["layer_grids"] == {"l.attn2": [4, 6], "m.attn2": [2, 3]} and meta["subjects"] == ["a", "b"]
    assert [tuple(d) for d in meta["dropped"]] == maps.dropped


# --- the session's checks ------------------------------------------------------------------------------------

def _fake_pipe(processors, hid_proj=True):
    unet = SimpleNamespace(attn_processors=processors, encoder_hid_proj=object() if hid_proj else None)
    return SimpleNamespace(unet=unet)


def test_check_pipeline_finds_the_adapter_layers_or_says_what_is_missing():
    one, two = _stock(), _stock(num_tokens=(TOKENS, 2), scale=[1.0, 1.0])
    processors = {"down.attn1.processor": AttnProcessor2_0(), "down.attn2.processor": one, "up.attn2.processor": _stock()}
    stock, count = check_pipeline(_fake_pipe(processors))
    assert count == 1 and stock == {"down.attn2": one, "up.attn2": processors["up.attn2.processor"]}
    stock, count = check_pipeline(_fake_pipe({"a.attn2.processor": two}), adapter_index=1)
    assert count == 2 and stock == {"a.attn2": two}
    with pytest.raises(ValueError, match="different numbers of IP-Adapters"):
        check_pipeline(_fake_pipe({"a.attn2.processor": one, "b.attn2.processor": two}))
    for bad in (1, -1, 1.0, None):
        with pytest.raises(ValueError, match="adapter_index"):
            check_pipeline(_fake_pipe({"a.attn2.processor": one}), adapter_index=bad)
    replaced = {"a.attn1.processor": AttnProcessor2_0(), "a.attn2.processor": AttnProcessor2_0()}
    with pytest.raises(ValueError, match="were replaced by AttnProcessor2_0 "):
        check_pipeline(_fake_pipe(replaced))
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        check_pipeline(_fake_pipe(replaced, hid_proj=False))
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):  # a UNet with no encoder_hid_proj attribute at all
        check_pipeline(SimpleNamespace(unet=SimpleNamespace(attn_processors=replaced)))
    with pytest.raises(ValueError, match="no diffusers UNet"):
        check_pipeline(object())
    with pytest.raises(ValueError, match="no diffusers UNet"):
        check_pipeline(SimpleNamespace(unet=None))
    with pytest.raises(ValueError, match="no diffusers UNet"):
        check_pipeline(SimpleNamespace(unet=SimpleNamespace()))


def test_other_adapter_images_and_the_pipelines_image_list():
    assert check_other_adapter_images(None, 0, 1) == {}
    assert check_other_adapter_images({0: "style"}, 1, 2) == {0: "style"}
    with pytest.raises(ValueError, match=r"keys \[0, 2\]; got keys \[0\]"):
        check_other_adapter_images({0: "style"}, 1, 3)
    with pytest.raises(ValueError, match="other_adapter_images"):
        check_other_adapter_images({1: "x"}, 1, 2)
    subjects = [SimpleNamespace(image="cat"), SimpleNamespace(image="dog")]
    state = DecoupledState(variant="mask", boxes=BOXES, paint_order=[0, 1], adapter_index=1)
    session = DecoupledSession(subjects, state, None, {0: "style", 2: ["s1", "s2"]})
    assert session.ip_adapter_image == ["style", ["cat", "dog"], ["s1", "s2"]]
    assert session.variant == "mask" and session.attention is None and session.subjects is subjects
    assert session.state is state and session.recorder is None
    assert DecoupledSession(subjects, DecoupledState("anyms", BOXES, [0, 1]), None).ip_adapter_image == [["cat", "dog"]]
    recorder = _recorder("layer")
    recorded = DecoupledSession(subjects, DecoupledState("anyms", BOXES, [0, 1], recorder=recorder), recorder)
    assert recorded.recorder is recorder and recorded.attention is recorder.maps
