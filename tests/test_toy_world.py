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
    assert a.shape == (32, 32, 3)
    assert (a == b).all()
    assert (a != c).any()  # the texture follows the seed


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("size", [32, (32, 64)])
def test_sprite_fills_exactly_its_box(shape, size):
    box = [0.25, 0.125, 0.75, 0.875]  # pixel-aligned at 32 px and at 64 px
    image = np.asarray(world.render_scene("plain", [(f"red {shape}", box)], size=size)).astype(float) / 255
    h, w = image.shape[:2]
    red = np.linalg.norm(image - np.array(world.COLORS["red"]), axis=-1) < 0.3
    ys, xs = np.nonzero(red)
    found = [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]
    tolerance = [1.5 / w, (3.5 if shape == "triangle" else 1.5) / h, 1.5 / w, 1.5 / h]  # a triangle's apex is thin
    assert all(abs(f - b) <= t for f, b, t in zip(found, box, tolerance)), (found, box)


def test_batch_renderer_matches_scene_renderer_and_switches_sprites_off():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.6], [0.5, 0.5, 0.9, 0.9]]])
    on = world.render_batch(torch.tensor([2]), torch.tensor([[0, 1]]), torch.tensor([[0, 3]]), boxes,
                            torch.tensor([[True, False]]), 32, 32, g)
    ref = world.render_scene("sand", [("red square", [0.1, 0.1, 0.6, 0.6])], seed=0)
    assert np.abs(np.asarray(world.to_pil(on[0])).astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_cases_are_seeded_non_overlapping_and_use_distinct_colours():
    for n in (1, 2, 3, 4, 5):
        cases = world.make_cases(n, 8, seed=0)
        again = world.make_cases(n, 8, seed=0)
        assert [c.boxes for c in cases] == [c.boxes for c in again]
        for case in cases:
            assert len(case.sprites) == len(case.boxes) == len(case.references) == n
            assert len({s.color for s in case.sprites}) == n
            assert case.prompt == world.DEFAULT_PROMPTS[case.background]
            for i, a in enumerate(case.boxes):
                assert 0 <= a[0] < a[2] <= 1 and 0 <= a[1] < a[3] <= 1
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
