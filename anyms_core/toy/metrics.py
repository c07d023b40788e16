"""Exact, procedural metrics for the toy world (no pretrained detector).

A subject is a card (its colour over its whole box) with a white emblem (see `world`). For each subject
of a case: find the blobs of its colour in the generated image (pixels within `COLOR_RADIUS` of the card
colour, 8-connected components), keep only real blobs (enough pixels, a filled bounding box: pure noise
fails this), pick the blob that best overlaps the subject's box, and report its box IoU with the box,
`placed` (IoU >= 0.5), the shape of its emblem and the dominant card colour in the part of the box no
higher-priority box covers. The emblem is the largest near-white region the card encloses (a hole in
the blob); its shape is the best IoU among the four shape templates fitted to its bounding box (None:
no enclosed emblem). `identity` (reported among placed subjects) needs both the shape and that colour
right. AP50 ranks all real blobs of every card colour in a set of images against the subjects of that
colour. The background is the nearest background palette to the median colour outside the boxes,
accepted only when most of those pixels agree with it.

Two image-level measures:
- `fidelity`: the share of 4x4 patches that are piecewise flat (most pixels close to one or two of the
  patch's own pixels), as the world's flat cards and soft textures are. A rendered
  scene scores ~0.95, pure noise 0; a failure that is still a picture (a subject leaking, two subjects fused into one card,
  a subject in the wrong place) keeps a high score, so this separates "wrong" from "noise".
- `artefact`: the energy of the 2x2 alternating (checkerboard) pattern, mean over every 2x2 window of
  ((a - b - c + d) / 2)^2; compare to the rendered scenes' value.

In overlap cases (explicit priorities), `overlap_owned` says whether the higher-priority subject owns
the overlap of each overlapping pair: where both cards would be drawn (outside its own emblem), more of
its colour than the other's (and at least OWN_MIN_SHARE of those pixels), and its emblem recognised.

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
MIN_FILL = 0.4  # card area (with what it encloses) / bounding-box area: a card is a filled rectangle
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
EMBLEM_RADIUS = 0.3  # RGB distance from the emblem white within which an enclosed pixel is emblem
MIN_EMBLEM_AREA = 2  # pixels (at 32 px); scaled by image area


@dataclass
class Blob:
    """A connected region of one card colour. `box` is normalized [x0, y0, x1, y1]; `shape` is its
    emblem's (None: the blob encloses no emblem), `emblem_box` the emblem's normalized box."""

    color: str
    box: list[float]
    area: int
    fill: float
    shape: str | None
    shape_score: float  # IoU with the best shape template (0 without an emblem)
    emblem_box: list[float] | None = None


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


def _label(mask: np.ndarray, diagonal: bool = True) -> np.ndarray:
    """Connected-component labels [H, W] of a boolean mask (0 outside it; 8-connected, or 4-connected with
    diagonal=False): every pixel takes the largest label among its neighbours until nothing changes."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx) and (diagonal or not (dy and dx))]
    while True:
        padded = np.pad(labels, 1)
        best = labels.copy()
        for dy, dx in steps:
            np.maximum(best, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=best)
        best *= mask
        if np.array_equal(best, labels):
            return labels
        labels = best


def _components(mask: np.ndarray, diagonal: bool = True) -> list[np.ndarray]:
    """Connected components (8-connected, or 4-connected with diagonal=False) of a boolean mask, as
    arrays of (y, x) pixel coordinates."""
    labels = _label(mask, diagonal)
    ys, xs = np.nonzero(labels)
    if not len(ys):
        return []
    values = labels[ys, xs]
    order = np.argsort(values, kind="stable")
    ys, xs, values = ys[order], xs[order], values[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return [np.stack([y, x], axis=1) for y, x in zip(np.split(ys, starts[1:]), np.split(xs, starts[1:]))]


def enclosed(mask: np.ndarray) -> np.ndarray:
    """The holes of a boolean mask: pixels outside it that no 4-connected path outside it links to the
    image border."""
    free = np.pad(~mask, 1, constant_values=True)  # the border ring joins everything that reaches it
    labels = _label(free, diagonal=False)
    return (labels != labels[0, 0])[1:-1, 1:-1] & ~mask


@lru_cache(maxsize=4096)
def _shape_templates(height: int, width: int, inset: tuple[int, int, int, int] = (0, 0, 0, 0)) -> np.ndarray:
    """[4, height, width] anti-aliased coverage of each shape fitted to a box of that many pixels, each
    edge moved in by `inset` eighths of a pixel (left, top, right, bottom). Read-only: it is cached."""
    left, top, right, bottom = (v / 8 for v in inset)
    box = torch.tensor([left / width, top / height, 1 - right / width, 1 - bottom / height]).expand(1, len(world.SHAPES), 4)
    ids = torch.arange(len(world.SHAPES)).view(1, -1)
    templates = world.shape_alpha(ids, box, height, width)[0].numpy()
    templates.flags.writeable = False
    return templates


def _subpixel_inset(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """How far (in eighths of a pixel) an anti-aliased shape [h, w] stops short of its pixel bounding box
    on each side: one minus the largest coverage of the outermost column / row. A triangle's thin apex or
    a circle's round edge reads as a small inset too; all four templates are fitted to the same box, so
    the comparison between them stays fair."""
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    return tuple(int(round(8 * min(1.0 - float(v), 0.99))) for v in (cols[0], rows[0], cols[-1], rows[-1]))


def color_mask(image, color: str) -> np.ndarray:
    array = _as_array(image)
    rgb = np.asarray(world.COLORS[color], dtype=np.float32)
    return np.linalg.norm(array - rgb, axis=-1) < COLOR_RADIUS


def emblem_alpha(array: np.ndarray, color: str) -> np.ndarray:
    """[H, W] how much of each pixel is emblem white over a card of `color`: the scenes blend the two
    linearly, so this is the pixel's position on the segment from the card colour to white (0 where the
    pixel lies more than EMBLEM_RADIUS off that segment)."""
    card = np.asarray(world.COLORS[color], dtype=np.float32)
    towards = np.asarray(world.EMBLEM_RGB, dtype=np.float32) - card
    alpha = np.clip((array - card) @ towards / float(towards @ towards), 0.0, 1.0)
    off = np.linalg.norm(array - (card + alpha[..., None] * towards), axis=-1)
    return np.where(off < EMBLEM_RADIUS, alpha, 0.0)


def emblem_shape(array: np.ndarray, card: np.ndarray, color: str) -> tuple[str | None, float, list[float] | None]:
    """The emblem a card mask of `color` encloses in an image [H, W, 3]: (shape, soft IoU with the shape's
    template fitted to the emblem's bounding box, normalized box), or (None, 0, None) when it encloses no
    emblem-white region big enough."""
    h, w = card.shape
    alpha = emblem_alpha(array, color)
    holes = enclosed(card) & (alpha > 0.25)
    candidates = [c for c in _components(holes) if len(c) >= MIN_EMBLEM_AREA * h * w / (32 * 32)]
    if not candidates:
        return None, 0.0, None
    pixels = max(candidates, key=len)
    ys, xs = pixels[:, 0], pixels[:, 1]
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    emblem = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    emblem[ys - y0, xs - x0] = alpha[ys, xs]
    # the emblem lies inside its own bounding box; its partly covered edge pixels say by how much
    templates = _shape_templates(y1 - y0, x1 - x0, _subpixel_inset(emblem))
    ious = np.minimum(templates, emblem).sum(axis=(1, 2)) / np.maximum(np.maximum(templates, emblem).sum(axis=(1, 2)), 1e-6)
    best = int(np.argmax(ious))
    return world.SHAPES[best], float(ious[best]), [x0 / w, y0 / h, x1 / w, y1 / h]


def find_blobs(image, color: str) -> list[Blob]:
    """All real blobs (area, side and fill checks) of one card colour, largest first, with their emblems."""
    array = _as_array(image)
    h, w = array.shape[:2]
    scale = (h * w) / (32 * 32)
    mask = color_mask(array, color)
    cards = np.any([color_mask(array, c) for c in world.COLOR_NAMES], axis=0)
    blobs = []
    for pixels in _components(mask):
        ys, xs = pixels[:, 0], pixels[:, 1]
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        area = len(pixels)
        side_min = MIN_SIDE * math.sqrt(scale)
        if area < MIN_AREA * scale or (x1 - x0) < side_min or (y1 - y0) < side_min:
            continue
        card = np.zeros((h, w), dtype=bool)
        card[ys, xs] = True
        # a card's fill counts what it encloses (its emblem), also where a card above cuts it open: the
        # holes of this card together with the pixels of every other card colour
        holes = enclosed(card | (cards & ~mask))
        fill = float((card | holes)[y0:y1, x0:x1].mean())
        if fill < MIN_FILL:
            continue
        shape, score, emblem = emblem_shape(array, card, color)
        blobs.append(Blob(color, [float(x0 / w), float(y0 / h), float(x1 / w), float(y1 / h)], area, fill,
                          shape, score, emblem))
    return sorted(blobs, key=lambda b: -b.area)


def find_subject(image, sprite: "world.Sprite | str", box: list[float] | None,
                 blobs: list[Blob] | None = None) -> Blob | None:
    """The blob of the card's colour (among `blobs`, default: all of that colour in `image`) that best
    overlaps `box` (or the largest one); None if absent."""
    sprite = world.Sprite.parse(sprite)
    blobs = find_blobs(image, sprite.color) if blobs is None else blobs
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
    """Share of (non-overlapping) 4x4 patches that are piecewise flat: at least FLAT_SHARE of their pixels
    within FLAT_RADIUS (every channel) of one or two of the patch's own pixels (the pixel with the most
    such neighbours, then the one that covers most of the rest). So a patch on one flat region or across
    the edge between two (a card's border, its emblem) is smooth, as is one with a lone star or a thin
    mortar line; noise never is."""
    array = _as_array(image)
    h, w = (array.shape[0] // 4) * 4, (array.shape[1] // 4) * 4
    patches = array[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 16, 3)
    near = (np.abs(patches[:, :, None] - patches[:, None, :]) <= FLAT_RADIUS).all(axis=-1)  # [P, 16, 16]
    rows = np.arange(len(near))
    first = near[rows, near.sum(axis=2).argmax(axis=1)]  # [P, 16]: pixels near the best cover colour
    rest = (near & ~first[:, None, :]).sum(axis=2)  # how many uncovered pixels each pixel would cover
    second = near[rows, rest.argmax(axis=1)] & ~first
    close = (first | second).mean(axis=-1)
    return float((close >= FLAT_SHARE).mean())


def artefact_energy(image) -> float:
    """Mean energy of the 2x2 alternating pattern over all 2x2 windows (per channel, [0, 1] units)."""
    a = _as_array(image)
    hh = (a[:-1, :-1] - a[:-1, 1:] - a[1:, :-1] + a[1:, 1:]) / 2
    return float((hh**2).mean())


def _pixel_box(box: list[float], h: int, w: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return int(round(x0 * w)), int(round(y0 * h)), int(round(x1 * w)), int(round(y1 * h))


def _box_mask(box: list[float], h: int, w: int) -> np.ndarray:
    x0, y0, x1, y1 = _pixel_box(box, h, w)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
    return mask


def dominant_color(image, box: list[float], region: np.ndarray | None = None) -> str | None:
    """The card colour with the most pixels inside `box` (within `region` [H, W] if given; None if no card
    colour is there)."""
    array = _as_array(image)
    h, w = array.shape[:2]
    mask = _box_mask(box, h, w) if region is None else region
    if not mask.any():
        return None
    pixels = array[mask]
    counts = {c: int(color_mask(pixels, c).sum()) for c in world.COLOR_NAMES}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def _region_box(region: np.ndarray, box: list[float], h: int, w: int) -> list[float]:
    """The normalized bounding box of a visible region: `box` itself unless cards above cut it."""
    if region.all() or region.sum() == _box_mask(box, h, w).sum():
        return list(box)
    ys, xs = np.nonzero(region)
    return [float(xs.min() / w), float(ys.min() / h), float((xs.max() + 1) / w), float((ys.max() + 1) / h)]


def visible_regions(case: "world.Case", h: int, w: int) -> tuple[list[np.ndarray], list[bool]]:
    """Per subject, the part of its box that no subject painted above it covers (all of it when that
    leaves nothing), and whether its emblem is whole in the rendered scene (no card above covers it)."""
    order = case.paint_order()
    boxes = [_box_mask(b, h, w) for b in case.boxes]
    regions, whole = [], []
    for j in range(len(case.boxes)):
        above = order[order.index(j) + 1:]
        covered = np.any([boxes[i] & boxes[j] for i in above], axis=0) if above else np.zeros((h, w), dtype=bool)
        region = boxes[j] & ~covered
        regions.append(region if region.any() else boxes[j])
        if covered.any():  # (rendering the emblem only where a card above reaches into the box)
            shape_id = torch.tensor([[world.SHAPES.index(case.sprites[j].shape)]])
            emblem = world.emblem_alpha(shape_id, torch.tensor([[case.boxes[j]]], dtype=torch.float32), h, w, 2)[0, 0]
            whole.append(not ((emblem.numpy() >= 0.5) & covered).any())
        else:
            whole.append(True)
    return regions, whole


def overlap_ownership(image, case: "world.Case", subjects: list[dict]) -> list[dict]:
    """For each overlapping pair of subjects: does the higher-priority one own the overlap?"""
    if case.priorities is None:
        return []
    array = _as_array(image)
    h, w = array.shape[:2]
    out = []
    n = len(case.sprites)
    boxes = torch.tensor([case.boxes], dtype=torch.float32)
    shape_ids = torch.tensor([[world.SHAPES.index(s.shape) for s in case.sprites]])
    cards = world.card_alpha(boxes, h, w)[0].numpy() >= 0.5
    emblems = world.emblem_alpha(shape_ids, boxes, h, w, 2)[0].numpy() >= 0.5
    for i in range(n):
        for j in range(i + 1, n):
            top, bottom = (i, j) if case.priorities[i] > case.priorities[j] else (j, i)
            region = cards[i] & cards[j] & ~emblems[top]  # where both cards lie, outside the top emblem
            if region.sum() < 4:
                continue
            pixels = array[region]
            n_top = int(color_mask(pixels, case.sprites[top].color).sum())
            n_bottom = int(color_mask(pixels, case.sprites[bottom].color).sum())
            area = int(region.sum())
            color_owned = n_top > n_bottom and n_top >= OWN_MIN_SHARE * area
            shape_ok = subjects[top]["shape_pred"] == case.sprites[top].shape or not subjects[top]["emblem_visible"]
            out.append({
                "top": top, "bottom": bottom, "top_listed_first": top < bottom, "pixels": area,
                "top_share": round(n_top / area, 4), "bottom_share": round(n_bottom / area, 4),
                "color_owned": color_owned,
                "owned": color_owned and shape_ok,
            })
    return out


def score_case(image, case: "world.Case") -> dict:
    """Per-subject detection, IoU, placement and identity, the background, overlap ownership and the
    image-level fidelity and artefact measures, for one image."""
    array = _as_array(image)
    h, w = array.shape[:2]
    subjects = []
    blobs = {c: find_blobs(array, c) for c in world.COLOR_NAMES}
    regions, emblem_whole = visible_regions(case, h, w)
    for sprite, box, region, visible in zip(case.sprites, case.boxes, regions, emblem_whole):
        target = _region_box(region, box, h, w)  # where the true scene shows this card (its box unless covered)
        blob = find_subject(array, sprite, target, blobs[sprite.color])
        iou = box_iou(blob.box, target) if blob is not None else 0.0
        color = dominant_color(array, box, region)
        shape = None if blob is None else blob.shape
        subjects.append(
            {
                "sprite": sprite.name,
                "box": box,
                "target": [round(v, 4) for v in target],
                "short_side": round(min(box[2] - box[0], box[3] - box[1]), 4),
                "detected_box": None if blob is None else [round(v, 4) for v in blob.box],
                "iou": iou,
                "placed": iou >= PLACED_IOU,
                "shape_pred": shape,
                "color_pred": color,
                "identity": shape == sprite.shape and color == sprite.color,
                "emblem_visible": visible,  # False: a card above hides part of it in the true scene
            }
        )
    background = classify_background(array, case.boxes)
    detections = [
        {"color": c, "box": b.box, "score": b.fill * (0.5 + 0.5 * b.shape_score)}
        for c in world.COLOR_NAMES
        for b in blobs[c]
    ]
    return {
        "subjects": subjects,
        "background_pred": background,
        "background": background == case.background,
        "detections": detections,
        "overlaps": overlap_ownership(array, case, subjects),
        "fidelity": fidelity(array),
        "artefact": artefact_energy(array),
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
    """Means with 95% CIs (bootstrap over cases) of IoU, placed, AP50, identity, background, all-placed."""
    rng = np.random.default_rng(seed)
    n = len(scores)

    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    def stats(indices, with_ap: bool = True) -> dict:
        subset = [scores[i] for i in indices]
        subjects = [s for sc in subset for s in sc["subjects"]]
        placed = [s for s in subjects if s["placed"]]
        judged = [s for s in placed if s.get("emblem_visible", True)]  # identity where the truth shows it
        overlaps = [o for sc in subset for o in sc.get("overlaps", [])]
        out = {
            "iou": mean([s["iou"] for s in subjects]),
            "placed": mean([s["placed"] for s in subjects]),
            "identity": mean([s["identity"] for s in judged]),
            "shape": mean([s["shape_pred"] == s["sprite"].split()[1] for s in judged]),
            "background": mean([sc["background"] for sc in subset]),
            "all_placed": mean([all(s["placed"] for s in sc["subjects"]) for sc in subset]),
            "ap50": average_precision(subset) if with_ap else float("nan"),
            "fidelity": mean([sc["fidelity"] for sc in subset]),
            "artefact": mean([sc["artefact"] for sc in subset]),
        }
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
