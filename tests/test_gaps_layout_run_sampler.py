"""Promises of layout, run, sampler and the toy metrics that the rest of the suite left untested.

Found by mutation testing (issue 13): each test states a promise and checks it exactly on tiny,
hand-made inputs (boxes on cell edges, hand-computed x0 previews, images with known blobs ...).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anyms_core import layout as layout_module
from anyms_core import run as run_module
from anyms_core import sampler as sampler_module
from anyms_core.config import PRIORITY_RULES, RunConfig, SubjectConfig
from anyms_core.layout import (
    GridLayout, Subject, box_to_cells, image_digest, level_grid, load_reference_image, paint_order, round_half_up,
    subject_names, validate_subjects,
)
from anyms_core.recording import AttentionMaps
from anyms_core.run import Run, sibling_folder
from anyms_core.sampler import (
    AnyMS, _describe, _preview_rgb, _progress_bar, _StepObserver, check_pipeline_kwargs, describe_pipeline_kwargs,
    predicted_clean_sample,
)
from anyms_core.toy import metrics, world

torch.set_num_threads(1)


def solid(rgb=(255, 255, 255), size=(4, 4)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# =============================================================================================
# layout: rasterisation of boxes
# =============================================================================================
def test_round_half_up_rounds_every_half_towards_plus_infinity():
    assert [round_half_up(v) for v in (-1.5, -0.5, 0.49999, 0.5, 1.5, 2.5, 2.4999, 3.0)] == [-1, 0, 0, 1, 2, 3, 2, 3]
    assert all(type(round_half_up(v)) is int for v in (0.5, 2.0))


@pytest.mark.parametrize("box, grid, cells", [
    # edges exactly on cell boundaries: exactly the cells inside
    ([0.25, 0.5, 0.75, 1.0], (4, 4), (2, 4, 1, 3)),
    ([0.0, 0.0, 1.0, 1.0], (3, 5), (0, 3, 0, 5)),
    ([0.5, 0.0, 1.0, 0.5], (2, 8), (0, 1, 4, 8)),  # rows from y (height 2), columns from x (width 8)
    # edges half-way between boundaries round half up, at both ends (banker's rounding would give 2 for 2.5)
    ([0.125, 0.125, 0.375, 0.375], (4, 4), (1, 2, 1, 2)),
    ([0.625, 0.625, 0.875, 0.875], (4, 4), (3, 4, 3, 4)),
    ([0.375, 0.125, 0.625, 0.875], (4, 4), (1, 4, 2, 3)),
    # just under / over a half
    ([0.12, 0.13, 0.38, 0.37], (4, 4), (1, 1 + 1, 0, 2)),
    # tiny boxes keep one cell: at the start, in the middle (both edges round to the same cell), at the far edge
    ([0.0, 0.0, 0.01, 0.01], (4, 4), (0, 1, 0, 1)),
    ([0.3, 0.3, 0.32, 0.32], (4, 4), (1, 2, 1, 2)),
    ([0.99, 0.99, 1.0, 1.0], (4, 4), (3, 4, 3, 4)),
    ([0.9, 0.0, 1.0, 0.05], (2, 3), (0, 1, 2, 3)),
    # touching the borders
    ([0.0, 0.6, 0.4, 1.0], (5, 5), (3, 5, 0, 2)),
])
def test_box_to_cells_exact(box, grid, cells):
    assert box_to_cells(box, *grid) == cells


def test_box_to_cells_on_a_1x1_grid_is_the_one_cell():
    for box in ([0, 0, 1, 1], [0.9, 0.9, 1, 1], [0, 0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6]):
        assert box_to_cells(box, 1, 1) == (0, 1, 0, 1)


def test_grid_layout_build_is_the_exact_rasterisation():
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 1.0], [0.9, 0.9, 1.0, 1.0]]
    layout = GridLayout.build(boxes, [2, 0, 1], 4, 4)
    assert (layout.height, layout.width) == (4, 4)
    assert layout.cells == [(0, 2, 0, 2), (1, 4, 1, 3), (3, 4, 3, 4)]
    assert layout.paint_order == [2, 0, 1] and isinstance(layout.paint_order, list)
    expected_masks = np.zeros((3, 4, 4), dtype=np.float32)
    expected_masks[0, 0:2, 0:2] = 1
    expected_masks[1, 1:4, 1:3] = 1
    expected_masks[2, 3, 3] = 1
    assert layout.masks.shape == (3, 16) and layout.masks.dtype == torch.float32
    assert np.array_equal(layout.masks.numpy(), expected_masks.reshape(3, 16))
    owner = np.array([
        [0, 0, -1, -1],
        [0, 1, 1, -1],
        [-1, 1, 1, -1],
        [-1, 1, 1, 2],
    ])
    assert layout.owner.dtype == torch.long and layout.owner.shape == (16,)
    assert np.array_equal(layout.owner.numpy(), owner.flatten())
    # another order: the last painted owns the overlap
    other = GridLayout.build(boxes, [1, 0, 2], 4, 4)
    assert other.owner.view(4, 4)[1, 1] == 0 and other.owner.view(4, 4)[3, 3] == 2


def test_grid_layout_device_views():
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 1.0], [0.9, 0.9, 1.0, 1.0]]
    layout = GridLayout.build(boxes, [2, 0, 1], 4, 4)
    cpu = torch.device("cpu")
    masks = layout.masks_on(cpu, torch.float16)
    assert masks.dtype == torch.float16 and torch.equal(masks.float(), layout.masks)
    assert layout.masks_on(cpu, torch.float16) is masks  # cached
    assert layout.masks_on(cpu, torch.float64).dtype == torch.float64
    one_hot = layout.owner_one_hot_on(cpu)
    assert one_hot.dtype == torch.float32 and one_hot.shape == (16, 3)
    expected = np.zeros((16, 3), dtype=np.float32)
    for cell, owner in enumerate(layout.owner.tolist()):
        if owner >= 0:
            expected[cell, owner] = 1
    assert np.array_equal(one_hot.numpy(), expected)
    assert layout.owner_one_hot_on(cpu) is one_hot
    crop, merge = layout.crop_and_merge_on(cpu)
    # boxes: 0 -> cells 0,1,4,5; 1 -> 5,6,9,10,13,14; 2 -> 15; padded to 6 by repeating the last cell
    assert crop.tolist() == [[0, 1, 4, 5, 5, 5], [5, 6, 9, 10, 13, 14], [15, 15, 15, 15, 15, 15]]
    length, zero_row = 6, 18
    expected_merge = [zero_row] * 16
    for subject in (2, 0, 1):
        cells = crop[subject].tolist()[: [4, 6, 1][subject]]
        for position, cell in enumerate(cells):
            expected_merge[cell] = subject * length + position
    assert merge.tolist() == expected_merge
    assert merge[5] == 1 * length + 0  # subject 1 painted last owns cell 5
    assert layout.crop_and_merge_on(cpu)[0] is crop
    # every view lands on the device asked for (the meta device stands in for a GPU)
    meta = torch.device("meta")
    assert layout.masks_on(meta, torch.float16).device == meta and layout.masks_on(meta, torch.float16).shape == (3, 16)
    assert layout.owner_one_hot_on(meta).device == meta
    assert all(t.device == meta for t in layout.crop_and_merge_on(meta))
    assert layout.masks_on(cpu, torch.float16) is masks and layout.crop_and_merge_on(cpu)[0] is crop


@pytest.mark.parametrize("latent, length, grid", [
    ((1, 8), 8, (1, 8)), ((1, 8), 4, (1, 4)), ((1, 8), 2, (1, 2)), ((1, 8), 1, (1, 1)),
    ((8, 1), 4, (4, 1)), ((8, 1), 1, (1, 1)), ((2, 1), 1, (1, 1)), ((1, 2), 1, (1, 1)),
    ((5, 3), 15, (5, 3)), ((5, 3), 6, (3, 2)), ((5, 3), 2, (2, 1)), ((5, 3), 1, (1, 1)),
    ((7, 7), 16, (4, 4)), ((7, 7), 4, (2, 2)), ((1, 1), 1, (1, 1)),
])
def test_level_grid_ceil_halving_also_for_thin_and_odd_latents(latent, length, grid):
    assert level_grid(*latent, length) == grid


@pytest.mark.parametrize("latent, length", [((1, 1), 2), ((5, 3), 7), ((5, 3), 3), ((1, 8), 3), ((8, 1), 16),
                                            ((2, 2), 2)])
def test_level_grid_refuses_impossible_lengths(latent, length):
    with pytest.raises(ValueError, match=rf"No UNet level of a {latent[0]}x{latent[1]} latent has {length} positions"):
        level_grid(*latent, length)


# =============================================================================================
# layout: priorities
# =============================================================================================
def _subjects(boxes, priorities):
    image = solid()
    return [Subject(image, box, priority=p) for box, p in zip(boxes, priorities)]


@pytest.mark.parametrize("rule", PRIORITY_RULES)
def test_equal_priorities_same_area_later_subject_wins_under_every_rule(rule):
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1.0, 1.0]]
    for priorities in ([None, None, None], [2.0, 2.0, 2.0], [0, None, 0.0]):
        order = paint_order(_subjects(boxes, priorities), rule)
        assert order == [0, 1, 2]
        owner = GridLayout.build(boxes, order, 4, 4).owner.view(4, 4)
        assert owner[1, 1] == 1 and owner[2, 2] == 2


def test_equal_priorities_under_the_area_rule_the_smaller_box_wins():
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]]
    subjects = _subjects(boxes, [1.0, 1.0, 1.0])
    assert paint_order(subjects, "area") == [1, 0, 2]
    assert paint_order(subjects, "order") == [0, 1, 2]
    owner = GridLayout.build(boxes, paint_order(subjects, "area"), 4, 4).owner.view(4, 4)
    assert owner[1, 1] == 2 and owner[0, 0] == 0 and owner[3, 3] == 1


@pytest.mark.parametrize("rule", PRIORITY_RULES)
def test_explicit_priorities_beat_the_rule(rule):
    # subject 0: small, last in no list position; priority decides before area or order
    boxes = [[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5], [0.0, 0.0, 0.75, 0.75], [0.5, 0.5, 0.75, 0.75]]
    subjects = _subjects(boxes, [3.0, -1.0, None, 0.5])
    assert paint_order(subjects, rule) == [1, 2, 3, 0]
    fractional = _subjects(boxes[:2], [0.25, 0.75])
    assert paint_order(fractional, rule) == [0, 1]
    assert paint_order(_subjects(boxes[:2], [0.75, 0.25]), rule) == [1, 0]


def test_paint_order_default_rule_is_list_order():
    small, big = _subjects([[0.4, 0.4, 0.6, 0.6], [0, 0, 1, 1]], [None, None])
    assert paint_order([small, big]) == [0, 1] and paint_order([big, small]) == [0, 1]


def test_paint_order_refuses_unknown_rules():
    with pytest.raises(ValueError, match="Unknown priority rule 'size'"):
        paint_order(_subjects([[0, 0, 1, 1]], [None]), "size")


# =============================================================================================
# layout: subjects and reference images
# =============================================================================================
def test_subject_keeps_a_validated_box_priority_and_area():
    subject = Subject(solid(), [0.1, 0.2, 0.5, 0.6], name="cat", priority=2)
    assert subject.box == (0.1, 0.2, 0.5, 0.6) and isinstance(subject.box, tuple)
    assert subject.priority == 2.0 and subject.source is None
    assert math.isclose(subject.area, 0.4 * 0.4)
    assert math.isclose(Subject(solid(), [0.0, 0.0, 0.5, 0.25]).area, 0.125)
    with pytest.raises(ValueError, match="name must be a string, got int 3"):
        Subject(solid(), [0, 0, 1, 1], name=3)
    with pytest.raises(ValueError, match="box of subject 'cat'"):
        Subject(solid(), [0.5, 0, 0.4, 1], name="cat")
    with pytest.raises(ValueError, match=r"^box of subject must be four numbers"):  # unnamed: no name in the message
        Subject(solid(), [0.5, 0, 0.4])
    with pytest.raises(ValueError, match=r"^priority of subject 'cat' must be a number"):
        Subject(solid(), [0, 0, 1, 1], name="cat", priority="high")


def test_subject_to_config_records_the_image_by_argument_then_path_then_digest(tmp_path):
    image = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    path = tmp_path / "ref.png"
    image.save(path)
    digest = hashlib.sha256(b"3x2:" + image.tobytes()).hexdigest()
    assert image_digest(image) == f"sha256:{digest}"
    in_memory = Subject(image, [0, 0, 1, 1], name="a", priority=1)
    assert in_memory.to_config() == SubjectConfig(box=(0, 0, 1, 1), name="a", priority=1.0, image=f"sha256:{digest}")
    assert in_memory.to_config("given.png").image == "given.png"
    from_file = Subject(str(path), [0, 0, 1, 1])
    assert from_file.source == str(path) and from_file.to_config().image == str(path)
    assert from_file.to_config("x").image == "x"
    assert Subject(path, [0, 0, 1, 1]).source == str(path)  # PathLike too
    assert pixels(from_file.image).tolist() == pixels(image).tolist()


def test_validate_subjects_and_names():
    a, b = Subject(solid(), [0, 0, 1, 1], name="a"), Subject(solid(), [0, 0, 1, 1])
    assert validate_subjects((a, b)) == [a, b]
    with pytest.raises(ValueError, match="got a single Subject"):
        validate_subjects(a)
    with pytest.raises(ValueError, match="at least one subject"):
        validate_subjects([])
    with pytest.raises(ValueError, match=r"subjects\[1\] must be an anyms_core.Subject, got str"):
        validate_subjects([a, "b"])
    assert subject_names([a, b, Subject(solid(), [0, 0, 1, 1], name="")]) == ["a", "subject 1", "subject 2"]


def test_load_reference_image_reads_files_and_refuses_other_things(tmp_path):
    image = Image.new("L", (3, 2), 77)
    image.save(tmp_path / "grey.png")
    loaded = load_reference_image(tmp_path / "grey.png")
    assert loaded.mode == "RGB" and loaded.size == (3, 2) and pixels(loaded).tolist() == [[[77] * 3] * 3] * 2
    assert load_reference_image(str(tmp_path / "grey.png")).mode == "RGB"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Cannot read the reference image '.*bad\.png'"):
        load_reference_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"Cannot read the reference image '.*missing\.png'"):
        load_reference_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="PIL image, a path or a numpy array, got list"):
        load_reference_image([[0]])
    with pytest.raises(ValueError, match="must not be empty, got 0x3 pixels"):
        load_reference_image(Image.new("RGB", (0, 3)))
    rgb = solid((1, 2, 3))
    assert load_reference_image(rgb) is rgb  # already RGB: as it is


@pytest.mark.parametrize("array, expected", [
    (np.array([[0.0, 0.5], [1.0, 0.25]]), [[0, 128], [255, 64]]),  # floats: round(v * 255)
    (np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)[:, :, None], [[0, 128], [255, 64]]),  # HxWx1
    (np.array([[0, 255], [256, 65535]], dtype=np.uint16), [[0, 0], [1, 255]]),  # uint16: the high byte
    (np.array([[0, 7], [128, 255]], dtype=np.uint8), [[0, 7], [128, 255]]),
])
def test_greyscale_arrays_convert_exactly(array, expected):
    image = load_reference_image(array)
    assert image.mode == "RGB"
    assert pixels(image).tolist() == [[[v] * 3 for v in row] for row in expected]


def test_colour_arrays_convert_exactly():
    rgb = np.array([[[0.0, 0.5, 1.0]]])
    assert pixels(load_reference_image(rgb)).tolist() == [[[0, 128, 255]]]
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 128], [200, 100, 0, 255]]], dtype=np.uint8)
    # transparency is composited over white
    assert pixels(load_reference_image(rgba)).tolist() == [[[255, 255, 255], [0, 0, 0], [127, 127, 127], [200, 100, 0]]]
    rgb16 = np.array([[[65535, 256, 0]]], dtype=np.uint16)
    assert pixels(load_reference_image(rgb16)).tolist() == [[[255, 1, 0]]]


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 2, 2), dtype=np.uint8), r"HxW, HxWx1, HxWx3 or HxWx4, got shape \(2, 2, 2\)"),
    (np.zeros((2,), dtype=np.uint8), "got shape"),
    (np.zeros((2, 2, 2, 3), dtype=np.uint8), "got shape"),
    (np.zeros((0, 3), dtype=np.uint8), r"must not be empty, got an array of shape \(0, 3\)"),
    (np.zeros((3, 0, 3), dtype=np.uint8), "must not be empty"),
    (np.array([[0.5, np.nan]]), "NaN or infinite"),
    (np.array([[0.5, np.inf]]), "NaN or infinite"),
    (np.array([[0.5, 1.01]]), r"in \[0, 1\]"),
    (np.array([[-0.01, 0.5]]), r"in \[0, 1\]"),
    (np.zeros((2, 2), dtype=np.int32), "uint8, uint16 or float in \\[0, 1\\], got int32"),
])
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(ValueError, match=message):
        load_reference_image(array)


def _image(mode, size, data):
    image = Image.new(mode, size)
    image.putdata(data)
    return image


def test_pil_modes_convert_exactly():
    to_rgb = layout_module._to_rgb
    # 16-bit greyscale: scaled from 65535 to 255 (PIL would clip)
    for mode in ("I;16", "I;16B", "I;16L"):
        image = _image(mode, (5, 1), [0, 1000, 32768, 65407, 65535])  # 65407 / 65535 * 255 = 254.502
        assert pixels(to_rgb(image))[0, :, 0].tolist() == [0, 4, 128, 255, 255], mode
        assert pixels(to_rgb(_image(mode, (2, 1), [0, 1000])))[0, :, 0].tolist() == [0, 4], mode  # not by its peak
    # 32-bit: scaled by its own peak; an all-black one stays black
    assert pixels(to_rgb(_image("I", (3, 1), [0, 500, 1000])))[0].tolist() == [[0] * 3, [128] * 3, [255] * 3]
    assert pixels(to_rgb(_image("I", (2, 1), [0, 1])))[0, :, 0].tolist() == [0, 255]
    assert pixels(to_rgb(_image("I", (2, 1), [0, 0])))[0, :, 0].tolist() == [0, 0]
    assert pixels(to_rgb(_image("I", (3, 1), [-100, 0, 100])))[0, :, 0].tolist() == [0, 0, 255]  # negatives: black
    # LA: over white
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8), "LA")
    assert pixels(to_rgb(la))[0].tolist() == [[255] * 3, [0] * 3, [177] * 3]
    # premultiplied alpha is un-premultiplied first
    assert pixels(to_rgb(Image.new("La", (1, 1), (100, 128))))[0].tolist() == [[227] * 3]
    assert pixels(to_rgb(Image.new("RGBa", (1, 1), (100, 50, 0, 128))))[0].tolist() == [[227, 177, 127]]
    # palette, with and without a transparent entry
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert pixels(to_rgb(palette))[0].tolist() == [[255, 0, 0], [0, 255, 0]]
    palette.info["transparency"] = 0
    assert pixels(to_rgb(palette))[0].tolist() == [[255, 255, 255], [0, 255, 0]]
    pa = Image.new("PA", (2, 1))
    pa.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pa.putpixel((0, 0), (0, 0))
    pa.putpixel((1, 0), (1, 255))
    assert pixels(to_rgb(pa))[0].tolist() == [[255, 255, 255], [0, 255, 0]]
    # others: PIL's own conversion
    assert pixels(to_rgb(Image.new("L", (1, 1), 9)))[0].tolist() == [[9, 9, 9]]
    assert pixels(to_rgb(Image.new("CMYK", (1, 1), (0, 255, 0, 0))))[0].tolist() == [[255, 0, 255]]
    for image in (to_rgb(la), to_rgb(palette), to_rgb(_image("I;16", (1, 1), [7]))):
        assert image.mode == "RGB"


# =============================================================================================
# run: save / load
# =============================================================================================
def _config(n_subjects=2, **changes):
    subjects = tuple(SubjectConfig(box=(0.1 * i, 0.0, 0.5 + 0.1 * i, 0.5), name=f"s{i}", priority=[None, 2.5][i % 2],
                                   image=f"ref{i}.png") for i in range(n_subjects))
    values = dict(prompt="a cat and a dog", variant="anyms", seed=3, subjects=subjects, steps=3, guidance_scale=5.0,
                  height=8, width=12, priority_rule="area", model="toy")
    values.update(changes)
    return RunConfig(**values)


def _attention():
    maps = AttentionMaps(kinds=["affinity", "text"], subjects=["s0", "s1"], words=["cat"], policy="resolution",
                         budget_bytes=1 << 20)
    rng = np.random.default_rng(0)
    entries = {("affinity", 0, "4x6"): (2, 4, 6), ("affinity", 2, "4x6"): (2, 4, 6), ("text", 0, "2x3"): (1, 2, 3)}
    for key, shape in entries.items():
        maps.entries[key] = torch.from_numpy(rng.random(shape)).half()
    maps.grids = {"4x6": (4, 6), "2x3": (2, 3)}
    maps.layer_grids = {"down.0": (4, 6)}
    maps.dropped = [("affinity", 1, "4x6")]
    maps.nbytes = sum(t.numel() * 2 for t in maps.entries.values())
    return maps


def _run(attention=True, previews=True, n_images=2):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)) for _ in range(n_images)]
    subject_images = [Image.fromarray(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)) for _ in range(2)]
    previews_ = [rng.integers(0, 256, (4, 6, 3), dtype=np.uint8) for _ in range(3)] if previews else []
    timings = {"total": 1.5, "per_step": [0.5, 0.5, 0.5], "steps_per_s": 2.0, "unet_calls": 3}
    return Run(images, _config(), subject_images, _attention() if attention else None, previews_, timings)


def _same_images(a, b):
    return len(a) == len(b) and all(x.mode == y.mode and np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))


def test_run_round_trip_keeps_every_field_and_map(tmp_path):
    run = _run()
    assert run.save(tmp_path / "run") == tmp_path / "run"
    files = sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert files == ["arrays.safetensors", "image.png", "image_1.png", "run.json", "subjects/0.png", "subjects/1.png"]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["format_version"] == 2 and record["num_images"] == 2
    assert record["arrays"] == sorted(["attention/affinity/0/4x6", "attention/affinity/2/4x6", "attention/text/0/2x3",
                                       "previews"])
    assert record["config"] == run.config.to_dict() and record["timings"] == run.timings
    loaded = Run.load(tmp_path / "run")
    assert loaded.config == run.config and loaded.timings == run.timings
    assert _same_images(loaded.images, run.images) and _same_images(loaded.subject_images, run.subject_images)
    assert len(loaded.previews) == 3
    for got, want in zip(loaded.previews, run.previews):
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    attention = loaded.attention
    assert attention.metadata() == run.attention.metadata()  # kinds, subjects, words, policy, budget, grids, dropped
    assert attention.kinds == ["affinity", "text"] and attention.words == ["cat"] and attention.policy == "resolution"
    assert attention.budget_bytes == 1 << 20 and attention.subjects == ["s0", "s1"]
    assert attention.grids == {"4x6": (4, 6), "2x3": (2, 3)} and attention.layer_grids == {"down.0": (4, 6)}
    assert attention.dropped == [("affinity", 1, "4x6")] and attention.nbytes == run.attention.nbytes
    assert sorted(attention.entries) == sorted(run.attention.entries)
    for key, maps in run.attention.entries.items():
        assert attention.entries[key].dtype == torch.float16 and torch.equal(attention.entries[key], maps)


def test_run_without_attention_or_previews_round_trips_without_arrays(tmp_path):
    run = _run(attention=False, previews=False, n_images=1)
    run.save(tmp_path / "run")
    assert not (tmp_path / "run" / "arrays.safetensors").exists()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["arrays"] == [] and record["attention"] is None and record["num_images"] == 1
    loaded = Run.load(tmp_path / "run")
    assert loaded.attention is None and loaded.previews == [] and _same_images(loaded.images, run.images)
    only_previews = _run(attention=False)
    only_previews.save(tmp_path / "previews")
    assert json.loads((tmp_path / "previews" / "run.json").read_text())["arrays"] == ["previews"]
    assert Run.load(tmp_path / "previews").attention is None


def test_run_properties():
    run = _run()
    assert run.image is run.images[0]
    assert run.boxes == [[0.0, 0.0, 0.5, 0.5], [0.1, 0.0, 0.6, 0.5]]
    assert run.subject_names == ["s0", "s1"] and run.variant == "anyms" and run.prompt == "a cat and a dog"
    assert run.num_steps == 3
    assert _run(previews=False).num_steps == 3  # from the config
    assert Run([solid()], _config(steps=None), []).num_steps == 0
    subjects = run.subjects()
    assert [s.box for s in subjects] == [(0.0, 0.0, 0.5, 0.5), (0.1, 0.0, 0.6, 0.5)]
    assert [s.name for s in subjects] == ["s0", "s1"] and [s.priority for s in subjects] == [None, 2.5]
    assert _same_images([s.image for s in subjects], run.subject_images)
    assert repr(run) == ("Run(variant='anyms', prompt='a cat and a dog', subjects=['s0', 's1'], size=(12, 8), "
                         "steps=3, attention=yes)")
    assert "attention=no" in repr(_run(attention=False))
    from_dict = Run([solid()], _config().to_dict(), [])
    assert isinstance(from_dict.config, RunConfig) and from_dict.config == _config()
    with pytest.raises(ValueError, match="must be a RunConfig .or its dict., got list"):
        Run([solid()], [], [])


def test_save_overwrite_semantics(tmp_path, monkeypatch):
    run, other = _run(), _run(attention=False, previews=False, n_images=1)
    target = tmp_path / "deep" / "er" / "run"
    run.save(target)  # parents are created
    (target / "extra.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"run: the directory is not empty"):
        other.save(target)
    assert (target / "extra.txt").exists() and Run.load(target).attention is not None
    assert other.save(target, overwrite=True) == target
    assert not (target / "extra.txt").exists() and not (target / "arrays.safetensors").exists()
    assert not (target / "image_1.png").exists()
    assert Run.load(target).attention is None
    assert sorted(p.name for p in target.parent.iterdir()) == ["run"]  # no staging or retired folder left
    # a file in the way is refused, also with overwrite
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"file: it is a file, not a directory"):
            run.save(tmp_path / "file", overwrite=overwrite)
    # overwrite=True into a fresh or an empty directory works too
    other.save(tmp_path / "fresh", overwrite=True)
    (tmp_path / "empty").mkdir()
    other.save(tmp_path / "empty")
    assert Run.load(tmp_path / "fresh").config == Run.load(tmp_path / "empty").config
    # ~ is expanded
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert other.save("~/r") == tmp_path / "home" / "r" and Run.load("~/r").config == other.config


def test_sibling_folder_is_new_hidden_and_beside(tmp_path, monkeypatch):
    folder = sibling_folder(tmp_path / "run", "partial")
    assert folder.parent == tmp_path and folder.is_dir() and not any(folder.iterdir())
    name = folder.name
    assert name.startswith(".run.") and name.endswith(".partial") and len(name.split(".")[2]) == 12
    uuids = iter([types.SimpleNamespace(hex="a" * 32)] * 3 + [types.SimpleNamespace(hex="b" * 32)])
    monkeypatch.setattr(run_module.uuid, "uuid4", lambda: next(uuids))
    first = sibling_folder(tmp_path / "x", "old")
    assert first.name == ".x." + "a" * 12 + ".old"
    second = sibling_folder(tmp_path / "x", "old")  # the same name twice: tries again
    assert second.name == ".x." + "b" * 12 + ".old"
    monkeypatch.setattr(run_module.uuid, "uuid4", lambda: types.SimpleNamespace(hex="c" * 32))
    sibling_folder(tmp_path / "y", "old")
    with pytest.raises(FileExistsError, match="Cannot create a temporary folder beside"):
        sibling_folder(tmp_path / "y", "old")


def _saved(tmp_path, **kwargs):
    _run(**kwargs).save(tmp_path / "run")
    return tmp_path / "run"


def _edit_record(path, change):
    record = json.loads((path / "run.json").read_text())
    change(record)
    (path / "run.json").write_text(json.dumps(record))


@pytest.mark.parametrize("value", [0, -1, True, "2", 1.0, None])
def test_load_refuses_a_bad_image_count(tmp_path, value):
    path = _saved(tmp_path)
    _edit_record(path, lambda r: r.update(num_images=value))
    with pytest.raises(ValueError, match=rf"run\.json: num_images must be a positive integer, got {value!r}"):
        Run.load(path)


def test_load_reads_fewer_images_than_saved(tmp_path):
    path = _saved(tmp_path)
    _edit_record(path, lambda r: r.update(num_images=1))
    assert len(Run.load(path).images) == 1


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"is not a saved run: run\.json is missing"):
        Run.load(tmp_path)
    path = _saved(tmp_path)
    _edit_record(path, lambda r: r.pop("format_version"))
    with pytest.raises(ValueError, match=r"run\.json has run format None, this version reads \[1, 2\]"):
        Run.load(path)
    for key in ("num_images", "attention", "timings", "arrays"):
        path = _saved(tmp_path / key)
        _edit_record(path, lambda r: r.pop(key))
        with pytest.raises(ValueError, match=rf"field\(s\) \['{key}'\] missing"):
            Run.load(path)
    path = _saved(tmp_path / "malformed")
    _edit_record(path, lambda r: r["attention"].pop("policy"))
    with pytest.raises(ValueError, match=r"run\.json: field 'attention' is malformed \(KeyError"):
        Run.load(path)
    path = _saved(tmp_path / "bytes")
    (path / "run.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not valid JSON"):
        Run.load(path)


def test_load_format_1(tmp_path):
    # format 1: no "arrays" list; arrays are required only when attention was recorded
    path = _saved(tmp_path / "plain", attention=False, previews=False)
    _edit_record(path, lambda r: (r.update(format_version=1), r.pop("arrays")))
    assert Run.load(path).attention is None
    path = _saved(tmp_path / "maps")
    _edit_record(path, lambda r: (r.update(format_version=1), r.pop("arrays")))
    loaded = Run.load(path)
    assert loaded.attention.metadata() == _attention().metadata() and len(loaded.previews) == 3
    assert sorted(loaded.attention.entries) == sorted(_attention().entries)
    (path / "arrays.safetensors").unlink()
    with pytest.raises(ValueError, match=r"arrays\.safetensors is missing, but run\.json says the run recorded arrays"):
        Run.load(path)
    # format 2 with arrays listed but the file gone
    path = _saved(tmp_path / "v2", attention=False)
    (path / "arrays.safetensors").unlink()
    with pytest.raises(ValueError, match=r"arrays\.safetensors is missing"):
        Run.load(path)


def test_load_names_the_config_and_missing_arrays(tmp_path):
    path = _saved(tmp_path / "config")
    _edit_record(path, lambda r: r["config"].update(steps="many"))
    with pytest.raises(ValueError, match=r"run\.json: config: steps must be an integer"):
        Run.load(path)
    path = _saved(tmp_path / "lacks")
    _edit_record(path, lambda r: r["arrays"].extend(["attention/x/0/y", "attention/x/1/y"]))
    with pytest.raises(ValueError, match=r"arrays\.safetensors lacks 2 array\(s\) that run\.json lists, e\.g\. \['attention"):
        Run.load(path)
    # format 2 trusts its list of arrays: attention metadata without arrays loads as empty maps
    path = _saved(tmp_path / "empty", previews=False)
    (path / "arrays.safetensors").unlink()
    _edit_record(path, lambda r: r.update(arrays=[]))
    loaded = Run.load(path)
    assert loaded.attention is not None and loaded.attention.entries == {} and loaded.previews == []


def test_a_failed_write_leaves_nothing_and_raises(tmp_path, monkeypatch):
    def broken(self, directory):
        (directory / "image.png").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Run, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        _run().save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_load_converts_images_to_rgb(tmp_path):
    path = _saved(tmp_path)
    Image.new("L", (12, 8), 50).save(path / "image.png")
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(path / "subjects" / "0.png")
    loaded = Run.load(path)
    assert loaded.image.mode == "RGB" and pixels(loaded.image)[0, 0].tolist() == [50, 50, 50]
    assert loaded.subject_images[0].mode == "RGB" and pixels(loaded.subject_images[0])[0, 0].tolist() == [1, 2, 3]
    (path / "image_1.png").unlink()
    with pytest.raises(ValueError, match=r"image_1\.png is missing: the saved run is incomplete"):
        Run.load(path)


# =============================================================================================
# sampler: x0 previews
# =============================================================================================
ALPHAS = torch.tensor([0.9, 0.64, 0.36, 0.25])


def fake_pipe(prediction_type="epsilon", cfg=False, guidance=3.0, **extra):
    scheduler = types.SimpleNamespace(alphas_cumprod=ALPHAS.clone(),
                                      config=types.SimpleNamespace(prediction_type=prediction_type))
    return types.SimpleNamespace(scheduler=scheduler, do_classifier_free_guidance=cfg, guidance_scale=guidance, **extra)


SAMPLE = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 4.0]]]])  # [2, 1, 1, 2]: uncond, cond halves under CFG
PREDICTION = torch.tensor([[[[0.2, 0.4]]], [[[1.0, -0.6]]]])


@pytest.mark.parametrize("timestep, alpha", [(3, 0.25), (torch.tensor([2.0, 2.0]), 0.36), (1.4, 0.64), (1.6, 0.36),
                                             (torch.tensor(0), 0.9), (99, 0.25), (-5, 0.9)])
def test_predicted_clean_sample_epsilon(timestep, alpha):
    x0 = predicted_clean_sample(fake_pipe(), SAMPLE, timestep, PREDICTION)
    expected = [(1.0 - math.sqrt(1 - alpha) * 0.2) / math.sqrt(alpha), (-2.0 - math.sqrt(1 - alpha) * 0.4) / math.sqrt(alpha)]
    assert x0.shape == (1, 1, 1, 2) and x0.dtype == torch.float32
    assert np.allclose(x0.flatten().numpy(), expected, atol=1e-6)


def test_predicted_clean_sample_guides_with_the_cond_half():
    g = 3.0
    eps = [0.2 + g * (1.0 - 0.2), 0.4 + g * (-0.6 - 0.4)]  # uncond + g (cond - uncond)
    x = [0.5, 4.0]  # the cond half of the sample
    a = 0.36
    pipe = fake_pipe(cfg=True, guidance=g)
    got = predicted_clean_sample(pipe, SAMPLE, 2, PREDICTION).flatten().numpy()
    assert np.allclose(got, [(xi - math.sqrt(1 - a) * e) / math.sqrt(a) for xi, e in zip(x, eps)], atol=1e-6)
    v = predicted_clean_sample(fake_pipe("v_prediction", cfg=True, guidance=g), SAMPLE, 2, PREDICTION).flatten().numpy()
    assert np.allclose(v, [math.sqrt(a) * xi - math.sqrt(1 - a) * e for xi, e in zip(x, eps)], atol=1e-6)
    sample = predicted_clean_sample(fake_pipe("sample", cfg=True, guidance=g), SAMPLE, 2, PREDICTION)
    assert np.allclose(sample.flatten().numpy(), eps, atol=1e-6)
    # CFG on but a single batch row: nothing to guide
    single = predicted_clean_sample(pipe, SAMPLE[1:], 2, PREDICTION[1:]).flatten().numpy()
    assert np.allclose(single, [(0.5 - 0.8 * 1.0) / 0.6, (4.0 - 0.8 * -0.6) / 0.6], atol=1e-6)


def test_predicted_clean_sample_without_a_cfg_flag_and_with_several_images():
    pipe = fake_pipe("sample")
    del pipe.do_classifier_free_guidance
    assert torch.equal(predicted_clean_sample(pipe, SAMPLE, 1, PREDICTION), PREDICTION[:1])  # no flag: no guidance
    # three images under CFG: [uncond x3, cond x3]; x0 of the first image
    prediction = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    sample = torch.arange(10, 16, dtype=torch.float32).view(6, 1, 1, 1)
    guided = predicted_clean_sample(fake_pipe("sample", cfg=True, guidance=2.0), sample, 1, prediction)
    assert guided.flatten().tolist() == [0 + 2.0 * (3 - 0)]
    x0 = predicted_clean_sample(fake_pipe(cfg=True, guidance=2.0), sample, 1, prediction)
    assert math.isclose(x0.item(), (13 - 0.6 * 6.0) / 0.8, rel_tol=1e-6)  # the cond half's first sample: 13


def test_predicted_clean_sample_v_and_sample_without_guidance():
    # alpha 0.64 at t = 1: sqrt(a) = 0.8, sqrt(1 - a) = 0.6
    v = predicted_clean_sample(fake_pipe("v_prediction"), SAMPLE.half(), 1, PREDICTION.half())
    assert v.dtype == torch.float32 and v.shape == (1, 1, 1, 2)
    assert np.allclose(v.flatten().numpy(), [0.8 * 1.0 - 0.6 * 0.2, 0.8 * -2.0 - 0.6 * 0.4], atol=2e-3)
    sample = predicted_clean_sample(fake_pipe("sample"), SAMPLE, 1, PREDICTION)
    assert torch.equal(sample, PREDICTION[:1])


def _rgb_from(r, g, b):
    return np.stack([np.full((2, 3), r), np.full((2, 3), g), np.full((2, 3), b)], axis=-1)


def test_preview_rgb_latent_formula_for_sd15_and_sdxl():
    x0 = torch.tensor([0.5, -0.25, 1.0, 0.3]).view(1, 4, 1, 1).expand(1, 4, 2, 3).contiguous()
    for family, pipe in (("sd15", types.SimpleNamespace()), ("sdxl", types.SimpleNamespace(text_encoder_2=None))):
        factors, bias = sampler_module._LATENT_RGB[family]
        channels = [0.5, -0.25, 1.0, 0.3]
        rgb = [sum(c * factors[i][r] for i, c in enumerate(channels)) + bias[r] for r in range(3)]
        expected = [int(np.round(np.clip((v + 1) / 2, 0, 1) * 255)) for v in rgb]
        got = _preview_rgb(pipe, x0)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 3) and got.flags["C_CONTIGUOUS"]
        assert np.abs(got.astype(int) - np.array(expected)).max() <= 1 and got[0, 0].tolist() == expected, family
    sd15 = _preview_rgb(types.SimpleNamespace(), x0)
    sdxl = _preview_rgb(types.SimpleNamespace(text_encoder_2=None), x0)
    assert not np.array_equal(sd15, sdxl)


def test_preview_rgb_other_channels_and_own_decoder():
    # not 4 channels: the channel mean as grey, mapped from [-1, 1]
    x0 = torch.tensor([[[[0.2, -1.5]], [[0.6, -0.5]], [[-0.2, 3.0]]]])  # [1, 3, 1, 2]: means 0.2, 1/3
    got = _preview_rgb(types.SimpleNamespace(), x0)
    assert got.tolist() == [[[153] * 3, [170] * 3]]  # round((0.2 * 0.5 + 0.5) * 255) = 153, (1/3 * .5 + .5) = 170
    saturated = _preview_rgb(types.SimpleNamespace(), torch.tensor([[[[5.0, -5.0, 0.0]]]]))
    assert saturated.tolist() == [[[255] * 3, [0] * 3, [128] * 3]]
    calls = []

    def decode(latents):
        calls.append(latents)
        return torch.stack([torch.full((3, 1, 2), 0.25), torch.full((3, 1, 2), 0.75)])

    got = _preview_rgb(types.SimpleNamespace(preview_from_latents=decode), x0)
    assert got.tolist() == [[[64] * 3] * 2] and calls[0] is x0  # the first image, taken as [0, 1] RGB


@pytest.mark.parametrize("shape, size", [((96, 40), (96, 40)), ((200, 100), (96, 48)), ((97, 10), (96, 10)),
                                         ((300, 1), (96, 1)), ((1, 300), (1, 96)), ((10, 192), (5, 96))])
def test_preview_rgb_keeps_at_most_96_pixels_a_side(shape, size):
    x0 = torch.linspace(-1, 1, shape[0] * shape[1]).view(1, 1, *shape)
    got = _preview_rgb(types.SimpleNamespace(), x0)
    assert got.shape == (*size, 3)
    grey = (x0[0] * 0.5 + 0.5).expand(3, -1, -1)
    expected = grey if tuple(shape) == size else F.interpolate(grey[None], size=size, mode="area")[0]
    expected = (expected.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


# =============================================================================================
# sampler: the step observer
# =============================================================================================
class HalfUNet(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        return (sample * 0.5,)


def observer_pipe(scheduler=None, **extra):
    from diffusers import DDIMScheduler

    scheduler = scheduler or DDIMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(5)
    return types.SimpleNamespace(unet=HalfUNet(), scheduler=scheduler, guidance_scale=2.0,
                                 do_classifier_free_guidance=False, **extra)


def test_observer_in_a_custom_loop_previews_every_unet_call_with_the_vp_formula():
    pipe = observer_pipe()
    seen = []
    observer = _StepObserver(pipe, True, seen.append)
    x1, x2 = torch.full((1, 4, 2, 2), 0.4), torch.full((1, 4, 2, 2), -0.3)
    with observer.installed():
        pipe.unet(x1, timestep=10)
        pipe.guidance_scale = 9.0  # changed after the first call: the config keeps the first
        pipe.unet(sample=x2, timestep=torch.tensor(60))
        observer.finish()
        observer.finish()  # nothing pending: no second callback
    assert observer.first_guidance == 2.0 and len(observer.times) == 2 and not observer.without_x0
    expected = [_preview_rgb(pipe, predicted_clean_sample(pipe, x, t, x * 0.5)) for x, t in ((x1, 10), (x2, 60))]
    assert len(observer.previews) == 2
    assert all(np.array_equal(a, b) for a, b in zip(observer.previews, expected))
    assert not np.array_equal(expected[0], expected[1])
    assert [s["step"] for s in seen] == [0, 1] and all(s["num_steps"] == 5 for s in seen)
    assert all(np.array_equal(s["preview"], p) for s, p in zip(seen, observer.previews))
    assert 0 <= seen[0]["elapsed"] <= seen[1]["elapsed"]
    assert seen[1]["elapsed"] == observer.times[1] - observer.start
    assert observer.times[0] <= observer.times[1]


def test_observer_uses_the_scheduler_s_own_x0_and_answers_step_as_asked():
    pipe = observer_pipe()
    scheduler = pipe.scheduler
    seen = []
    observer = _StepObserver(pipe, True, seen.append)
    x = torch.linspace(-1, 1, 16).view(1, 4, 2, 2)
    t = scheduler.timesteps[0]
    with observer.installed():
        assert "step" in vars(scheduler)
        output = pipe.unet(x, t)[0]
        result = scheduler.step(output, t, x)  # return_dict defaults to True
        assert hasattr(result, "prev_sample") and hasattr(result, "pred_original_sample")
        own = result.pred_original_sample
        assert len(seen) == 1 and seen[0]["step"] == 0
        output = pipe.unet(x, scheduler.timesteps[1])[0]
        as_tuple = scheduler.step(output, scheduler.timesteps[1], x, return_dict=False)
        assert isinstance(as_tuple, tuple)
    assert "step" not in vars(scheduler)  # restored: the class's own method again
    assert len(observer.previews) == 2 and len(seen) == 2
    assert np.array_equal(observer.previews[0], _preview_rgb(pipe, own[:1].float()))
    # outside the context the wrapper is gone and nothing is observed
    pipe.unet(x, t)
    assert len(observer.times) == 2


def test_observer_restores_an_instance_step_and_leaves_a_later_wrapper():
    pipe = observer_pipe()
    own = pipe.scheduler.step
    pipe.scheduler.step = own  # an instance attribute before us
    observer = _StepObserver(pipe, True, None)
    with observer.installed():
        assert pipe.scheduler.step is not own
    assert vars(pipe.scheduler)["step"] is own
    theirs = object()
    with observer.installed():
        pipe.scheduler.step = theirs
    assert pipe.scheduler.step is theirs


def test_observer_without_x0_turns_previews_off_but_still_calls_back():
    scheduler = types.SimpleNamespace(timesteps=[3, 2, 1], step=lambda *a, **k: None)
    pipe = types.SimpleNamespace(unet=HalfUNet(), scheduler=scheduler, guidance_scale=1.0)
    seen = []
    observer = _StepObserver(pipe, True, seen.append)
    with observer.installed():
        pipe.unet(torch.zeros(1, 4, 2, 2), 1)
        pipe.unet(torch.zeros(1, 4, 2, 2), 0)
    observer.finish()
    assert observer.without_x0 and observer.previews == []
    assert [(s["step"], s["num_steps"], s["preview"]) for s in seen] == [(0, 3, None), (1, 3, None)]


def test_observer_previews_with_the_pipeline_s_own_decoder_and_without_guidance():
    decoded = torch.full((1, 3, 2, 2), 0.2)
    pipe = observer_pipe(preview_from_latents=lambda latents: decoded)
    del pipe.guidance_scale
    observer = _StepObserver(pipe, True, None)
    with observer.installed():
        pipe.unet(torch.zeros(1, 4, 2, 2), 1)
    observer.finish()
    assert observer.first_guidance is None
    assert observer.previews[0].tolist() == [[[51] * 3] * 2] * 2


def test_observer_with_previews_off():
    pipe = observer_pipe()
    seen = []
    observer = _StepObserver(pipe, False, seen.append)
    with observer.installed():
        pipe.unet(torch.zeros(1, 4, 2, 2), 1)
    observer.finish()
    assert observer.previews == [] and not observer.without_x0 and seen[0]["preview"] is None
    silent = _StepObserver(pipe, True, None)
    with silent.installed():
        pipe.unet(torch.zeros(1, 4, 2, 2), 1)
    silent.finish()
    assert len(silent.previews) == 1


# =============================================================================================
# sampler: generate's record, pipeline arguments, progress bar
# =============================================================================================
def test_generate_records_the_values_used(tiny_sd15):
    from anyms_core.testing import random_reference_image

    seen = []
    subjects = [Subject(random_reference_image(0), [0, 0, 0.5, 0.5], name="cat"),
                Subject(random_reference_image(1), [0.5, 0.5, 1, 1], priority=2)]
    run = AnyMS(tiny_sd15, model_name="tiny").generate(
        "a photo", subjects, num_inference_steps=2, height=64, width=64, seed=5, callback=seen.append,
        record=False, priority_rule="area", negative_prompt="blurry", eta=0.0)
    config = run.config
    assert config.steps == 2 and config.guidance_scale == 7.5 and isinstance(config.guidance_scale, float)
    assert (config.height, config.width) == (64, 64) == (run.image.height, run.image.width)
    assert config.seed == 5 and config.model == "tiny" and config.record is None and config.priority_rule == "area"
    assert config.negative_prompt == "blurry" and config.pipeline == {"eta": 0.0} and config.variant == "anyms"
    assert [s.name for s in config.subjects] == ["cat", "subject 1"] and config.subjects[1].priority == 2.0
    assert config.subjects[0].image == image_digest(subjects[0].image)
    assert run.attention is None and len(run.previews) == 2 and run.subject_images[1] is subjects[1].image
    timings = run.timings
    assert timings["unet_calls"] == 2 and len(timings["per_step"]) == 2 and all(t > 0 for t in timings["per_step"])
    assert sum(timings["per_step"]) <= timings["total"]
    assert math.isclose(timings["steps_per_s"], 2 / timings["total"])
    assert [s["step"] for s in seen] == [0, 1] and all(s["num_steps"] == 2 for s in seen)
    assert all(np.array_equal(s["preview"], p) for s, p in zip(seen, run.previews))
    assert run.previews[0].ndim == 3 and run.previews[0].shape[2] == 3 and run.previews[0].dtype == np.uint8


def test_generate_defaults(tiny_sd15):
    from anyms_core.recording import RecordConfig
    from anyms_core.testing import random_reference_image

    progress = []
    subjects = [Subject(random_reference_image(0), [0, 0, 0.5, 0.5]), Subject(random_reference_image(1), [0.25, 0, 1, 1])]
    start = time.perf_counter()
    run = AnyMS(tiny_sd15).generate(
        "a photo", subjects, num_inference_steps=2, height=64, width=64,
        callback=lambda info: progress.append(dict(tiny_sd15._progress_bar_config)))
    assert 0 < run.timings["total"] <= time.perf_counter() - start
    config = run.config
    assert config.seed == 0 and config.priority_rule == "order" and config.num_images_per_prompt == 1
    assert config.record == {"kinds": ["affinity", "contribution"], "words": [], "policy": "resolution", "layers": None,
                             "budget_bytes": RecordConfig().budget_bytes} and run.attention is not None
    assert RecordConfig(**config.record) == RecordConfig()
    assert config.model == type(tiny_sd15).__name__ and config.ip_adapter_scale is None
    assert len(run.images) == 1 and len(run.previews) == 2 and run.timings["unet_calls"] == 2
    assert all(p.get("disable") is True for p in progress) and len(progress) == 2  # progress bar off by default
    again = AnyMS(tiny_sd15).generate("a photo", subjects, num_inference_steps=2, height=64, width=64, seed=0,
                                      record=True, previews=False)
    assert np.array_equal(pixels(again.image), pixels(run.image)) and again.previews == []
    shown = []
    three = AnyMS(tiny_sd15).generate("a photo", subjects, num_inference_steps=3, height=64, width=64, record=False,
                                      progress=True, callback=lambda info: shown.append(dict(tiny_sd15._progress_bar_config)))
    assert all(p.get("disable") is False for p in shown) and len(shown) == 3
    per_step = three.timings["per_step"]
    assert len(per_step) == 3 and all(t > 0 for t in per_step) and sum(per_step) <= three.timings["total"]
    assert again.attention.steps == run.attention.steps


def test_generate_records_what_was_asked(tiny_sd15, monkeypatch):
    from anyms_core.testing import random_reference_image

    monkeypatch.setattr(tiny_sd15, "anyms_model", {"name": "tiny-sd15", "family": "sd15"}, raising=False)
    subjects = [Subject(random_reference_image(0), [0, 0, 0.5, 0.5]), Subject(random_reference_image(1), [0.5, 0, 1, 1])]
    guidance = []
    run = AnyMS(tiny_sd15, model_name="ignored").generate(
        "a photo", subjects, variant="mask", num_inference_steps=1, guidance_scale=3.0, ip_adapter_scale=[0.5, 1.0],
        height=64, width=64, num_images_per_prompt=2, record=False,
        callback=lambda info: guidance.append(tiny_sd15.guidance_scale))
    config = run.config
    assert guidance == [3.0] and config.guidance_scale == 3.0
    assert list(config.ip_adapter_scale) == [0.5, 1.0]
    assert config.variant == "mask" and config.num_images_per_prompt == 2 and len(run.images) == 2
    assert config.model == {"name": "tiny-sd15", "family": "sd15"}


def test_generate_passes_its_arguments_on(tiny_sd15):
    from anyms_core.testing import random_reference_image

    subjects = [Subject(random_reference_image(0), [0, 0, 0.5, 0.5]), Subject(random_reference_image(1), [0.5, 0, 1, 1])]

    def image(subjects=subjects, **kwargs):
        kwargs = {"num_inference_steps": 1, "height": 64, "width": 64, "seed": 3, "record": False, **kwargs}
        return pixels(AnyMS(tiny_sd15).generate("a photo", subjects, **kwargs).image)

    base = image()
    assert not np.array_equal(image(negative_prompt="blurry"), base)
    assert not np.array_equal(image(ip_adapter_scale=0.0), image(ip_adapter_scale=1.0))
    assert not np.array_equal(image(variant="none"), base)
    nested = [Subject(random_reference_image(0), [0.25, 0.25, 0.75, 0.75]), Subject(random_reference_image(1), [0, 0, 1, 1])]
    assert not np.array_equal(image(subjects=nested, priority_rule="area"), image(subjects=nested))
    steps = []
    image(callback_on_step_end=lambda pipe, step, timestep, kwargs: steps.append(step) or {})
    assert steps == [0]  # pipeline arguments reach the pipeline
    run = AnyMS(tiny_sd15).generate("a photo", subjects, num_inference_steps=1, height=64, width=64,
                                    record={"kinds": ["text"], "words": ["photo"]})
    assert run.attention.words == ["photo"] and {kind for kind, _, _ in run.attention.entries} == {"text"}
    # with a single IP-Adapter there is no other adapter to give images to, nor to decouple
    with pytest.raises(ValueError, match="other_adapter_images"):
        image(other_adapter_images={1: subjects[0].image})
    with pytest.raises(ValueError):
        image(adapter_index=1)


def test_generate_from_config_forwards_every_field(tmp_path):
    for index in range(2):
        Image.new("RGB", (4, 4), (index * 100, 0, 0)).save(tmp_path / f"ref{index}.png")
    subjects = tuple(SubjectConfig(box=box, name=name, priority=priority, image=str(tmp_path / f"ref{i}.png"))
                     for i, (box, name, priority) in enumerate([((0, 0, 0.5, 0.5), "cat", None), ((0.5, 0, 1, 1), "dog", 2.0)]))
    config = RunConfig(prompt="a cat and a dog", variant="mask", seed=9, subjects=subjects, steps=4, guidance_scale=3.5,
                       ip_adapter_scale=[0.5, 1.0], height=48, width=80, negative_prompt="blurry", num_images_per_prompt=2,
                       priority_rule="area", record={"kinds": ["text"], "words": ["cat"]}, pipeline={"eta": 0.25,
                                                                                                       "opts": {"a": 1}})
    anyms = AnyMS(types.SimpleNamespace())
    calls = []
    anyms.generate = lambda *args, **kwargs: calls.append((args, kwargs))
    anyms.generate_from_config(config)
    (args, kwargs), = calls
    assert args[0] == "a cat and a dog"
    built = args[1]
    assert [s.box for s in built] == [(0, 0, 0.5, 0.5), (0.5, 0, 1, 1)] and [s.name for s in built] == ["cat", "dog"]
    assert [s.priority for s in built] == [None, 2.0]
    assert [pixels(s.image)[0, 0, 0] for s in built] == [0, 100]
    assert kwargs == dict(variant="mask", seed=9, num_inference_steps=4, guidance_scale=3.5,
                          ip_adapter_scale=config.ip_adapter_scale, height=48, width=80, record=config.record,
                          previews=True, negative_prompt="blurry", num_images_per_prompt=2, priority_rule="area",
                          progress=False, callback=None, eta=0.25, opts={"a": 1})
    given = [Subject(solid(), s.box, priority=s.priority) for s in subjects]

    def callback(info):
        pass

    anyms.generate_from_config(config, given, record=False, previews=False, progress=True, callback=callback, eta=0.0)
    args, kwargs = calls[1]
    assert args[1] == given
    assert (kwargs["record"], kwargs["previews"], kwargs["progress"], kwargs["callback"]) == (False, False, True, callback)
    assert "opts" not in kwargs and kwargs["eta"] == 0.0  # keywords replace config.pipeline whole
    anyms.generate_from_config(config, given, record=None)
    assert calls[2][1]["record"] is None
    for recorded in ({"sha256": "x"}, {"callable": "f"}, {"repr": "r"}, {"path": "p"}):
        with pytest.raises(ValueError, match=r"config.pipeline records \['x'\] by hash, name or path"):
            anyms.generate_from_config(dataclasses.replace(config, pipeline={"x": recorded}), given)


def test_generate_records_the_scheduler_s_steps_and_the_first_guidance(tiny_sd15):
    from anyms_core.testing import random_reference_image

    subjects = [Subject(random_reference_image(0), [0, 0, 0.5, 0.5])]

    def stop_after_the_first_step(pipe, step, timestep, kwargs):
        pipe._interrupt = True  # the remaining steps are skipped without a UNet call
        pipe._guidance_scale = 5.0  # dynamic CFG: the config keeps the value of the first call
        return {}

    run = AnyMS(tiny_sd15).generate("a photo", subjects, guidance_scale=3.0, record=False, previews=False,
                                    callback_on_step_end=stop_after_the_first_step)
    assert run.timings["unet_calls"] == 1 and tiny_sd15.guidance_scale == 5.0
    assert run.config.steps == tiny_sd15.scheduler.num_inference_steps > 1 and isinstance(run.config.steps, int)
    assert run.config.guidance_scale == 3.0
    # height and width left to the pipeline: recorded from the image
    assert (run.config.height, run.config.width) == (run.image.height, run.image.width)


def test_generate_from_config_checks_before_running():
    anyms = AnyMS(types.SimpleNamespace())
    config = _config(1)
    with pytest.raises(TypeError, match="config must be a RunConfig, got dict"):
        anyms.generate_from_config(config.to_dict())
    subject = Subject(solid(), config.subjects[0].box, priority=config.subjects[0].priority)
    with pytest.raises(ValueError, match="config has 1 subjects, got 2 Subject"):
        anyms.generate_from_config(config, [subject, subject])
    with pytest.raises(ValueError, match=r"subjects\[0\] has box \[0.0, 0.0, 0.5, 1.0\] and priority None"):
        anyms.generate_from_config(config, [Subject(solid(), [0, 0, 0.5, 1])])
    with pytest.raises(ValueError, match="priority 3.0"):
        anyms.generate_from_config(config, [Subject(solid(), config.subjects[0].box, priority=3)])
    hashed = _config(1, pipeline={"image": {"sha256": "x", "size": [1, 1]}, "eta": 0.0})
    with pytest.raises(ValueError, match=r"config.pipeline records \['image'\] by hash"):
        anyms.generate_from_config(hashed, [subject])
    with pytest.raises(ValueError, match="has no image file in the config"):
        anyms.generate_from_config(_config(1, subjects=(SubjectConfig(box=(0, 0, 1, 1), image="sha256:ab"),)))


def test_config_image():
    config_image = sampler_module._config_image
    assert config_image(SubjectConfig(box=(0, 0, 1, 1), image="ref.png")) == "ref.png"
    for image in (None, "sha256:abc"):
        with pytest.raises(ValueError, match=rf"subject 'x' has no image file in the config \({image!r}\)"):
            config_image(SubjectConfig(box=(0, 0, 1, 1), name="x", image=image))
    reference = config_image(SubjectConfig(box=(0, 0, 1, 1), image="toy: red circle"))
    assert np.array_equal(pixels(load_reference_image(reference)), pixels(world.sprite_reference("red circle")))


def test_model_name():
    class Pipe:
        pass

    assert AnyMS(Pipe()).model_name == "Pipe"
    named = Pipe()
    named.anyms_model_name = "toy-v1"
    assert AnyMS(named).model_name == "toy-v1" and AnyMS(named, "given").model_name == "given"


def test_check_pipeline_kwargs():
    class Strict:
        def __call__(self, prompt, eta=0.0, strength=1.0, generator=None):
            pass

    class Loose:
        def __call__(self, prompt, **kwargs):
            pass

    kwargs = {"eta": 0.5}
    checked = check_pipeline_kwargs(Strict(), kwargs)
    assert checked == kwargs and checked is not kwargs
    assert check_pipeline_kwargs(Loose(), {"anything": 1}) == {"anything": 1}
    with pytest.raises(TypeError, match=r"Strict.__call__ does not take \['etta'\]; it takes \['eta', 'strength'\]"):
        check_pipeline_kwargs(Strict(), {"etta": 1})
    with pytest.raises(TypeError, match=r"generate\(\) sets 'generator' itself \(use seed=\); 'prompt' itself"):
        check_pipeline_kwargs(Loose(), {"prompt": "x", "generator": None})


def test_describe_pipeline_kwargs():
    image = Image.new("L", (3, 2), 9)
    tensor = torch.arange(6, dtype=torch.float16).view(2, 3)
    array = np.arange(4, dtype=np.int32)

    def on_step():
        pass

    described = describe_pipeline_kwargs({
        "none": None, "flag": True, "n": 3, "s": "x", "f": 0.5, "inf": float("inf"), "nan": float("nan"),
        "image": image, "tensor": tensor, "array": array, "nested": {1: [0.25, (2, "y")]}, "fn": on_step,
        "other": complex(1, 2),
    })
    assert described["none"] is None and described["flag"] is True and described["n"] == 3 and described["s"] == "x"
    assert described["f"] == 0.5 and described["inf"] == "inf" and described["nan"] == "nan"
    assert described["image"] == {"sha256": image_digest(image.convert("RGB")), "size": [3, 2]}
    assert described["tensor"] == {"sha256": "sha256:" + hashlib.sha256(tensor.numpy().tobytes()).hexdigest(),
                                   "shape": [2, 3], "dtype": "torch.float16"}
    assert described["array"] == {"sha256": "sha256:" + hashlib.sha256(array.tobytes()).hexdigest(),
                                  "shape": [4], "dtype": "int32"}
    assert described["nested"] == {"1": [0.25, [2, "y"]]}
    assert described["fn"] == {"callable": on_step.__qualname__}
    assert described["other"] == {"repr": "(1+2j)"}
    assert _describe(np.arange(6)[::2]) == _describe(np.array([0, 2, 4]))  # by contents, not memory layout
    weights = torch.ones(2, requires_grad=True)
    assert _describe(weights) == _describe(torch.ones(2))
    assert _describe(functools.partial(print)) == {"callable": "partial"}  # no __qualname__: the type's name
    json.dumps(described)


def test_progress_bar_is_set_and_restored():
    class Pipe:
        def __init__(self):
            self._progress_bar_config = {"desc": "x", "disable": False}

        def set_progress_bar_config(self, **kwargs):
            self._progress_bar_config = kwargs

    pipe = Pipe()
    for enabled in (False, True):
        with _progress_bar(pipe, enabled):
            assert pipe._progress_bar_config == {"desc": "x", "disable": not enabled}
        assert pipe._progress_bar_config == {"desc": "x", "disable": False}
    bare = Pipe()
    del bare._progress_bar_config
    with _progress_bar(bare, True):
        assert bare._progress_bar_config == {"disable": False}
    assert bare._progress_bar_config == {}


# =============================================================================================
# toy metrics on hand-made images
# =============================================================================================
BLACK = (0.0, 0.0, 0.0)


def canvas(size=32, rgb=BLACK):
    return np.broadcast_to(np.asarray(rgb, dtype=np.float32), (size, size, 3)).copy()


def paint(array, mask_or_slice, color):
    array[mask_or_slice] = world.COLORS[color]
    return array


def _component_sets(rows):
    mask = np.array([[c == "#" for c in row] for row in rows])
    return sorted(sorted(map(tuple, pixels_.tolist())) for pixels_ in metrics._components(mask))


def test_components_are_8_connected_in_every_direction_up_to_the_borders():
    assert _component_sets(["###"]) == [[(0, 0), (0, 1), (0, 2)]]  # horizontal
    assert _component_sets(["#", "#", "#"]) == [[(0, 0), (1, 0), (2, 0)]]  # vertical
    assert _component_sets(["#..", ".#.", "..#"]) == [[(0, 0), (1, 1), (2, 2)]]  # diagonal
    assert _component_sets(["..#", ".#.", "#.."]) == [[(0, 2), (1, 1), (2, 0)]]  # anti-diagonal
    # reached back up into row 0 and back into column 0
    assert _component_sets(["#...#", ".###."]) == [[(0, 0), (0, 4), (1, 1), (1, 2), (1, 3)]]
    assert _component_sets([".#", "#."]) == [[(0, 1), (1, 0)]]
    assert _component_sets([".##", "#..", ".#."]) == [[(0, 1), (0, 2), (1, 0), (2, 1)]]
    # touching the bottom and right borders; separate blobs stay separate
    assert _component_sets(["#.#", "..#", "#.#"]) == [[(0, 0)], [(0, 2), (1, 2), (2, 2)], [(2, 0)]]
    assert _component_sets(["...", "...", "..#"]) == [[(2, 2)]]
    assert _component_sets(["..."]) == []


def test_color_mask_radius():
    array = canvas(4)
    red = np.asarray(world.COLORS["red"], dtype=np.float32)
    array[0, 0] = red
    array[0, 1] = red + np.array([0.29, 0, 0], dtype=np.float32) * np.array([-1, 0, 0])
    array[0, 2] = red + np.array([0, 0.31, 0], dtype=np.float32)
    assert metrics.color_mask(array, "red")[0, :3].tolist() == [True, True, False]
    assert metrics.color_mask(array, "red")[1:].sum() == 0


def test_find_blobs_measures_real_blobs_largest_first():
    array = canvas()
    paint(array, (slice(8, 16), slice(4, 12)), "red")  # 8x8 square
    paint(array, (slice(20, 30), slice(18, 28)), "red")  # 10x10 square
    paint(array, (slice(0, 2), slice(28, 30)), "red")  # 2x2: too small
    blobs = metrics.find_blobs(array, "red")
    assert [b.area for b in blobs] == [100, 64]
    big, small = blobs
    assert big.box == [18 / 32, 20 / 32, 28 / 32, 30 / 32] and small.box == [4 / 32, 8 / 32, 12 / 32, 16 / 32]
    assert small.fill == 1.0 and small.shape == "square" and small.color == "red" and small.shape_score == 1.0
    assert metrics.find_blobs(array, "cyan") == []
    # the same from a PIL image and a [3, H, W] tensor
    as_pil = Image.fromarray((array * 255).round().astype(np.uint8))
    assert [b.box for b in metrics.find_blobs(as_pil, "red")] == [big.box, small.box]
    assert [b.area for b in metrics.find_blobs(torch.from_numpy(array).permute(2, 0, 1), "red")] == [100, 64]


def test_find_blobs_thresholds_and_8_connectivity():
    # 3x3 bounding box with 6 pixels: area 6, sides 3, fill 0.67 -> real; 5 pixels -> too small
    block = canvas()
    for y, x in [(2, 2), (2, 3), (2, 4), (3, 2), (3, 3), (4, 4)]:  # 3x3 box, 6 pixels, 8-connected
        paint(block, (y, x), "lime")
    found = metrics.find_blobs(block, "lime")
    assert len(found) == 1 and found[0].area == 6 and math.isclose(found[0].fill, 6 / 9)
    block[4, 4] = BLACK
    assert metrics.find_blobs(block, "lime") == []  # 5 pixels
    # sides: 2 rows high is too thin however long
    thin = paint(canvas(), (slice(2, 4), slice(2, 12)), "lime")
    assert metrics.find_blobs(thin, "lime") == []
    thin3 = paint(canvas(), (slice(2, 5), slice(2, 12)), "lime")
    assert len(metrics.find_blobs(thin3, "lime")) == 1
    # fill: exactly 0.35 is enough, below is not (a 4x5 box)
    sparse = canvas()
    cells = [(0, 0), (1, 1), (2, 2), (3, 3), (3, 4), (2, 4), (0, 1)]  # 7 pixels in a 4x5 box, 8-connected
    for y, x in cells:
        paint(sparse, (y + 5, x + 5), "cyan")
    found = metrics.find_blobs(sparse, "cyan")
    assert len(found) == 1 and found[0].fill == 0.35 and found[0].area == 7
    sparse[5, 6] = BLACK
    assert metrics.find_blobs(sparse, "cyan") == []  # 6 / 20 = 0.3
    # two squares touching only at a corner are one blob
    corner = paint(paint(canvas(), (slice(2, 6), slice(2, 6)), "red"), (slice(6, 10), slice(6, 10)), "red")
    found = metrics.find_blobs(corner, "red")
    assert len(found) == 1 and found[0].area == 32 and found[0].box == [2 / 32, 2 / 32, 10 / 32, 10 / 32]
    # at 64 px the thresholds scale with the image (area >= 24, sides >= 6): 5x5 is too small there, 6x6 is real
    big = paint(canvas(64), (slice(2, 7), slice(2, 7)), "red")
    assert metrics.find_blobs(big, "red") == []
    big = paint(canvas(64), (slice(2, 8), slice(2, 8)), "red")
    assert [b.area for b in metrics.find_blobs(big, "red")] == [36]
    narrow = paint(canvas(64), (slice(2, 7), slice(2, 40)), "red")  # 5 px high
    assert metrics.find_blobs(narrow, "red") == []
    tall = paint(canvas(), (slice(2, 20), slice(20, 22)), "red")  # 2 px wide, far from the left edge
    assert metrics.find_blobs(tall, "red") == []
    holed = paint(canvas(64), (slice(2, 8), slice(2, 8)), "red")
    holed[4:8, 4:8] = BLACK  # 6x6 box with 20 pixels: under 24 at 64 px
    assert metrics.find_blobs(holed, "red") == []
    # at 128 px: area >= 96 (16 x MIN_AREA), sides >= 12
    big = paint(canvas(128), (slice(10, 22), slice(10, 22)), "red")
    big[15:22, 15:22] = BLACK  # 144 - 49 = 95 pixels in a 12x12 box
    assert metrics.find_blobs(big, "red") == []
    big[15, 15] = world.COLORS["red"]  # 96 pixels, still one blob
    assert [b.area for b in metrics.find_blobs(big, "red")] == [96]
    sparse64 = paint(canvas(64), (slice(2, 6), slice(2, 8)), "red")  # 4 rows: area 24 but too thin
    assert metrics.find_blobs(sparse64, "red") == []
    line = canvas(64)
    line[2:8, 2:8][np.eye(6, dtype=bool)] = world.COLORS["red"]  # 6x6 box, area 6: too small at 64 px
    assert metrics.find_blobs(line, "red") == []


@pytest.mark.parametrize("shape", world.SHAPES)
def test_find_blobs_recognises_each_shape(shape):
    box = [0.2, 0.25, 0.8, 0.85]
    alpha = world.sprite_alpha(torch.tensor([[world.SHAPES.index(shape)]]), torch.tensor([[box]]), 40, 40)[0, 0]
    array = canvas(40)
    paint(array, (alpha >= 0.5).numpy(), "magenta")
    blobs = metrics.find_blobs(array, "magenta")
    assert len(blobs) == 1 and blobs[0].shape == shape and 0.9 < blobs[0].shape_score <= 1.0
    templates = metrics._shape_templates((8, 10, 32, 34), 40, 40)
    assert templates.shape == (4, 40, 40) and templates.dtype == bool
    assert templates[0].sum() == 24 * 24 and templates[0][10:34, 8:32].all()


def test_find_subject():
    array = canvas()
    paint(array, (slice(2, 8), slice(2, 8)), "red")  # small, top left
    paint(array, (slice(16, 28), slice(16, 28)), "red")  # large, bottom right
    assert metrics.find_subject(array, "red square", [0.0, 0.0, 0.3, 0.3]).area == 36
    assert metrics.find_subject(array, world.Sprite("circle", "red"), [0.5, 0.5, 0.9, 0.9]).area == 144
    assert metrics.find_subject(array, "red square", None).area == 144  # no box: the largest
    assert metrics.find_subject(array, "red square", [0.3, 0.0, 0.45, 0.1]).area == 144  # no overlap: the largest
    assert metrics.find_subject(array, "cyan square", [0, 0, 1, 1]) is None


def test_classify_background_by_the_median_outside_the_boxes():
    for index, name in enumerate(world.BACKGROUNDS):
        image = world.render_backgrounds(torch.tensor([index]), 32, 32, torch.Generator().manual_seed(7))[0]
        assert metrics.classify_background(image) == name
        covered = image.clone()
        covered[:, :, :24] = torch.tensor(world.COLORS["red"]).view(3, 1, 1)  # 3/4 of the image red
        assert metrics.classify_background(covered, [[0.0, 0.0, 0.75, 1.0]]) == name
        assert metrics.classify_background(covered, [[0.0, 0.0, 0.74, 1.0]]) in (name, None)
    grass = world.render_backgrounds(torch.tensor([0]), 32, 32, torch.Generator().manual_seed(7))[0]
    red = grass.clone()
    red[:, :, :] = torch.tensor(world.COLORS["red"]).view(3, 1, 1)
    assert metrics.classify_background(red) is None
    # boxes covering (nearly) everything: judged on the whole image
    assert metrics.classify_background(grass, [[0.0, 0.0, 1.0, 1.0]]) == "grass"
    assert metrics.classify_background(red, [[0.0, 0.0, 1.0, 1.0]]) is None
    rng = np.random.default_rng(0)
    assert metrics.classify_background(rng.random((32, 32, 3)).astype(np.float32)) is None


def test_classify_background_masks_exactly_the_boxes():
    grass = metrics._background_medians()[0].astype(np.float32)
    red = np.asarray(world.COLORS["red"], dtype=np.float32)
    left = canvas(32, grass)
    left[:, 16:] = red
    assert metrics.classify_background(left, [[0.5, 0.0, 1.0, 1.0]]) == "grass"
    top = canvas(32, grass)
    top[16:, :] = red
    assert metrics.classify_background(top, [[0.0, 0.5, 1.0, 1.0]]) == "grass"
    # 16 pixels outside the boxes are enough to judge by
    strip = canvas(16, red)
    strip[15, :] = grass
    assert metrics.classify_background(strip, [[0.0, 0.0, 1.0, 15 / 16]]) == "grass"
    assert metrics.classify_background(strip) is None


def test_classify_background_needs_agreeing_pixels():
    medians = metrics._background_medians()
    assert medians.shape == (len(world.BACKGROUNDS), 3)
    # the median is exactly the reference, but half the pixels are far from it: 50 % is enough, 49 % is not
    reference = medians[0]
    array = np.broadcast_to(reference, (32, 32, 3)).copy().astype(np.float32)
    far = np.clip(reference + np.array([0.5, -0.5, 0.5]), 0, 1)
    flat = array.reshape(-1, 3)
    flat[: 512 - 1] = far  # 511 far, 513 agreeing -> median is the reference
    assert metrics.classify_background(array) == world.BACKGROUNDS[0]
    flat[: 512 + 2] = far  # most far: the median is far, no background
    assert metrics.classify_background(array) != world.BACKGROUNDS[0]
    # the median is the reference but no pixel is near it: no background; exactly half near it: enough
    shift = np.array([0.35, 0.0, 0.0], dtype=np.float32)
    spread = np.concatenate([np.tile(reference + shift, (512, 1)), np.tile(reference - shift, (512, 1))])
    assert np.allclose(np.median(spread, axis=0), reference)
    assert metrics.classify_background(spread.reshape(32, 32, 3).astype(np.float32)) is None
    half = np.concatenate([np.tile(reference, (512, 1)), np.tile(reference + 2 * shift, (256, 1)),
                           np.tile(reference - 2 * shift, (256, 1))])
    assert metrics.classify_background(half.reshape(32, 32, 3).astype(np.float32)) == world.BACKGROUNDS[0]


def test_fidelity_counts_smooth_4x4_patches():
    assert metrics.fidelity(canvas(8, (0.3, 0.4, 0.5))) == 1.0
    checker = np.indices((8, 8)).sum(0) % 2
    noisy = np.repeat(checker[:, :, None], 3, axis=2).astype(np.float32)
    assert metrics.fidelity(noisy) == 0.0
    half = canvas(8, (0.5, 0.5, 0.5))
    half[:4, :4] = noisy[:4, :4]
    assert metrics.fidelity(half) == 0.75
    # 12 of 16 pixels close to the median is smooth; 11 is not (per channel, within 0.1)
    patch = canvas(4, (0.5, 0.5, 0.5))
    patch.reshape(16, 3)[:4, 1] = 0.9
    assert metrics.fidelity(patch) == 1.0
    patch.reshape(16, 3)[4, 1] = 0.9
    assert metrics.fidelity(patch) == 0.0
    close = canvas(4, (0.5, 0.5, 0.5))
    close.reshape(16, 3)[:6, 2] = 0.59  # within the radius
    assert metrics.fidelity(close) == 1.0
    # only whole 4x4 patches count: a 10x9 image has 2x2 patches; the rest is ignored
    odd = np.ones((10, 9, 3), dtype=np.float32) * 0.5
    odd[8:, :] = 0.0
    odd[:, 8:] = 1.0
    odd[0:4, 0:4] = noisy[:4, :4]
    assert metrics.fidelity(odd) == 0.75


def test_fidelity_per_patch_on_non_square_images():
    two = np.concatenate([np.zeros((4, 4, 3)), np.ones((4, 8, 3))], axis=1).astype(np.float32)  # 4x12: 3 patches
    assert metrics.fidelity(two) == 1.0  # each patch is flat around its own median
    tall = np.zeros((12, 4, 3), dtype=np.float32)
    tall[4:8] = np.indices((4, 4)).sum(0)[:, :, None] % 2
    assert math.isclose(metrics.fidelity(tall), 2 / 3)


def test_artefact_energy_exact():
    checker = np.repeat((np.indices((6, 6)).sum(0) % 2)[:, :, None], 3, axis=2).astype(np.float32)
    assert metrics.artefact_energy(checker) == 1.0
    assert metrics.artefact_energy(canvas(6, (0.2, 0.7, 0.1))) == 0.0
    ramp = np.broadcast_to(np.linspace(0, 1, 6, dtype=np.float32)[None, :, None], (6, 6, 3)).copy()
    assert metrics.artefact_energy(ramp) < 1e-12
    one = np.zeros((2, 2, 3), dtype=np.float32)
    one[0, 0, 0] = 1.0  # one window, one channel: ((1 - 0 - 0 + 0) / 2)^2 = 0.25, mean over 3 channels
    assert math.isclose(metrics.artefact_energy(one), 0.25 / 3, rel_tol=1e-6)


def test_as_array_conversions():
    uint8 = np.full((2, 2, 3), 255, dtype=np.uint8)
    assert np.array_equal(metrics._as_array(uint8), np.ones((2, 2, 3)))
    assert metrics._as_array(np.full((2, 2, 3), 0.5)).max() == 0.5  # already in [0, 1]
    dark = np.zeros((1, 2, 3), dtype=np.uint8)
    dark[0, 0] = 2  # an 8-bit image whose brightest pixel is 2/255
    assert np.allclose(metrics._as_array(dark)[0, 0], 2 / 255)
    assert metrics._as_array(np.ones((1, 1, 3), dtype=np.uint8)).max() == 1.0  # max 1: read as [0, 1] already
    hwc = torch.full((2, 2, 3), 2.0)
    assert metrics._as_array(hwc).max() == 1.0 and metrics._as_array(hwc).shape == (2, 2, 3)
    chw = torch.zeros(3, 2, 5)
    chw[0] = -1
    assert metrics._as_array(chw).shape == (2, 5, 3) and metrics._as_array(chw).min() == 0.0
    assert np.allclose(metrics._as_array(Image.new("L", (2, 1), 51)), 0.2) and metrics._as_array(
        Image.new("L", (2, 1), 51)).shape == (1, 2, 3)


def test_dominant_color():
    array = canvas(10)
    paint(array, (slice(0, 2), slice(0, 5)), "red")  # 10 red
    paint(array, (slice(2, 3), slice(0, 5)), "cyan")  # 5 cyan
    paint(array, (slice(5, 10), slice(5, 10)), "lime")  # 25 lime, outside the box
    assert metrics.dominant_color(array, [0.0, 0.0, 0.5, 0.5]) == "red"
    assert metrics.dominant_color(array, [0.0, 0.2, 0.5, 0.5]) == "cyan"
    assert metrics.dominant_color(array, [0.0, 0.0, 1.0, 1.0]) == "lime"
    assert metrics.dominant_color(array, [0.0, 0.4, 0.4, 0.5]) is None
    # an empty box still looks at one pixel (rounded corner)
    assert metrics.dominant_color(array, [0.72, 0.72, 0.72, 0.72]) == "lime"
    assert metrics.dominant_color(array, [0.04, 0.04, 0.04, 0.04]) == "red"
    assert metrics._pixel_box([0.25, 0.15, 0.75, 0.96], 10, 20) == (5, 2, 15, 10)
    corner = canvas(4)
    corner[0, 0] = world.COLORS["cyan"]
    corner[1, 0] = corner[0, 1] = world.COLORS["red"]
    assert metrics.dominant_color(corner, [0.0, 0.0, 0.0, 0.0]) == "cyan"  # exactly one pixel, not its neighbours


def _overlap_case(priorities, boxes=None):
    boxes = boxes or [[0.0, 0.0, 0.6, 0.6], [0.4, 0.4, 1.0, 1.0]]
    return world.Case(background="grass", prompt="a photo", sprites=[world.Sprite("square", "red"),
                                                                      world.Sprite("square", "cyan")],
                      boxes=boxes, seed=0, priorities=priorities)


def _overlap_region(case) -> np.ndarray:
    """The pixels (20 x 20) where both squares of a two-subject `_overlap_case` cover at least half."""
    region = world.sprite_alpha(torch.tensor([[0, 0]]), torch.tensor([case.boxes]), 20, 20)[0].numpy() >= 0.5
    return region[0] & region[1]


def test_overlap_ownership_on_hand_painted_overlaps():
    region = (slice(8, 12), slice(8, 12))  # both 20x20 squares cover pixels 8..11 at 20 px
    case = _overlap_case([1, 0])
    subjects = [{"shape_pred": "square"}, {"shape_pred": "square"}]
    array = canvas(20)
    paint(array, region, "red")
    (result,) = metrics.overlap_ownership(array, case, subjects)
    assert result == {"top": 0, "bottom": 1, "top_listed_first": True, "pixels": 16, "top_share": 1.0,
                      "bottom_share": 0.0, "color_owned": True, "owned": True}
    assert metrics.overlap_ownership(array, case, [{"shape_pred": "circle"}, subjects[1]])[0]["owned"] is False
    # the other subject on top: it does not own what is painted red
    (result,) = metrics.overlap_ownership(array, _overlap_case([0, 1]), subjects)
    assert (result["top"], result["bottom"], result["top_listed_first"]) == (1, 0, False)
    assert result["top_share"] == 0.0 and result["bottom_share"] == 1.0 and not result["color_owned"]
    # a tie in pixels is not owning; under OWN_MIN_SHARE of the region is not owning either
    tie = canvas(20)
    tie[8:10, 8:12] = world.COLORS["red"]
    tie[10:12, 8:12] = world.COLORS["cyan"]
    (result,) = metrics.overlap_ownership(tie, case, subjects)
    assert result["top_share"] == 0.5 and result["bottom_share"] == 0.5 and not result["color_owned"]
    few = canvas(20)
    few[8, 8:12] = world.COLORS["red"]  # 4 of 16 = 0.25 < 0.3
    (result,) = metrics.overlap_ownership(few, case, subjects)
    assert result["top_share"] == 0.25 and not result["color_owned"] and not result["owned"]
    five = canvas(20)
    five[8, 8:12] = world.COLORS["red"]
    five[9, 8] = world.COLORS["red"]  # 5 of 16 = 0.3125 >= 0.3
    assert metrics.overlap_ownership(five, case, subjects)[0]["color_owned"]
    # no priorities, or overlaps under 4 pixels: nothing to judge
    assert metrics.overlap_ownership(array, _overlap_case(None), subjects) == []
    touching = _overlap_case([1, 0], [[0.0, 0.0, 0.55, 0.55], [0.45, 0.45, 1.0, 1.0]])  # 2x2 = 4 pixels at 20 px
    assert [r["pixels"] for r in metrics.overlap_ownership(array, touching, subjects)] == [4]
    apart = _overlap_case([1, 0], [[0.0, 0.0, 0.5, 0.5], [0.45, 0.45, 1.0, 1.0]])  # 1 pixel
    assert metrics.overlap_ownership(array, apart, subjects) == []
    # equal priorities: the later subject is drawn on top (as Case.paint_order)
    (result,) = metrics.overlap_ownership(array, _overlap_case([1, 1]), subjects)
    assert (result["top"], result["bottom"]) == (1, 0)
    # a pair without overlap does not stop the others from being judged
    three = world.Case(background="grass", prompt="a photo", sprites=[world.Sprite("square", c) for c in
                                                                      ("red", "cyan", "lime")],
                       boxes=[[0.0, 0.0, 0.6, 0.6], [0.7, 0.7, 1.0, 1.0], [0.4, 0.4, 1.0, 1.0]], seed=0,
                       priorities=[2, 0, 1])
    results = metrics.overlap_ownership(array, three, subjects + [{"shape_pred": "square"}])
    assert [(r["top"], r["bottom"]) for r in results] == [(0, 2), (2, 1)]
    # shares are rounded to 4 digits; OWN_MIN_SHARE is inclusive
    nine = _overlap_case([1, 0], [[0.0, 0.0, 0.55, 0.55], [0.4, 0.4, 1.0, 1.0]])
    region = _overlap_region(nine)
    assert region.sum() == 9
    painted = canvas(20)
    ys, xs = np.nonzero(region)
    painted[ys[0], xs[0]] = world.COLORS["red"]
    painted[ys[1], xs[1]] = world.COLORS["cyan"]
    (result,) = metrics.overlap_ownership(painted, nine, subjects)
    assert result["top_share"] == 0.1111 and result["bottom_share"] == 0.1111
    twenty = _overlap_case([1, 0], [[0.0, 0.0, 0.6, 0.6], [0.4, 0.35, 1.0, 0.95]])
    region = _overlap_region(twenty)
    assert region.sum() == 20
    painted = canvas(20)
    ys, xs = np.nonzero(region)
    painted[ys[:6], xs[:6]] = world.COLORS["red"]  # 6 of 20 = OWN_MIN_SHARE
    (result,) = metrics.overlap_ownership(painted, twenty, subjects)
    assert result["top_share"] == 0.3 and result["color_owned"]


def _score(subjects, detections=(), background=True, fidelity=1.0, artefact=0.0, overlaps=None):
    score = {"subjects": subjects, "detections": list(detections), "background": background, "fidelity": fidelity,
             "artefact": artefact}
    if overlaps is not None:
        score["overlaps"] = overlaps
    return score


def _subject(name="red square", iou=1.0, placed=True, shape="square", identity=True, target=(0.0, 0.0, 0.5, 0.5)):
    return {"sprite": name, "iou": iou, "placed": placed, "shape_pred": shape, "identity": identity,
            "target": list(target)}


def test_average_precision_with_colours_as_classes():
    truth = _subject("red square", target=(0.0, 0.0, 0.5, 0.5))
    hit = {"color": "red", "box": [0.0, 0.0, 0.5, 0.5], "score": 0.9}
    assert metrics.average_precision([_score([truth], [hit])]) == 1.0
    assert metrics.average_precision([_score([truth], [])]) == 0.0
    assert metrics.average_precision([]) == 0.0  # no truth at all: NaN becomes 0
    wrong_colour = dict(hit, color="cyan")
    assert metrics.average_precision([_score([truth], [wrong_colour])]) == 0.0
    shifted = dict(hit, box=[0.0, 0.0, 0.5, 0.3])  # IoU 0.6
    assert metrics.average_precision([_score([truth], [shifted])]) == 1.0
    assert metrics.average_precision([_score([truth], [shifted])], iou_threshold=0.7) == 0.0
    half = metrics.average_precision([_score([truth], [hit]), _score([_subject("cyan circle")], [])])
    assert half == 0.5  # red: 1, cyan: 0


def test_summarize_aggregates_exactly():
    scores = [
        _score([_subject(iou=1.0), _subject("cyan circle", iou=0.2, placed=False, shape=None, identity=False)],
               [{"color": "red", "box": [0.0, 0.0, 0.5, 0.5], "score": 1.0}], background=True, fidelity=0.5,
               artefact=0.01, overlaps=[{"owned": True, "color_owned": True}]),
        _score([_subject(iou=0.8, shape="circle", identity=False)], [], background=False, fidelity=1.0, artefact=0.03,
               overlaps=[{"owned": False, "color_owned": True}]),
        _score([_subject(iou=0.6)], [], background=False, fidelity=0.0, artefact=0.02),
    ]
    summary = metrics.summarize(scores, bootstrap=0)
    assert summary["cases"] == 3 and summary["subjects"] == 4
    means = {k: v["mean"] for k, v in summary.items() if isinstance(v, dict)}
    assert means == {
        "iou": round((1.0 + 0.2 + 0.8 + 0.6) / 4, 4), "placed": 0.75, "identity": round(2 / 3, 4),
        "shape": round(2 / 3, 4), "background": round(1 / 3, 4), "all_placed": round(2 / 3, 4),
        "ap50": round(34 / 101 / 2, 4), "fidelity": 0.5, "artefact": 0.02, "overlap_owned": 0.5, "overlap_color_owned": 1.0,
    }
    assert all(v["ci95"] == [v["mean"], v["mean"]] for v in summary.values() if isinstance(v, dict))
    # without overlaps there is no overlap entry; nothing placed: identity is NaN
    plain = metrics.summarize([_score([_subject(placed=False)])], bootstrap=50)
    assert "overlap_owned" not in plain and math.isnan(plain["identity"]["mean"])
    assert plain["placed"] == {"mean": 0.0, "ci95": [0.0, 0.0]}  # one case: no bootstrap


def test_summarize_bootstrap_cis():
    values = np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0])
    scores = [_score([_subject(iou=v)], fidelity=v) for v in values]
    summary = metrics.summarize(scores, bootstrap=200, seed=1)
    assert summary == metrics.summarize(scores, bootstrap=200, seed=1)  # seeded
    low, high = summary["iou"]["ci95"]
    assert 0.0 <= low < summary["iou"]["mean"] == 0.375 < high <= 1.0
    # the CI is the 2.5 / 97.5 percentiles of the bootstrap means, reproduced by hand
    rng = np.random.default_rng(1)
    means = [values[rng.integers(0, 8, 8)].mean() for _ in range(200)]
    assert [low, high] == [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])]
    assert summary["fidelity"]["ci95"] == [low, high]
    # AP is a point estimate: its "CI" is the point, also where resampling would move it
    hit = {"color": "red", "box": [0.0, 0.0, 0.5, 0.5], "score": 1.0}
    mixed = [_score([_subject()], [hit]), _score([_subject()], []), _score([_subject()], [hit])]
    ap = metrics.summarize(mixed, bootstrap=50)["ap50"]
    assert 0 < ap["mean"] < 1 and ap["ci95"] == [ap["mean"], ap["mean"]]
    assert metrics.summarize(scores) == metrics.summarize(scores, bootstrap=200, seed=0)  # the defaults
    assert metrics.summarize(scores, bootstrap=200, seed=2)["iou"]["ci95"] != [low, high]
    # two cases are enough to resample
    pair = metrics.summarize([_score([_subject(iou=0.0)]), _score([_subject(iou=1.0)])], bootstrap=100)
    assert pair["iou"]["mean"] == 0.5 and pair["iou"]["ci95"] == [0.0, 1.0]


def test_score_case_reports_each_subject_and_the_image():
    case = world.make_case(2, seed=5)
    image = case.render(64)
    score = metrics.score_case(image, case)
    array = metrics._as_array(image)
    assert len(score["subjects"]) == 2
    for subject, sprite, box in zip(score["subjects"], case.sprites, case.boxes):
        target = world.inscribed_box(box, 64, 64)
        blob = metrics.find_subject(array, sprite, target)
        assert subject["sprite"] == sprite.name and subject["box"] == box
        assert subject["target"] == [round(v, 4) for v in target]
        assert subject["short_side"] == round(min(box[2] - box[0], box[3] - box[1]), 4)
        assert subject["detected_box"] == [round(v, 4) for v in blob.box]
        assert subject["iou"] == metrics.box_iou(blob.box, target) and subject["iou"] >= 0.5 and subject["placed"]
        assert subject["shape_pred"] == sprite.shape and subject["color_pred"] == sprite.color and subject["identity"]
    assert score["background_pred"] == case.background and score["background"] is True
    expected = [{"color": c, "box": b.box, "score": b.shape_score * min(1.0, b.fill / 0.5)}
                for c in world.COLOR_NAMES for b in metrics.find_blobs(array, c)]
    assert score["detections"] == expected and len(expected) >= 2
    assert score["overlaps"] == [] and score["fidelity"] == metrics.fidelity(array)
    assert score["artefact"] == metrics.artefact_energy(array)
    # nothing drawn: nothing detected, placed or identified
    empty = metrics.score_case(canvas(64), case)
    for subject in empty["subjects"]:
        assert (subject["detected_box"], subject["iou"], subject["placed"], subject["shape_pred"], subject["identity"],
                subject["color_pred"]) == (None, 0.0, False, None, False, None)
    assert empty["detections"] == [] and empty["background_pred"] is None and empty["background"] is False
    # a wrong shape in the right place and colour: placed, but not the same identity
    sprite, box = case.sprites[0], case.boxes[0]
    other = next(s for s in world.SHAPES if s != sprite.shape)
    wrong = world.render_scene(case.background, [(world.Sprite(other, sprite.color), box)], size=64, seed=case.seed)
    first = metrics.score_case(wrong, case)["subjects"][0]
    assert first["placed"] and first["shape_pred"] == other and first["color_pred"] == sprite.color
    assert first["identity"] is False


def test_score_case_judges_each_subject_in_its_own_box():
    third = [0.1, 0.2, 0.7, 0.2 + 1 / 3]  # wide: the short side is the height, 1/3
    red = world.Sprite("square", "red")
    case = world.Case(background="grass", prompt="a photo", sprites=[red], boxes=[third], seed=0)
    decoy = [0.55, 0.55, 1.0, 1.0]  # a larger blob of the same colour elsewhere
    image = world.render_scene("grass", [(red, third), (red, decoy)], size=64, seed=0)
    (subject,) = metrics.score_case(image, case)["subjects"]
    assert subject["short_side"] == round(1 / 3, 4)
    assert subject["placed"] and metrics.box_iou(subject["detected_box"], subject["target"]) > 0.5
    # a subject covering most of the image: the background is judged outside its box
    large = world.Case(background="grass", prompt="a photo", sprites=[red], boxes=[[0.0, 0.0, 1.0, 0.85]], seed=0)
    score = metrics.score_case(large.render(64), large)
    assert score["background_pred"] == "grass"
    assert metrics.classify_background(large.render(64)) is None  # judged on the whole image it is not grass


def test_score_case_scores_detections_and_overlaps():
    case = world.Case(background="sand", prompt="a photo",
                      sprites=[world.Sprite("triangle", "red"), world.Sprite("square", "cyan")],
                      boxes=[[0.05, 0.05, 0.55, 0.55], [0.3, 0.3, 0.8, 0.8]], seed=0, priorities=[0, 1])
    image = case.render(64)
    score = metrics.score_case(image, case)
    array = metrics._as_array(image)
    triangle = metrics.find_blobs(array, "red")[0]  # partly under the square: less than half its box
    assert triangle.fill < 0.5
    detection = next(d for d in score["detections"] if d["color"] == "red")
    assert detection["score"] == triangle.shape_score * triangle.fill / 0.5  # a thin blob scores less
    assert score["overlaps"] == metrics.overlap_ownership(array, case, score["subjects"])
    (overlap,) = score["overlaps"]
    assert overlap["top"] == 1 and overlap["color_owned"] and overlap["owned"]
