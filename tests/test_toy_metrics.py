"""Metric calibration: rendered scenes score ~1 (the ceiling), pure noise ~0, empty backgrounds 0 placed."""

import numpy as np
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
        assert m["fidelity"] >= 0.8


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


def test_grid_measures_steps_at_the_fold_block_edges():
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.random((16, 16, 3)), np.ones((4, 4, 1)))  # constant over each 4x4 fold block
    across, within = metrics.grid_means(blocks)
    assert within == 0.0 and across > 0.1
    assert metrics.grid_ratio(across, within) > 100
    shifted = np.roll(blocks, 2, axis=(0, 1))  # the same steps, half-way between block edges
    across, within = metrics.grid_means(shifted)
    assert across == 0.0 and metrics.grid_ratio(across, within) < 0.1
    phases = metrics.grid_phase_means(shifted)  # ... a grid all the same, at phase 2
    assert phases[0] == (across, within) and metrics.grid_ratio(*phases[2]) > 100
    assert [metrics.grid_ratio(*m) < 0.1 for m in phases] == [True, True, False, True]
    ramp = np.broadcast_to(np.linspace(0, 1, 64)[None, :, None], (64, 64, 3))  # equal steps everywhere
    across, within = metrics.grid_means(ramp)
    assert abs(across - within) < 1e-6 and abs(metrics.grid_ratio(across, within) - 1) < 1e-5
    assert metrics.grid_ratio(0.0, 0.0) == 1.0  # a flat image has no grid
    from anyms_core.toy.pipeline import FOLD

    assert metrics.GRID_PERIOD == FOLD  # the grid's period is the model's fold


def test_grid_of_a_set_is_the_ratio_of_its_means():
    cases = world.make_cases(2, 6, seed=0)
    scores = [metrics.score_case(c.render(), c) for c in cases]
    means = np.mean([s["grid_means"] for s in scores], axis=0)  # [phases, 2]
    assert means.shape == (metrics.GRID_PERIOD, 2)
    worst = max(metrics.grid_ratio(across, within) for across, within in means)
    assert abs(_means(scores)["grid"] - worst) <= 5e-5  # summarize rounds to 4 digits
    rng = np.random.default_rng(1)
    blocky = [np.kron(rng.random((16, 16, 3)), np.ones((4, 4, 1))) for _ in cases]
    assert _means([metrics.score_case(b, c) for b, c in zip(blocky, cases)])["grid"] > 5 * _means(scores)["grid"]
    moved = [np.roll(b, 1, axis=(0, 1)) for b in blocky]  # the same grid one pixel off the fold's phase
    assert _means([metrics.score_case(b, c) for b, c in zip(moved, cases)])["grid"] > 5 * _means(scores)["grid"]
    phase0 = [{**sc, "grid_means": sc["grid_means"][0]} for sc in scores]  # scores saved before the phases
    across, within = np.mean([s["grid_means"] for s in phase0], axis=0)
    assert abs(_means(phase0)["grid"] - metrics.grid_ratio(across, within)) <= 5e-5
    older = [{k: v for k, v in sc.items() if k != "grid_means"} for sc in scores]  # scores saved before `grid`
    assert "grid" not in metrics.summarize(older, bootstrap=0)


def test_framed_silhouette_share_and_placement_by_it():
    from anyms_core.toy.evaluate import by_framed_silhouette, framed_silhouette_share

    assert framed_silhouette_share("square", [0.3, 0.3, 0.6, 0.6]) == 1.0
    assert framed_silhouette_share("triangle", [0.0, 0.0, 0.2, 0.2]) == 0.0  # beside the apex
    assert framed_silhouette_share("triangle", [0.4, 0.7, 0.6, 0.9]) == 1.0  # above the base
    assert framed_silhouette_share("cross", [0.05, 0.05, 0.3, 0.3]) == 0.0  # between two arms
    subjects = [
        {"sprite": "red square", "target": [0.0, 0.0, 0.2, 0.2], "placed": True},
        {"sprite": "cyan triangle", "target": [0.0, 0.0, 0.2, 0.2], "placed": False},
        {"sprite": "lime cross", "target": [0.05, 0.05, 0.3, 0.3], "placed": True},
        {"sprite": "lime triangle", "target": [0.4, 0.7, 0.6, 0.9], "placed": True},
    ]
    rows = by_framed_silhouette([{"subjects": subjects[:2]}, {"subjects": subjects[2:]}])
    assert {k: (v["placed"], v["subjects"]) for k, v in rows.items()} == {
        "squares, box outside the cross": (1.0, 1), "other shapes, box inside": (1.0, 1),
        "other shapes, box outside": (0.5, 2)}
    assert rows["other shapes, box outside"]["ci95"][0] < 0.5 < rows["other shapes, box outside"]["ci95"][1]
