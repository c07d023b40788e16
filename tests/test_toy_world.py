"""The toy world's renderer: determinism, box correctness, seeded held-out cases."""

import numpy as np
import pytest
import torch

from anyms_core.toy import world


def test_render_scene_is_deterministic_for_a_seed():
    subjects = [("red circle", [0.1, 0.1, 0.5, 0.6]), ("cyan cross", [0.55, 0.3, 0.95, 0.9])]
    a = np.asarray(world.render_scene("grass", subjects, seed=3))
    b = np.asarray(world.render_scene("grass", subjects, seed=3))
    c = np.asarray(world.render_scene("grass", subjects, seed=4))
    assert a.shape == (64, 64, 3)
    assert (a == b).all()
    assert (a != c).any()  # the texture follows the seed


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("size", [64, (32, 64)])
@pytest.mark.parametrize("box", [[0.25, 0.125, 0.75, 0.875], [0.125, 0.25, 0.875, 0.75], [0.25, 0.25, 0.75, 0.75]])
def test_sprite_is_inscribed_in_its_box_not_stretched(shape, size, box):
    image = np.asarray(world.render_scene("plain", [(f"red {shape}", box)], size=size)).astype(float) / 255
    h, w = image.shape[:2]
    red = np.linalg.norm(image - np.array(world.COLORS["red"]), axis=-1) < 0.3
    ys, xs = np.nonzero(red)
    found = [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]
    target = world.inscribed_box(box, h, w)
    assert abs((target[2] - target[0]) * w - (target[3] - target[1]) * h) < 1e-6  # a square in pixels
    assert target[0] >= box[0] and target[1] >= box[1] and target[2] <= box[2] and target[3] <= box[3]
    tolerance = [1.5 / w, (3.5 if shape == "triangle" else 1.5) / h, 1.5 / w, 1.5 / h]  # a triangle's apex is thin
    assert all(abs(f - t) <= tol for f, t, tol in zip(found, target, tolerance)), (found, target)


def test_shapes_keep_their_aspect_in_a_wide_box():
    """A circle in a 2:1 box is a circle (as wide as it is tall), not an ellipse."""
    image = np.asarray(world.render_scene("plain", [("red circle", [0.0, 0.25, 1.0, 0.75])], size=64)).astype(float) / 255
    red = np.linalg.norm(image - np.array(world.COLORS["red"]), axis=-1) < 0.3
    ys, xs = np.nonzero(red)
    assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 1


def test_batch_renderer_matches_scene_renderer_and_switches_sprites_off():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.6], [0.5, 0.5, 0.9, 0.9]]])
    on = world.render_batch(torch.tensor([2]), torch.tensor([[0, 1]]), torch.tensor([[0, 3]]), boxes,
                            torch.tensor([[True, False]]), 32, 32, g)
    ref = world.render_scene("sand", [("red square", [0.1, 0.1, 0.6, 0.6])], size=32, seed=0)
    assert np.abs(np.asarray(world.to_pil(on[0])).astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_cases_are_seeded_non_overlapping_and_use_distinct_colours():
    for n in (1, 2, 3, 4, 5, 6, 7):
        cases = world.make_cases(n, 8, seed=0)
        again = world.make_cases(n, 8, seed=0)
        assert [c.boxes for c in cases] == [c.boxes for c in again]
        for case in cases:
            assert len(case.sprites) == len(case.boxes) == len(case.references) == n
            assert len({s.color for s in case.sprites}) == min(n, len(world.COLOR_NAMES))
            assert case.prompt == world.DEFAULT_PROMPTS[case.background]
            for i, a in enumerate(case.boxes):
                assert 0 <= a[0] < a[2] <= 1 and 0 <= a[1] < a[3] <= 1
                assert min(a[2] - a[0], a[3] - a[1]) >= world.MIN_BOX_SIDE - 1e-4
                for b in case.boxes[i + 1:]:
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert world.make_cases(2, 5, seed=1)[0].boxes != world.make_cases(2, 5, seed=0)[0].boxes


def test_errors_are_loud():
    with pytest.raises(ValueError, match="unknown shape"):
        world.Sprite("hexagon", "red")
    with pytest.raises(ValueError, match="normalized"):
        world.render_scene("grass", [("red circle", [0.5, 0.5, 0.2, 0.9])])
    with pytest.raises(ValueError, match="unknown background"):
        world.render_scene("lava", [])


def test_overlap_cases_overlap_by_20_to_50_percent_with_explicit_priorities():
    for n in (2, 3):
        cases = world.make_cases(n, 40, seed=0, overlap=True)
        first = 0
        for case in cases:
            assert case.priorities is not None and len(set(case.priorities)) == n
            fractions = [world.overlap_fraction(a, b) for i, a in enumerate(case.boxes) for b in case.boxes[i + 1:]]
            overlapping = [f for f in fractions if f > 0]
            assert len(overlapping) == n - 1  # a chain
            assert all(world.OVERLAP_RANGE[0] <= f <= world.OVERLAP_RANGE[1] for f in overlapping)
            first += case.priorities[0] == max(case.priorities)
        assert first == len(cases) // 2  # the priority subject is listed first in half of the cases
        # the rendered scene paints the priority subject on top
        case = cases[0]
        assert case.paint_order()[-1] == case.priorities.index(max(case.priorities))


def test_named_prompts_use_only_vocabulary_words():
    sprites = [world.Sprite("triangle", "red"), world.Sprite("circle", "cyan")]
    prompt = world.named_prompt("night", sprites)
    assert prompt == "a photo of a red triangle and a cyan circle at night"
    assert set(prompt.split()) <= set(world.VOCABULARY_WORDS)
    assert world.named_prompt("grass", []) == "a photo on grass"
