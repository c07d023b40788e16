import math

import numpy as np
import pytest
import torch
from PIL import Image

from anyms_core.layout import (
    GridLayout, Subject, box_to_cells, level_grid, load_reference_image, paint_order, round_half_up, validate_subjects,
)
from anyms_core.testing import random_reference_image as reference_image


def test_round_half_up_is_not_bankers_rounding():
    assert [round_half_up(v) for v in (0.5, 1.5, 2.5, 3.5)] == [1, 2, 3, 4]
    assert [round(v) for v in (0.5, 2.5)] == [0, 2]  # what we must not use


@pytest.mark.parametrize("latent", [(8, 8), (9, 15), (114, 143), (145, 112), (37, 53), (1, 1)])
def test_level_grid_follows_ceil_halving(latent):
    height, width = latent
    for level in range(5):
        h, w = math.ceil(height / 2**level), math.ceil(width / 2**level)
        assert level_grid(height, width, h * w) == (h, w)


def test_level_grid_rejects_foreign_lengths():
    with pytest.raises(ValueError, match="No UNet level"):
        level_grid(9, 15, 77)


def test_box_cells_round_consistently_and_keep_one_cell():
    assert box_to_cells([0.0, 0.0, 1.0, 1.0], 8, 16) == (0, 8, 0, 16)
    assert box_to_cells([0.25, 0.5, 0.75, 1.0], 4, 4) == (2, 4, 1, 3)
    # a box thinner than a cell keeps one cell, also at the far edge
    assert box_to_cells([0.5, 0.5, 0.51, 0.51], 2, 2) == (1, 2, 1, 2)
    assert box_to_cells([0.99, 0.99, 1.0, 1.0], 4, 4) == (3, 4, 3, 4)
    # half a cell rounds up (0.125 * 4 = 0.5 -> 1)
    assert box_to_cells([0.125, 0.125, 0.375, 0.375], 4, 4) == (1, 2, 1, 2)


def test_grid_layout_owner_follows_priority():
    boxes = [[0.0, 0.0, 0.75, 0.75], [0.25, 0.25, 1.0, 1.0]]
    later_wins = GridLayout.build(boxes, [0, 1], 4, 4).owner.view(4, 4)
    first_wins = GridLayout.build(boxes, [1, 0], 4, 4).owner.view(4, 4)
    assert later_wins[1, 1] == 1 and first_wins[1, 1] == 0
    assert later_wins[0, 0] == 0 and later_wins[3, 3] == 1
    assert later_wins[0, 3] == -1 and later_wins[3, 0] == -1


def test_paint_order_rules():
    image = reference_image(0)
    big, small = Subject(image, [0, 0, 1, 1]), Subject(image, [0.4, 0.4, 0.6, 0.6])
    assert paint_order([small, big], "order") == [0, 1]  # later wins
    assert paint_order([small, big], "area") == [1, 0]  # smaller painted last, so it wins
    explicit = [Subject(image, [0, 0, 1, 1], priority=5), Subject(image, [0, 0, 1, 1], priority=1)]
    assert paint_order(explicit) == [1, 0]
    # priority on some subjects only: the others have priority 0 and the rule orders equal priorities
    partial = [Subject(image, [0, 0, 1, 1], priority=1), small, big]
    assert paint_order(partial, "order") == [1, 2, 0]
    assert paint_order(partial, "area") == [2, 1, 0]
    below = [Subject(image, [0, 0, 1, 1], priority=-1), big]
    assert paint_order(below) == [0, 1]
    with pytest.raises(ValueError, match="priority rule"):
        paint_order([big], "size")


@pytest.mark.parametrize("box, message", [
    ([0, 0, 1.2, 1], "outside"), ([-0.1, 0, 1, 1], "outside"), ([0.5, 0, 0.5, 1], "empty"),
    ([0.6, 0, 0.5, 1], "empty"), ([0, float("nan"), 1, 1], "finite"), ([0, 0, 1], "four numbers"), ("abcd", "four numbers"),
])
def test_bad_boxes_raise_value_errors(box, message):
    with pytest.raises(ValueError, match=message):
        Subject(reference_image(0), box)


def test_bad_subject_lists():
    with pytest.raises(ValueError, match="at least one subject"):
        validate_subjects([])
    image = reference_image(0)
    with pytest.raises(ValueError, match="single Subject"):
        validate_subjects(Subject(image, [0, 0, 1, 1]))
    with pytest.raises(ValueError, match="anyms_core.Subject"):
        validate_subjects([{"image": image, "box": [0, 0, 1, 1]}])


def test_images_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: becomes the white backdrop
    assert load_reference_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8))
    assert load_reference_image(palette).mode == "RGB"
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert load_reference_image(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert load_reference_image(np.zeros((8, 8, 3), dtype=np.float32)).mode == "RGB"
    path = tmp_path / "ref.png"
    reference_image(1).save(path)
    assert load_reference_image(path).size == (40, 40)


@pytest.mark.parametrize("image, message", [
    ("/no/such/file.png", "Cannot read"), (np.zeros((4, 4, 5), dtype=np.uint8), "shape"),
    (np.full((4, 4, 3), 2.0), r"\[0, 1\]"), (np.full((4, 4, 3), np.nan), "NaN"), (42, "PIL image"),
])
def test_unreadable_images_raise_value_errors(image, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        Subject(image, [0, 0, 1, 1])


def test_corrupt_file_raises_value_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Cannot read"):
        Subject(path, [0, 0, 1, 1])
