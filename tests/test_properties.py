"""Property-based tests (hypothesis): boxes, scales, numbers, image modes and sizes, and the BoxEditor's
inputs. Every value is either accepted exactly as meant or refused with a ValueError, never read wrongly."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anyms_core import ConfigError, RunConfig, Subject
from anyms_core.config import MAX_SEED, validate_box
from anyms_core.layout import box_to_cells, load_reference_image

SETTINGS = settings(max_examples=60, deadline=None, database=None,  # no .hypothesis folder in the checkout
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
unit = st.floats(0.0, 1.0, allow_nan=False)
anything = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def boxes(draw):
    x0, x1 = sorted(draw(st.lists(unit, min_size=2, max_size=2, unique=True)))
    y0, y1 = sorted(draw(st.lists(unit, min_size=2, max_size=2, unique=True)))
    return [x0, y0, x1, y1]


def config(**changes):
    return RunConfig.from_dict({"prompt": "p", "subjects": [{"box": [0, 0, 1, 1]}], **changes})


@SETTINGS
@given(boxes(), st.integers(1, 64), st.integers(1, 64))
def test_valid_boxes_are_kept_exactly_and_cover_at_least_one_cell(box, height, width):
    assert validate_box(box) == tuple(box)
    row0, row1, col0, col1 = box_to_cells(box, height, width)
    assert 0 <= row0 < row1 <= height and 0 <= col0 < col1 <= width


@SETTINGS
@given(st.lists(anything, min_size=4, max_size=4))
def test_any_four_floats_are_a_box_or_an_error(values):
    x0, y0, x1, y1 = values
    valid = all(math.isfinite(v) and 0 <= v <= 1 for v in values) and x0 < x1 and y0 < y1
    if valid:
        assert validate_box(values) == tuple(values)
    else:
        with pytest.raises(ConfigError):
            validate_box(values)


@SETTINGS
@given(st.one_of(st.text(max_size=8), st.binary(max_size=8), st.lists(st.text(max_size=2), min_size=4, max_size=4),
                 st.lists(st.booleans(), min_size=4, max_size=4), st.lists(unit, max_size=3), st.lists(unit, min_size=5, max_size=6),
                 st.none(), st.integers(), st.floats()))
def test_non_boxes_are_refused(value):
    with pytest.raises(ConfigError):
        validate_box(value)


@SETTINGS
@given(st.one_of(anything, st.lists(anything, min_size=1, max_size=3), st.text(max_size=4), st.binary(max_size=4),
                 st.booleans(), st.none()))
def test_scales_are_finite_non_negative_numbers_or_refused(scale):
    numbers_ = [scale] if isinstance(scale, float) else scale if isinstance(scale, list) else None
    ok = scale is None or (numbers_ is not None and len(numbers_) in (1, 3) and all(math.isfinite(v) and v >= 0 for v in numbers_))
    subjects = [{"box": [0, 0, 1, 1]}] * (len(scale) if isinstance(scale, list) and len(scale) == 3 else 1)
    build = lambda: RunConfig.from_dict({"prompt": "p", "subjects": subjects, "ip_adapter_scale": scale})  # noqa: E731
    if ok:
        built = build().ip_adapter_scale
        assert built == (None if scale is None else scale if isinstance(scale, float) else tuple(scale))
    else:
        with pytest.raises(ConfigError):
            build()


@SETTINGS
@given(st.integers(-(2**80), 2**80), st.integers(-5, 10**6))
def test_seeds_and_steps_are_checked_against_their_ranges(seed, steps):
    if 0 <= seed <= MAX_SEED and steps >= 1:
        built = config(seed=seed, steps=steps)
        assert (built.seed, built.steps) == (seed, steps)
    else:
        with pytest.raises(ConfigError):
            config(seed=seed, steps=steps)


def test_the_largest_seed_seeds_a_generator():
    import torch

    torch.Generator().manual_seed(config(seed=MAX_SEED).seed)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La", "RGBa"]


@SETTINGS
@given(st.sampled_from(MODES), st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**32 - 1))
def test_every_image_mode_and_size_becomes_rgb_of_the_same_size(mode, width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode) if mode not in ("I;16",) else Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257)
    loaded = load_reference_image(image)
    assert loaded.mode == "RGB" and loaded.size == (width, height)


@SETTINGS
@given(st.sampled_from(["uint8", "uint16", "float32", "float64"]), st.sampled_from([(), (1,), (3,), (4,)]),
       st.integers(1, 16), st.integers(1, 16), st.integers(0, 2**32 - 1))
def test_arrays_of_every_supported_layout_become_rgb(dtype, channels, height, width, seed):
    rng = np.random.default_rng(seed)
    shape = (height, width, *channels)
    array = rng.random(shape).astype(dtype) if dtype.startswith("float") else rng.integers(0, np.iinfo(dtype).max, shape).astype(dtype)
    loaded = load_reference_image(array)
    assert loaded.mode == "RGB" and loaded.size == (width, height)


@SETTINGS
@given(st.integers(0, 3), st.integers(0, 3))
def test_empty_images_are_refused(height, width):
    if height and width:
        assert load_reference_image(np.zeros((height, width, 3), dtype=np.uint8)).size == (width, height)
    else:
        with pytest.raises(ValueError, match="empty"):
            load_reference_image(np.zeros((height, width, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="empty"):
            Subject(Image.new("RGB", (width, height)), [0, 0, 1, 1])


# --- BoxEditor ------------------------------------------------------------------------------------------
anywidget = pytest.importorskip("anywidget")


def editor(n=3, **kwargs):
    from anyms_core.testing import random_reference_image
    from anyms_viz.widgets import BoxEditor

    return BoxEditor([Subject(random_reference_image(i, 8), [0.1 * i, 0.1, 0.1 * i + 0.3, 0.5], name=f"s{i}") for i in range(n)],
                     **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_size": -1}, "min_size"), ({"min_size": 0.5}, "min_size"), ({"min_size": float("nan")}, "finite"),
    ({"names": ["a", "b"]}, "takes \\['names'\\]"), ({"boxes": [None]}, "takes"), ({"display_width": 0}, "display_width"),
])
def test_box_editor_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        editor(**kwargs)


def test_box_editor_refuses_bad_assignments_and_keeps_every_subject():
    widget = editor()
    for assign, message in [
        (lambda: setattr(widget, "names", ["a", "b"]), "3 subjects, got 2 names"),
        (lambda: setattr(widget, "min_size", -1), "min_size"),
        (lambda: widget.set_box(1.5, [0, 0, 1, 1]), "index \\(an int\\)"),
        (lambda: widget.set_box(True, [0, 0, 1, 1]), "index \\(an int\\)"),
        (lambda: widget.set_box(0, "0011"), "four numbers"),
        (lambda: widget.set_box(0, b"0011"), "four numbers"),
        (lambda: setattr(widget, "boxes", [[0, 0, 1, 1]]), "got 1 boxes"),
        (lambda: setattr(widget, "aspect", float("nan")), "finite"),
    ]:
        before = (list(widget.names), [None if b is None else list(b) for b in widget.boxes], widget.min_size)
        with pytest.raises(ValueError, match=message):
            assign()
        assert (list(widget.names), [None if b is None else list(b) for b in widget.boxes], widget.min_size) == before
    assert len(widget.subjects()) == 3


@SETTINGS
@given(st.lists(st.tuples(st.integers(-1, 3), st.one_of(st.none(), boxes(), st.lists(anything, min_size=4, max_size=4))),
                max_size=8))
def test_box_editor_any_edit_sequence_keeps_one_valid_box_or_none_per_subject(edits):
    widget = editor()
    for index, box in edits:
        try:
            widget.set_box(index, box)
        except ValueError:
            pass
        assert len(widget.boxes) == len(widget.names) == 3
        assert all(b is None or validate_box(b) == tuple(b) for b in widget.boxes)
