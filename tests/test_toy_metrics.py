"""Metric calibration: rendered scenes score ~1 (the ceiling), pure noise ~0, empty backgrounds 0 placed; the
metrics' building blocks (components, holes, emblem shapes) against brute force and at every card size."""

import numpy as np
import pytest
import torch
from PIL import Image

from anyms_core.toy import metrics, world


def _means(scores):
    return {k: v["mean"] for k, v in metrics.summarize(scores, bootstrap=0).items() if isinstance(v, dict)}


def test_rendered_scenes_are_the_ceiling():
    for n in (2, 5, 7):
        cases = world.make_cases(n, 12, seed=0)
        m = _means([metrics.score_case(c.render(), c) for c in cases])
        assert m["placed"] == 1.0 and m["ap50"] == 1.0 and m["background"] == 1.0
        assert m["identity"] >= 0.95 and m["iou"] >= 0.8
        assert m["fidelity"] >= 0.7  # cards and emblems: edges everywhere (noise: 0)


def test_pure_noise_scores_near_zero():
    rng = np.random.default_rng(0)
    cases = world.make_cases(3, 12, seed=0)
    uniform = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in cases]
    gauss = [Image.fromarray((np.clip(0.5 + 0.5 * rng.standard_normal((64, 64, 3)), 0, 1) * 255).astype(np.uint8)) for _ in cases]
    for images in (uniform, gauss):
        m = _means([metrics.score_case(im, c) for im, c in zip(images, cases)])
        assert m["placed"] == 0.0 and m["ap50"] == 0.0 and m["background"] == 0.0
        assert m["iou"] < 0.02 and not m["identity"] > 0  # nothing placed: identity is undefined (nan)
        assert m["fidelity"] < 0.05
        assert m["artefact"] > 20 * _means([metrics.score_case(c.render(), c) for c in cases])["artefact"]


def test_empty_background_is_recognised_but_places_nothing():
    cases = world.make_cases(2, 6, seed=0)
    scores = [metrics.score_case(world.render_scene(c.background, [], seed=c.seed), c) for c in cases]
    m = _means(scores)
    assert m["background"] == 1.0 and m["placed"] == 0.0


def test_a_subject_in_the_wrong_box_is_found_but_not_placed():
    case = world.make_case(2, seed=5)
    swapped = world.render_scene(case.background, list(zip(case.sprites, case.boxes[::-1])), seed=case.seed)
    score = metrics.score_case(swapped, case)
    assert not any(s["placed"] for s in score["subjects"])
    assert all(s["detected_box"] is not None for s in score["subjects"])


def test_box_iou():
    assert metrics.box_iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == 1.0
    assert metrics.box_iou([0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]) == 0.0
    assert abs(metrics.box_iou([0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5]) - 1 / 3) < 1e-9


def test_overlap_ownership_follows_the_painting_order():
    """Rendered with the priority subject on top, it owns every overlap; painted the other way, none."""
    cases = world.make_cases(2, 12, seed=0, overlap=True) + world.make_cases(3, 12, seed=0, overlap=True)
    right = [metrics.score_case(c.render(), c) for c in cases]
    assert _means(right)["overlap_color_owned"] == 1.0
    wrong = []
    for c in cases:
        order = c.paint_order()[::-1]  # priority subject at the bottom
        subjects = c.subjects
        wrong.append(metrics.score_case(world.render_scene(c.background, [subjects[i] for i in order], seed=c.seed), c))
    assert _means(wrong)["overlap_color_owned"] == 0.0


def test_a_blend_of_two_subjects_is_not_owned():
    """What mask-only does in an overlap (a sum of both subjects) is owned by neither."""
    case = world.make_cases(2, 1, seed=0, overlap=True)[0]
    a = np.asarray(world.render_scene(case.background, [case.subjects[0]], seed=case.seed)).astype(float)
    b = np.asarray(world.render_scene(case.background, [case.subjects[1]], seed=case.seed)).astype(float)
    blend = Image.fromarray(((a + b) / 2).round().astype(np.uint8))
    score = metrics.score_case(blend, case)
    assert score["overlaps"] and not any(o["color_owned"] for o in score["overlaps"])


def test_artefact_energy_measures_the_2x2_alternating_pattern():
    flat = np.full((64, 64, 3), 0.5)
    checker = flat + 0.1 * ((np.indices((64, 64)).sum(0) % 2) * 2 - 1)[..., None]
    assert metrics.artefact_energy(flat) == 0.0
    assert abs(metrics.artefact_energy(checker) - 0.04) < 1e-6  # ((4 * 0.1) / 2)^2


# --------------------------------------------------------------------------------------------
# Connected components, holes and emblems against brute force
# --------------------------------------------------------------------------------------------
def _neighbours(diagonal):
    return [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx) and (diagonal or not (dy and dx))]


def _flood_fill(mask, diagonal):
    """Brute-force components: a breadth-first search from every unvisited pixel -> sorted pixel sets."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    components = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            queue, pixels = [(y, x)], []
            while queue:
                cy, cx = queue.pop()
                pixels.append((cy, cx))
                for dy, dx in _neighbours(diagonal):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            components.append(sorted(pixels))
    return sorted(components)


def _random_masks():
    for seed in range(6):
        rng = np.random.default_rng(seed)
        for density in (0.3, 0.5, 0.7):
            yield rng.random((int(rng.integers(1, 14)), int(rng.integers(1, 17)))) < density


@pytest.mark.parametrize("diagonal", [True, False])
def test_components_and_labels_match_a_flood_fill(diagonal):
    for mask in _random_masks():
        expected = _flood_fill(mask, diagonal)
        found = sorted(sorted(map(tuple, c.tolist())) for c in metrics._components(mask, diagonal))
        assert found == expected, mask.astype(int)
        labels = metrics._label(mask, diagonal)
        assert labels.shape == mask.shape and (labels[~mask] == 0).all() and (labels[mask] > 0).all()
        # one label per component, different components different labels
        assert len({int(labels[c[0]]) for c in expected}) == len(expected)
        assert all(len({int(labels[p]) for p in c}) == 1 for c in expected)


def _brute_enclosed(mask):
    """Pixels outside the mask from which no 4-connected path outside the mask reaches the image border."""
    h, w = mask.shape
    reached = np.zeros_like(mask)
    queue = [(y, x) for y in range(h) for x in range(w) if (y in (0, h - 1) or x in (0, w - 1)) and not mask[y, x]]
    for y, x in queue:
        reached[y, x] = True
    while queue:
        y, x = queue.pop()
        for dy, dx in _neighbours(False):
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and not mask[ny, nx] and not reached[ny, nx]:
                reached[ny, nx] = True
                queue.append((ny, nx))
    return ~mask & ~reached


def test_enclosed_matches_a_brute_force_definition():
    holes = 0
    for mask in _random_masks():
        found = metrics.enclosed(mask)
        assert found.dtype == bool and np.array_equal(found, _brute_enclosed(mask)), mask.astype(int)
        holes += int(found.sum())
    assert holes > 0  # the random masks do have holes


@pytest.mark.parametrize("side", [0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8])
@pytest.mark.parametrize("shape", world.SHAPES)
def test_emblem_shape_recognises_each_shape_at_every_card_size(shape, side):
    """Cards with box sides 0.2-0.8 of a 64 px image, at 16 sub-pixel offsets and three aspects: every
    emblem, painted hard-edged (each pixel it covers at least half of), is recognised."""
    long = min(1.25 * side, 0.9)
    for width, height in ((side, side), (long, side), (side, long)):  # the short side is `side`
        for fx in range(4):
            for fy in range(4):
                x0, y0 = (6 + fx / 4) / 64, (5 + fy / 4) / 64
                box = [x0, y0, x0 + width, y0 + height]
                array = np.zeros((64, 64, 3), dtype=np.float32)
                boxes = torch.tensor([[box]], dtype=torch.float32)
                card = world.card_alpha(boxes, 64, 64)[0, 0].numpy() >= 0.5
                shape_ids = torch.tensor([[world.SHAPES.index(shape)]])
                emblem = world.emblem_alpha(shape_ids, boxes, 64, 64)[0, 0].numpy() >= 0.5
                array[card] = world.COLORS["red"]
                array[emblem] = world.EMBLEM_RGB
                found, score, emblem_box = metrics.emblem_shape(array, metrics.color_mask(array, "red"), "red")
                assert found == shape, (box, found, score)
                target = world.emblem_box(box, 64, 64)
                tolerance = [1 / 64, (3.5 if shape == "triangle" else 1) / 64, 1 / 64, 1 / 64]  # a thin apex
                assert all(abs(f - t) <= tol for f, t, tol in zip(emblem_box, target, tolerance)), (box, emblem_box)


@pytest.mark.parametrize("side", [0.25, 0.35, 0.4, 0.5, 0.6, 0.8])
@pytest.mark.parametrize("shape", world.SHAPES)
def test_emblem_shape_recognises_rendered_emblems(shape, side):
    """The renderer's anti-aliased emblems, at 16 sub-pixel offsets."""
    for fx in range(4):
        for fy in range(4):
            x0, y0 = (6 + fx / 4) / 64, (5 + fy / 4) / 64
            box = [x0, y0, x0 + side, y0 + side]
            array = metrics._as_array(world.render_scene("plain", [(f"red {shape}", box)], size=64))
            found, score, _ = metrics.emblem_shape(array, metrics.color_mask(array, "red"), "red")
            assert found == shape, (box, found, score)


@pytest.mark.parametrize("side, fx, fy", [(0.2, 2, 2), (0.225, 2, 2), (0.3, 7, 7)])
def test_emblem_shape_recognises_small_rendered_squares_off_the_pixel_grid(side, fx, fy):
    """Small anti-aliased square emblems whose edges fall inside pixels (which a template fitted to the whole
    pixel box reads as a circle): the templates are fitted to the sub-pixel inset of the emblem's edges."""
    x0, y0 = (6 + fx / 8) / 64, (5 + fy / 8) / 64
    box = [x0, y0, x0 + side, y0 + side]
    array = metrics._as_array(world.render_scene("plain", [("red square", box)], size=64))
    shape, score, emblem_box = metrics.emblem_shape(array, metrics.color_mask(array, "red"), "red")
    assert shape == "square", (box, shape, score)
    target = world.emblem_box(box, 64, 64)
    assert all(abs(f - t) <= 1 / 64 for f, t in zip(emblem_box, target)), (emblem_box, target)


def test_small_rendered_squares_at_every_eighth_pixel_offset():
    """The same at all 64 eighth-pixel offsets of the three sides."""
    for side in (0.2, 0.225, 0.3):
        for fx in range(8):
            for fy in range(8):
                x0, y0 = (6 + fx / 8) / 64, (5 + fy / 8) / 64
                box = [x0, y0, x0 + side, y0 + side]
                array = metrics._as_array(world.render_scene("plain", [("red square", box)], size=64))
                found, score, _ = metrics.emblem_shape(array, metrics.color_mask(array, "red"), "red")
                assert found == "square", (box, found, score)
