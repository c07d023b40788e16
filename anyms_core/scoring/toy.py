"""The toy world's own pixel metrics as a scoring backend (offline, exact, no pretrained models).

This is the ONLY file of ``anyms_core.scoring`` (and of ``anyms_core.sweep``) that knows the toy
world's internals. It uses, from ``anyms_core.toy``:

- ``world.make_cases``, ``world.Case``, ``world.Sprite.parse``, ``world.DEFAULT_PROMPTS``
  (cases for ``toy_cases`` specs, and the case a run is scored against);
- ``metrics.score_case(image, case)`` (per subject: ``iou``, ``placed``, ``identity``; per image:
  ``background``; plus the detections) and ``metrics.average_precision(scores)`` (AP50 over a set).

When the toy world changes (image size, metric names), only this file follows.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ..toy import metrics, world

NAME = "toy"
# per-image columns this backend writes (means over the image's subjects, or per-image facts)
IMAGE_METRICS = ("toy_iou", "toy_placed", "toy_identity", "toy_all_placed", "toy_background")
# metrics of a set of images (computed per group, bootstrapped over images)
SET_METRICS = ("toy_ap50",)


def toy_case_specs(subject_counts: list[int], count: int, seed: int = 0) -> list[dict]:
    """Held-out toy-world cases (``world.make_cases``) as sweep-spec cases, named ``toy-n<k>-<i>``."""
    cases = []
    for n in subject_counts:
        for i, case in enumerate(world.make_cases(int(n), int(count), seed=int(seed))):
            cases.append({
                "name": f"toy-n{n}-{i:03d}",
                "prompt": case.prompt,
                "subjects": [{"image": f"toy:{sprite.name}", "box": box, "name": sprite.name, "class": sprite.name}
                             for sprite, box in case.subjects],
            })
    return cases


def _case_for(row: dict) -> "world.Case":
    images = row["images"]
    if not all(image.startswith("toy:") for image in images):
        raise ValueError(f"run {row['run_id']}: the toy metrics score only toy-world subjects ('toy:<colour> <shape>'), "
                         f"got {images}")
    sprites = [world.Sprite.parse(image.removeprefix("toy:").strip()) for image in images]
    backgrounds = {prompt: name for name, prompt in world.DEFAULT_PROMPTS.items()}
    return world.Case(backgrounds.get(row["prompt"]), row["prompt"], sprites, [list(b) for b in row["boxes"]], int(row["seed"]))


class ToyBackend:
    """Scores toy-world runs with ``anyms_core.toy.metrics``."""

    name = NAME
    image_metrics = IMAGE_METRICS
    set_metrics = SET_METRICS

    def score_image(self, row: dict, image: Image.Image, references: list[Image.Image]) -> tuple[dict, list[dict], dict]:
        """-> (per-image metrics, per-subject rows, the record ``set_values`` needs)."""
        scored = metrics.score_case(image, _case_for(row))
        scored = json.loads(json.dumps(scored, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
        subjects = [{"toy_iou": s["iou"], "toy_placed": float(s["placed"]), "toy_identity": float(s["identity"]),
                     "toy_detected_box": s["detected_box"]} for s in scored["subjects"]]
        per_image = {
            "toy_iou": sum(s["iou"] for s in scored["subjects"]) / len(scored["subjects"]),
            "toy_placed": sum(s["placed"] for s in scored["subjects"]) / len(scored["subjects"]),
            "toy_identity": sum(s["identity"] for s in scored["subjects"]) / len(scored["subjects"]),
            "toy_all_placed": float(all(s["placed"] for s in scored["subjects"])),
            "toy_background": float(scored["background"]),
        }
        return per_image, subjects, scored

    def set_values(self, records: list[dict]) -> dict:
        return {"toy_ap50": metrics.average_precision(records)}
