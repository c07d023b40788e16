"""Metric calibration: rendered scenes score ~1 (the ceiling), pure noise ~0, empty backgrounds 0 placed."""

import numpy as np
from PIL import Image

from anyms_core.toy import metrics, world


def _means(scores):
    return {k: v["mean"] for k, v in metrics.summarize(scores, bootstrap=0).items() if isinstance(v, dict)}


def test_rendered_scenes_are_the_ceiling():
    for n in (2, 5):
        cases = world.make_cases(n, 12, seed=0)
        m = _means([metrics.score_case(c.render(), c) for c in cases])
        assert m["placed"] == 1.0 and m["ap50"] == 1.0 and m["background"] == 1.0
        assert m["identity"] >= 0.95 and m["iou"] >= 0.8


def test_pure_noise_scores_near_zero():
    rng = np.random.default_rng(0)
    cases = world.make_cases(3, 12, seed=0)
    uniform = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in cases]
    gauss = [Image.fromarray((np.clip(0.5 + 0.5 * rng.standard_normal((32, 32, 3)), 0, 1) * 255).astype(np.uint8)) for _ in cases]
    for images in (uniform, gauss):
        m = _means([metrics.score_case(im, c) for im, c in zip(images, cases)])
        assert m["placed"] == 0.0 and m["ap50"] == 0.0 and m["background"] == 0.0
        assert m["iou"] < 0.02 and m["identity"] < 0.05


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
