"""Exact, procedural metrics for the toy world (no pretrained detector).

For each subject of a case: find the blobs of its colour in the generated image (pixels within
`COLOR_RADIUS` of the sprite colour, 8-connected components), keep only real blobs (enough pixels,
a filled bounding box: pure noise fails this), pick the blob that best overlaps the target (the
square the sprite is inscribed in, see `world.inscribed_box`), and report its box IoU with the target,
`placed` (IoU >= 0.5), its shape (best IoU against the four shape templates fitted to its bounding
box) and the dominant sprite colour inside the target. `identity` (reported among placed subjects)
needs both the shape and that colour right. AP50 ranks all real blobs of every sprite colour in a set
of images against the subjects of that colour. The background is the nearest background palette to
the median colour outside the target boxes, accepted only when most of those pixels agree with it.

Two image-level measures:
- `fidelity`: the share of 4x4 patches that are locally smooth (most pixels close to the patch's
  median colour), as the world's flat sprites and soft textures are. A rendered scene scores ~0.95,
  pure noise 0; a failure that is still a picture (a subject leaking, two subjects fused into one blob, a subject in the wrong place)
  keeps a high score, so this separates "wrong" from "noise".
- `artefact`: the energy of the 2x2 alternating (checkerboard) pattern, mean over every 2x2 window of
  ((a - b - c + d) / 2)^2; compare to the rendered scenes' value.
- `grid`: the visible grid of the toy model's 4x4 Haar fold (`pipeline.FOLD`): the mean absolute
  difference between neighbouring pixels across a fold block's edge, divided by the same across
  every other neighbour pair. Without a grid it is ~1; an error constant over each block raises it.
  The 2x2 `artefact` cannot see this pattern. One image's ratio swings with where its texture lines and
  sprite edges fall (0.5-2.5 for rendered scenes), so a set of images is scored by the ratio of the two
  means over the set (`grid_means` per image), at the worst of the `period` block phases: a grid moved
  by 1-3 px (the toy pipeline's `fold_shifts` moves it) reads as a grid too, not as less than 1.

In overlap cases (explicit priorities), `overlap_owned` says whether the higher-priority subject owns
the overlap of each overlapping pair: where both sprites' shapes would be drawn, more of its colour
than the other's (and at least OWN_MIN_SHARE of those pixels), and its shape recognised.

Calibration (see tests/test_toy_metrics.py): rendered scenes score ~1 (the ceiling), pure noise ~0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from . import world

COLOR_RADIUS = 0.3  # RGB distance (in [0, 1] units) within which a pixel counts as a sprite colour
MIN_AREA = 6  # pixels (at 32 px); scaled by image area
MIN_FILL = 0.35  # blob area / bounding-box area (triangles are 0.5, crosses 0.64)
MIN_SIDE = 3  # pixels (at 32 px)
# Calibrated on generated samples (guidance saturates colours a little): the median colour outside the
# boxes must be within BACKGROUND_RADIUS of a background's reference median, and at least
# BACKGROUND_AGREEMENT of those pixels within BACKGROUND_PIXEL_RADIUS of it (uniform noise: ~0.1).
BACKGROUND_RADIUS = 0.25
BACKGROUND_PIXEL_RADIUS = 0.3
BACKGROUND_AGREEMENT = 0.5
PLACED_IOU = 0.5
FLAT_RADIUS = 0.1
FLAT_SHARE = 0.75
OWN_MIN_SHARE = 0.3


@dataclass
class Blob:
    """A connected region of one sprite colour. `box` is normalized [x0, y0, x1, y1]."""

    color: str
    box: list[float]
    area: int
    fill: float
    shape: str
    shape_score: float  # IoU with the best shape template


def _as_array(image: "Image.Image | np.ndarray | torch.Tensor") -> np.ndarray:
    """-> float [H, W, 3] in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.permute(1, 2, 0)
        return image.clamp(0, 1).numpy()
    array = np.asarray(image, dtype=np.float32)
    return array / 255.0 if array.max() > 1.0 else array


from anyms_core.scoring.detection import box_iou  # noqa: E402  (one IoU for the toy and the paper's metrics)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _shape_templates(box_px: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """[4, H, W] boolean masks of each shape fitted to a pixel bounding box (x0, y0, x1, y1 exclusive)."""
    x0, y0, x1, y1 = box_px
    box = torch.tensor([[x0 / width, y0 / height, x1 / width, y1 / height]], dtype=torch.float32)
    box = box.expand(len(world.SHAPES), 4).reshape(1, len(world.SHAPES), 4)
    ids = torch.arange(len(world.SHAPES)).view(1, -1)
    return (world.sprite_alpha(ids, box, height, width)[0] >= 0.5).numpy()


def color_mask(image, color: str) -> np.ndarray:
    array = _as_array(image)
    rgb = np.asarray(world.COLORS[color], dtype=np.float32)
    return np.linalg.norm(array - rgb, axis=-1) < COLOR_RADIUS


def find_blobs(image, color: str) -> list[Blob]:
    """All real blobs (area, side and fill checks) of one sprite colour, largest first."""
    array = _as_array(image)
    h, w = array.shape[:2]
    scale = (h * w) / (32 * 32)
    mask = color_mask(array, color)
    blobs = []
    for pixels in _components(mask):
        ys, xs = pixels[:, 0], pixels[:, 1]
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        area = len(pixels)
        fill = area / float((x1 - x0) * (y1 - y0))
        side_min = MIN_SIDE * math.sqrt(scale)
        if area < MIN_AREA * scale or fill < MIN_FILL or (x1 - x0) < side_min or (y1 - y0) < side_min:
            continue
        blob_mask = np.zeros((h, w), dtype=bool)
        blob_mask[ys, xs] = True
        templates = _shape_templates((int(x0), int(y0), int(x1), int(y1)), h, w)
        inter = (templates & blob_mask).sum(axis=(1, 2))
        union = (templates | blob_mask).sum(axis=(1, 2))
        ious = inter / np.maximum(union, 1)
        best = int(np.argmax(ious))
        blobs.append(
            Blob(color, [x0 / w, y0 / h, x1 / w, y1 / h], area, fill, world.SHAPES[best], float(ious[best]))
        )
    return sorted(blobs, key=lambda b: -b.area)


def find_subject(image, sprite: "world.Sprite | str", box: list[float] | None) -> Blob | None:
    """The blob of the sprite's colour that best overlaps `box` (or the largest one); None if absent."""
    sprite = world.Sprite.parse(sprite)
    blobs = find_blobs(image, sprite.color)
    if not blobs:
        return None
    if box is not None:
        best = max(blobs, key=lambda b: box_iou(b.box, box))
        if box_iou(best.box, box) > 0:
            return best
    return blobs[0]


@lru_cache(maxsize=4)
def _background_medians(size: int = 32) -> np.ndarray:
    """[len(BACKGROUNDS), 3] reference median colour of each background (rendered, 16 seeds each)."""
    kinds = torch.arange(len(world.BACKGROUNDS)).repeat_interleave(16)
    images = world.render_backgrounds(kinds, size, size, torch.Generator().manual_seed(0))
    pixels = images.permute(0, 2, 3, 1).reshape(len(world.BACKGROUNDS), -1, 3)
    return pixels.median(dim=1).values.numpy()


def classify_background(image, boxes: list[list[float]] = ()) -> str | None:
    """The background name, judged outside the given boxes; None when no background fits."""
    array = _as_array(image)
    h, w = array.shape[:2]
    outside = np.ones((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        outside[int(math.floor(y0 * h)) : int(math.ceil(y1 * h)), int(math.floor(x0 * w)) : int(math.ceil(x1 * w))] = False
    pixels = array[outside] if outside.sum() >= 16 else array.reshape(-1, 3)
    median = np.median(pixels, axis=0)
    references = _background_medians()
    distances = np.linalg.norm(references - median, axis=1)
    best = int(np.argmin(distances))
    if distances[best] > BACKGROUND_RADIUS:
        return None
    agreement = (np.linalg.norm(pixels - references[best], axis=1) < BACKGROUND_PIXEL_RADIUS).mean()
    return world.BACKGROUNDS[best] if agreement >= BACKGROUND_AGREEMENT else None


# --------------------------------------------------------------------------------------------
# Per case and over a set of cases
# --------------------------------------------------------------------------------------------
def fidelity(image) -> float:
    """Share of (non-overlapping) 4x4 patches that are smooth: at least FLAT_SHARE of their pixels
    within FLAT_RADIUS (every channel) of the patch's median colour. A lone star or a thin mortar line
    keeps a patch smooth; noise never is."""
    array = _as_array(image)
    h, w = (array.shape[0] // 4) * 4, (array.shape[1] // 4) * 4
    patches = array[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(h // 4, w // 4, 16, 3)
    median = np.median(patches, axis=2, keepdims=True)
    close = (np.abs(patches - median) <= FLAT_RADIUS).all(axis=-1).mean(axis=-1)
    return float((close >= FLAT_SHARE).mean())


def artefact_energy(image) -> float:
    """Mean energy of the 2x2 alternating pattern over all 2x2 windows (per channel, [0, 1] units)."""
    a = _as_array(image)
    hh = (a[:-1, :-1] - a[:-1, 1:] - a[1:, :-1] + a[1:, 1:]) / 2
    return float((hh**2).mean())


GRID_PERIOD = 4  # pipeline.FOLD (the pixel block one latent cell holds), not imported: it would import diffusers
GRID_FLOOR = 1e-3  # added to both means, so that a flat image scores 1, not 0 / 0


def grid_means(image, period: int = GRID_PERIOD, phase: int = 0) -> tuple[float, float]:
    """Mean |difference| of neighbouring pixels (per channel, [0, 1] units) across the edges of
    `period`-pixel blocks starting at pixel `phase` (between columns or rows k * period + phase - 1 and
    k * period + phase), and across all other neighbour pairs."""
    a = _as_array(image)
    dx = np.abs(np.diff(a, axis=1)).mean(axis=(0, 2))  # dx[j]: between columns j and j + 1
    dy = np.abs(np.diff(a, axis=0)).mean(axis=(1, 2))
    diffs = np.concatenate([dx, dy])
    across = (np.concatenate([np.arange(len(dx)), np.arange(len(dy))]) + 1 - phase) % period == 0
    return float(diffs[across].mean()), float(diffs[~across].mean())


def grid_phase_means(image, period: int = GRID_PERIOD) -> list[tuple[float, float]]:
    """`grid_means` at each of the `period` block phases."""
    return [grid_means(image, period, phase) for phase in range(period)]


def grid_ratio(across: float, within: float) -> float:
    """The grid measure from `grid_means` (of one image or averaged over a set): ~1 without a grid."""
    return (across + GRID_FLOOR) / (within + GRID_FLOOR)


def _pixel_box(box: list[float], h: int, w: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return int(round(x0 * w)), int(round(y0 * h)), int(round(x1 * w)), int(round(y1 * h))


def dominant_color(image, box: list[float]) -> str | None:
    """The sprite colour with the most pixels inside `box` (None if no sprite colour is there)."""
    array = _as_array(image)
    h, w = array.shape[:2]
    x0, y0, x1, y1 = _pixel_box(box, h, w)
    crop = array[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    counts = {c: int(color_mask(crop, c).sum()) for c in world.COLOR_NAMES}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def overlap_ownership(image, case: "world.Case", subjects: list[dict]) -> list[dict]:
    """For each overlapping pair of subjects: does the higher-priority one own the overlap?"""
    if case.priorities is None:
        return []
    array = _as_array(image)
    h, w = array.shape[:2]
    out = []
    n = len(case.sprites)
    shape_ids = torch.tensor([[world.SHAPES.index(s.shape) for s in case.sprites]])
    alpha = world.sprite_alpha(shape_ids, torch.tensor([case.boxes], dtype=torch.float32), h, w)[0].numpy() >= 0.5
    for i in range(n):
        for j in range(i + 1, n):
            region = alpha[i] & alpha[j]  # where both sprites would be drawn: who is visible there?
            if region.sum() < 4:
                continue
            top, bottom = (i, j) if case.priorities[i] > case.priorities[j] else (j, i)
            pixels = array[region]
            n_top = int(color_mask(pixels, case.sprites[top].color).sum())
            n_bottom = int(color_mask(pixels, case.sprites[bottom].color).sum())
            area = int(region.sum())
            color_owned = n_top > n_bottom and n_top >= OWN_MIN_SHARE * area
            out.append({
                "top": top, "bottom": bottom, "top_listed_first": top < bottom, "pixels": area,
                "top_share": round(n_top / area, 4), "bottom_share": round(n_bottom / area, 4),
                "color_owned": color_owned,
                "owned": color_owned and subjects[top]["shape_pred"] == case.sprites[top].shape,
            })
    return out


def score_case(image, case: "world.Case") -> dict:
    """Per-subject detection, IoU, placement and identity, the background, overlap ownership and the
    image-level fidelity and artefact measures, for one image."""
    array = _as_array(image)
    h, w = array.shape[:2]
    subjects = []
    targets = [world.inscribed_box(box, h, w) for box in case.boxes]
    for sprite, box, target in zip(case.sprites, case.boxes, targets):
        blob = find_subject(array, sprite, target)
        iou = box_iou(blob.box, target) if blob is not None else 0.0
        color = dominant_color(array, target)
        subjects.append(
            {
                "sprite": sprite.name,
                "box": box,
                "target": [round(v, 4) for v in target],
                "short_side": round(min(box[2] - box[0], box[3] - box[1]), 4),
                "detected_box": None if blob is None else [round(v, 4) for v in blob.box],
                "iou": iou,
                "placed": iou >= PLACED_IOU,
                "shape_pred": None if blob is None else blob.shape,
                "color_pred": color,
                "identity": blob is not None and blob.shape == sprite.shape and color == sprite.color,
            }
        )
    background = classify_background(array, case.boxes)
    detections = [
        {"color": c, "box": b.box, "score": b.shape_score * min(1.0, b.fill / 0.5)}
        for c in world.COLOR_NAMES
        for b in find_blobs(array, c)
    ]
    return {
        "subjects": subjects,
        "background_pred": background,
        "background": background == case.background,
        "detections": detections,
        "overlaps": overlap_ownership(array, case, subjects),
        "fidelity": fidelity(array),
        "artefact": artefact_energy(array),
        "grid_means": grid_phase_means(array),
    }


def average_precision(scores: list[dict], iou_threshold: float = PLACED_IOU) -> float:
    """AP at `iou_threshold` over a set of scored cases, per colour class (COCO 101-point), averaged:
    the paper's AP50 (`anyms_core.scoring.detection.average_precision`) with colours as classes."""
    from anyms_core.scoring.detection import average_precision as detection_ap

    images = [
        {
            "detections": [{"label": d["color"], "box": d["box"], "score": d["score"]} for d in sc["detections"]],
            "truths": [{"label": s["sprite"].split()[0], "box": s["target"]} for s in sc["subjects"]],
        }
        for sc in scores
    ]
    ap = detection_ap(images, iou_threshold)
    return 0.0 if math.isnan(ap) else ap


def summarize(scores: list[dict], bootstrap: int = 200, seed: int = 0) -> dict:
    """Means with 95% CIs (bootstrap over cases) of IoU, placed, AP50, identity, background, all-placed,
    fidelity, artefact, grid (when every score has `grid_means`) and overlap ownership (when there are overlaps)."""
    rng = np.random.default_rng(seed)
    n = len(scores)

    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    with_grid = bool(scores) and all("grid_means" in sc for sc in scores)  # absent in scores saved before it

    def _set_grid_ratio(subset) -> float:
        # [cases, phases, 2]; scores saved before the phases hold phase 0 only, as [cases, 2]
        means = np.mean([np.reshape(sc["grid_means"], (-1, 2)) for sc in subset], axis=0)
        return max(grid_ratio(float(across), float(within)) for across, within in means)

    def stats(indices, with_ap: bool = True) -> dict:
        subset = [scores[i] for i in indices]
        subjects = [s for sc in subset for s in sc["subjects"]]
        placed = [s for s in subjects if s["placed"]]
        overlaps = [o for sc in subset for o in sc.get("overlaps", [])]
        out = {
            "iou": mean([s["iou"] for s in subjects]),
            "placed": mean([s["placed"] for s in subjects]),
            "identity": mean([s["identity"] for s in placed]),
            "shape": mean([s["shape_pred"] == s["sprite"].split()[1] for s in placed]),
            "background": mean([sc["background"] for sc in subset]),
            "all_placed": mean([all(s["placed"] for s in sc["subjects"]) for sc in subset]),
            "ap50": average_precision(subset) if with_ap else float("nan"),
            "fidelity": mean([sc["fidelity"] for sc in subset]),
            "artefact": mean([sc["artefact"] for sc in subset]),
        }
        if with_grid:
            out["grid"] = _set_grid_ratio(subset)
        if overlaps:
            out["overlap_owned"] = mean([o["owned"] for o in overlaps])
            out["overlap_color_owned"] = mean([o["color_owned"] for o in overlaps])
        return out

    point = stats(range(n))
    # AP50 ranks the whole set (seconds per call in Python): reported as a point estimate, its "CI" is the point
    samples = [stats(rng.integers(0, n, n), with_ap=False) for _ in range(bootstrap)] if bootstrap and n > 1 else []
    out = {"cases": n, "subjects": sum(len(sc["subjects"]) for sc in scores)}
    for key, value in point.items():
        values = [s[key] for s in samples if not math.isnan(s[key])]
        low, high = (np.percentile(values, [2.5, 97.5]) if values else (value, value))
        out[key] = {"mean": round(value, 4), "ci95": [round(float(low), 4), round(float(high), 4)]}
    return out
