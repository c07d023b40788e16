"""Layout metrics from an open-vocabulary detector: mIoU and AP50 (paper Sec. 4.1, Table 1).

A detector answers ``detect(image, query) -> [Detection]``: the boxes it finds for one text query
(a subject's class name), with scores. :class:`GroundingDinoDetector` is GroundingDINO through
transformers' zero-shot object detection; tests use stand-ins that return known boxes.

- IoU of a subject: the best IoU between its box and a detection of its class (0 when none).
  mIoU is its mean over subjects.
- AP50: per class, detections of all images of a set ranked by score, a detection is a true positive
  when it matches (IoU >= 0.5) a not-yet-matched box of its class in its image; COCO 101-point
  interpolated precision, averaged over the classes present.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image


@dataclass
class Detection:
    """One detected box, normalized [x0, y0, x1, y1] (origin top-left), for the query ``label``."""

    label: str
    box: list[float]
    score: float

    def to_json(self) -> dict:
        return asdict(self)


class Detector(Protocol):
    def detect(self, image: Image.Image, query: str) -> list[Detection]: ...


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two normalized [x0, y0, x1, y1] boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_detection(box: Sequence[float], label: str, detections: Sequence[Detection]) -> tuple[float, Detection | None]:
    """The detection of class ``label`` that overlaps ``box`` most, and that IoU ((0.0, None) if none overlaps)."""
    best, best_iou = None, 0.0
    for detection in detections:
        if detection.label == label:
            iou = box_iou(detection.box, box)
            if iou > best_iou:
                best, best_iou = detection, iou
    return best_iou, best


def average_precision(images: Sequence[dict], iou_threshold: float = 0.5) -> float:
    """AP at ``iou_threshold`` over a set of images, per class (COCO 101-point), averaged over classes.

    Each image is ``{"detections": [{"label", "box", "score"}], "truths": [{"label", "box"}]}``.
    Returns NaN for a set without any ground-truth box.
    """
    labels = sorted({t["label"] for image in images for t in image["truths"]})
    aps = []
    for label in labels:
        truths = [(i, t["box"]) for i, image in enumerate(images) for t in image["truths"] if t["label"] == label]
        ranked = sorted(((d["score"], i, d["box"]) for i, image in enumerate(images) for d in image["detections"]
                         if d["label"] == label), key=lambda t: -t[0])
        matched: set[int] = set()
        hits = []
        for _, i, box in ranked:
            best, best_iou = None, iou_threshold
            for j, (image_index, truth) in enumerate(truths):
                if image_index == i and j not in matched:
                    iou = box_iou(box, truth)
                    if iou >= best_iou:
                        best, best_iou = j, iou
            hits.append(best is not None)
            if best is not None:
                matched.add(best)
        if not hits:
            aps.append(0.0)
            continue
        tp = np.cumsum(hits)
        recall = tp / len(truths)
        precision = tp / np.arange(1, len(hits) + 1)
        aps.append(float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                                  for r in np.linspace(0, 1, 101)])))
    return float(np.mean(aps)) if aps else float("nan")


class GroundingDinoDetector:
    """GroundingDINO (transformers' ``AutoModelForZeroShotObjectDetection``), one text query per call.

    ``box_threshold`` / ``text_threshold``: GroundingDINO's usual 0.35 / 0.25. Queries are lower-cased
    and end with a period, as GroundingDINO expects.
    """

    def __init__(self, model, processor, box_threshold: float = 0.35, text_threshold: float = 0.25):
        self.model = model.eval()
        self.processor = processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    @torch.no_grad()
    def detect(self, image: Image.Image, query: str) -> list[Detection]:
        text = query.strip().lower().rstrip(".") + "."
        device = next(self.model.parameters()).device
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        post_process = self.processor.post_process_grounded_object_detection
        # transformers < 4.51 calls the box threshold `box_threshold`, later versions `threshold`
        name = "threshold" if "threshold" in inspect.signature(post_process).parameters else "box_threshold"
        result = post_process(
            outputs, inputs["input_ids"], text_threshold=self.text_threshold, target_sizes=[(1, 1)],  # normalized boxes
            **{name: self.box_threshold},
        )[0]
        boxes = result["boxes"].clamp(0, 1).tolist()
        return [Detection(query, [round(v, 5) for v in box], float(score))
                for box, score in zip(boxes, result["scores"].tolist()) if box[2] > box[0] and box[3] > box[1]]
