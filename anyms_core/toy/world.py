"""The toy world: procedural scenes of sprites on named backgrounds, and their exact renderer.

A scene is a background (named by the prompt, e.g. "a photo on grass") and a list of sprites, each
drawn inside a box: the shape is inscribed in the largest centred square of the box (never
stretched). A sprite's identity is a shape x a colour (4 x 5 = 20 identities). The base model learns
to draw sprites that the prompt names ("a red triangle on grass"), as SDXL knows objects by name;
evaluation prompts name only the background, so in a generated image a sprite's identity and place can
only come from its reference image and AnyMS, as in real subject customization.

Everything here is deterministic for a seed. Boxes are normalized [x0, y0, x1, y1], origin top-left.
The batch renderer (`render_batch`) is vectorised torch code that runs on any device, so training can
draw its data on the GPU; `render_scene` / `sprite_reference` are the PIL front doors for one image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BACKGROUNDS: tuple[str, ...] = ("grass", "night", "sand", "snow", "water", "bricks")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
# Saturated sprite colours, each far (RGB distance >= 0.45) from every other one and from every
# background's palette, so that colour segmentation of a generated image is unambiguous.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.10, 0.10),
    "yellow": (0.98, 0.86, 0.08),
    "magenta": (0.86, 0.16, 0.86),
    "cyan": (0.08, 0.84, 0.92),
    "lime": (0.55, 0.96, 0.16),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# The canonical prompt for each background: what evaluation and the demos use.
DEFAULT_PROMPTS: dict[str, str] = {
    "grass": "a photo on grass",
    "night": "a photo at night",
    "sand": "a photo on sand",
    "snow": "a photo on snow",
    "water": "a photo on water",
    "bricks": "a photo on bricks",
}
_PLACE_WORDS: dict[str, str] = {b: DEFAULT_PROMPTS[b][len("a photo ") :] for b in BACKGROUNDS}
# Prompt templates used in training. "things" marks scenes with random sprites that the text does
# not control (stage 1 only); evaluation uses DEFAULT_PROMPTS, which never name a sprite.
EMPTY_TEMPLATES: tuple[str, ...] = ("a photo {place}", "{place}", "a scene {place}")
# Base-model training only: scenes whose sprites the prompt names, e.g. "a photo of a red triangle and
# a cyan circle on grass". Evaluation and the demos never name a sprite.
NAMED_TEMPLATES: tuple[str, ...] = ("a photo of {things} {place}", "{things} {place}")
# Every word any prompt may contain: the shipped tokenizer has one token per word.
VOCABULARY_WORDS: tuple[str, ...] = (
    "a", "photo", "scene", "of", "and", "on", "at",
    "grass", "night", "sand", "snow", "water", "bricks",
    "square", "circle", "triangle", "cross",
    "red", "yellow", "magenta", "cyan", "lime",
)  # fmt: skip


def named_prompt(background: str, sprites: "list[Sprite]", template: int = 0) -> str:
    """A training prompt that names the sprites (at most two), e.g. "a photo of a red circle at night"."""
    place = _PLACE_WORDS[background]
    if not sprites:
        return EMPTY_TEMPLATES[template % len(EMPTY_TEMPLATES)].format(place=place)
    things = " and ".join(f"a {s.color} {s.shape}" for s in sprites)
    return NAMED_TEMPLATES[template % len(NAMED_TEMPLATES)].format(things=things, place=place)

# A framed sprite's mean box: the object-centric training scenes inscribe a sprite in the whole image with margins
# of 0-8% per side (train.py); the diagnostics and the evaluation use this mean.
FRAMED_BOX: tuple[float, float, float, float] = (0.04, 0.04, 0.96, 0.96)

# A reference image's neutral backdrop (index len(BACKGROUNDS) in the batch renderer).
PLAIN_BACKGROUND = "plain"
_PLAIN_RGB = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Sprite:
    """A subject of the toy world: one of SHAPES in one of COLORS."""

    shape: str
    color: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLOR_NAMES}")

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def rgb(self) -> tuple[float, float, float]:
        return COLORS[self.color]

    @classmethod
    def parse(cls, name: "str | Sprite") -> "Sprite":
        """`Sprite.parse("red circle")`."""
        if isinstance(name, Sprite):
            return name
        parts = name.split()
        if len(parts) != 2:
            raise ValueError(f"a sprite is named '<colour> <shape>', e.g. 'red circle'; got {name!r}")
        return cls(shape=parts[1], color=parts[0])


ALL_SPRITES: tuple[Sprite, ...] = tuple(Sprite(s, c) for c in COLOR_NAMES for s in SHAPES)


# --------------------------------------------------------------------------------------------
# Vectorised batch renderer
# --------------------------------------------------------------------------------------------
def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def render_backgrounds(
    kinds: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Textured backgrounds [B, 3, H, W] in [0, 1]; `kinds` indexes BACKGROUNDS (len(BACKGROUNDS) = plain).

    Textures are defined in normalized coordinates so that a 64 px render looks like a 32 px one.
    """
    device = kinds.device
    b = kinds.shape[0]
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y = ys.view(1, height, 1).expand(b, height, width)
    x = xs.view(1, 1, width).expand(b, height, width)
    phase = _rand((b, 4), generator, device).view(b, 4, 1, 1) * 2 * math.pi
    pix = 0.4 * (_rand((b, height, width), generator, device) - 0.5)  # faint per-pixel grain
    col = _rand((b, 1, width), generator, device).expand(b, height, width) - 0.5  # grass blades
    stars = (_rand((b, height, width), generator, device) > 0.965).float()
    tint = _rand((b, 8, 8), generator, device) - 0.5  # per-brick tint

    def rgb(c):
        return torch.tensor(c, device=device, dtype=torch.float32).view(1, 3, 1, 1)

    out = torch.empty(b, 3, height, width, device=device)
    one = torch.ones(b, 1, height, width, device=device)
    # grass: green, vertical blades, darker towards the top
    grass = rgb((0.22, 0.47, 0.18)) * one + (0.08 * col + 0.04 * pix - 0.05 * (1 - y)).unsqueeze(1)
    # night: dark blue, lighter at the horizon, sparse stars
    night = rgb((0.04, 0.06, 0.20)) * one + 0.06 * y.unsqueeze(1) + stars.unsqueeze(1) * rgb((0.55, 0.55, 0.45))
    # sand: beige with diagonal ripples
    ripple = torch.sin(2 * math.pi * (5 * x + 3 * y) + phase[:, 0])
    sand = rgb((0.82, 0.72, 0.50)) * one + (0.045 * ripple + 0.03 * pix).unsqueeze(1)
    # snow: near white with a blue shade and fine grain
    snow = rgb((0.90, 0.92, 0.96)) * one + (0.025 * pix - 0.04 * x * torch.cos(phase[:, 1])).unsqueeze(1)
    # water: blue with horizontal waves
    wave = torch.sin(2 * math.pi * (5 * y + 0.25 * torch.sin(2 * math.pi * 2 * x + phase[:, 2])) + phase[:, 3])
    water = rgb((0.12, 0.32, 0.62)) * one + (0.07 * wave + 0.02 * pix).unsqueeze(1)
    # bricks: staggered rows of bricks with light mortar
    row = torch.floor(y * 4 + phase[:, 0] / (2 * math.pi))
    mortar_h = torch.frac(y * 4 + phase[:, 0] / (2 * math.pi)) < 0.14
    mortar_v = torch.frac(x * 3 + 0.5 * torch.remainder(row, 2) + phase[:, 1] / (2 * math.pi)) < 0.09
    brick_id_y = torch.remainder(row, 8).long()
    brick_id_x = torch.remainder(torch.floor(x * 3 + 0.5 * torch.remainder(row, 2)), 8).long()
    brick_tint = torch.gather(tint.view(b, 64), 1, (brick_id_y * 8 + brick_id_x).view(b, -1)).view(b, height, width)
    bricks = rgb((0.50, 0.22, 0.15)) * one + (0.08 * brick_tint + 0.02 * pix).unsqueeze(1)
    mortar = (mortar_h | mortar_v).unsqueeze(1).float()
    bricks = bricks * (1 - mortar) + rgb((0.72, 0.70, 0.66)) * mortar
    plain = rgb(_PLAIN_RGB) * one

    stack = torch.stack([grass, night, sand, snow, water, bricks, plain], dim=1)  # [B, 7, 3, H, W]
    index = kinds.view(b, 1, 1, 1, 1).expand(b, 1, 3, height, width)
    out = torch.gather(stack, 1, index).squeeze(1)
    return out.clamp(0, 1)


def sprite_alpha(
    shape_ids: torch.Tensor, boxes: torch.Tensor, height: int, width: int, supersample: int = 4
) -> torch.Tensor:
    """Anti-aliased coverage [B, K, H, W] in [0, 1] of K sprites per image; shape_ids [B, K], boxes [B, K, 4].

    Each shape is inscribed in the largest square (in pixels) centred in its box: a wide box holds a
    round circle, not an ellipse."""
    device = boxes.device
    b, k = shape_ids.shape
    hs, ws = height * supersample, width * supersample
    ys = (torch.arange(hs, device=device, dtype=torch.float32) + 0.5) / supersample  # pixel units
    xs = (torch.arange(ws, device=device, dtype=torch.float32) + 0.5) / supersample
    x0, y0, x1, y1 = (boxes[..., i].view(b, k, 1, 1) for i in range(4))
    half = (torch.minimum((x1 - x0) * width, (y1 - y0) * height) / 2).clamp_min(1e-6)
    cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
    u = (xs.view(1, 1, 1, ws) - cx) / half  # [-1, 1] across the inscribed square
    v = (ys.view(1, 1, hs, 1) - cy) / half
    u, v = torch.broadcast_tensors(u, v)
    au, av = u.abs(), v.abs()
    inside = (au <= 1) & (av <= 1)
    square = inside
    circle = u * u + v * v <= 1
    triangle = inside & (au <= (v + 1) / 2)  # apex at the top
    arm = 0.4
    cross = inside & ((au <= arm) | (av <= arm))
    masks = torch.stack([square, circle, triangle, cross], dim=2).float()  # [B, K, 4, hs, ws]
    index = shape_ids.view(b, k, 1, 1, 1).expand(b, k, 1, hs, ws)
    mask = torch.gather(masks, 2, index).squeeze(2)
    return F.avg_pool2d(mask.view(b * k, 1, hs, ws), supersample).view(b, k, height, width)


def inscribed_box(box: "list[float]", height: int, width: int) -> list[float]:
    """The normalized box of the square a sprite is drawn in (see `sprite_alpha`)."""
    x0, y0, x1, y1 = box
    side = min((x1 - x0) * width, (y1 - y0) * height)
    cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
    return [(cx - side / 2) / width, (cy - side / 2) / height, (cx + side / 2) / width, (cy + side / 2) / height]


def render_batch(
    backgrounds: torch.Tensor,
    shape_ids: torch.Tensor,
    color_ids: torch.Tensor,
    boxes: torch.Tensor,
    present: torch.Tensor,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    supersample: int = 4,
) -> torch.Tensor:
    """Render B scenes [B, 3, H, W] in [0, 1]. Sprites [B, K] are painted in order (later on top);
    `present` [B, K] (bool) switches sprites off so that scenes with fewer sprites share a batch."""
    image = render_backgrounds(backgrounds, height, width, generator)
    if shape_ids.shape[1] == 0:
        return image
    alpha = sprite_alpha(shape_ids, boxes, height, width, supersample) * present.float().view(*present.shape, 1, 1)
    palette = torch.tensor([COLORS[c] for c in COLOR_NAMES], device=image.device, dtype=torch.float32)
    rgb = palette[color_ids]  # [B, K, 3]
    for j in range(shape_ids.shape[1]):
        a = alpha[:, j : j + 1]
        image = image * (1 - a) + rgb[:, j].view(-1, 3, 1, 1) * a
    return image


# --------------------------------------------------------------------------------------------
# PIL front doors
# --------------------------------------------------------------------------------------------
def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """`size` is an int (square) or (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_box(box) -> list[float]:
    box = [float(v) for v in box]
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ValueError(f"a box is normalized [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1; got {box}")
    return box


def _background_index(background: str) -> int:
    if background == PLAIN_BACKGROUND:
        return len(BACKGROUNDS)
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS + (PLAIN_BACKGROUND,)}")
    return BACKGROUNDS.index(background)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL RGB."""
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def render_scene(
    background: str,
    subjects: list[tuple["Sprite | str", list[float]]],
    size: int | tuple[int, int] = 64,
    seed: int = 0,
) -> Image.Image:
    """The ground-truth image of a scene: `render_scene("grass", [("red circle", [0.1, 0.1, 0.5, 0.5])])`."""
    height, width = _size_hw(size)
    sprites = [Sprite.parse(s) for s, _ in subjects]
    boxes = torch.tensor([_check_box(b) for _, b in subjects], dtype=torch.float32).view(1, len(subjects), 4)
    generator = torch.Generator().manual_seed(seed)
    image = render_batch(
        torch.tensor([_background_index(background)]),
        torch.tensor([[SHAPES.index(s.shape) for s in sprites]], dtype=torch.long).view(1, -1),
        torch.tensor([[COLOR_NAMES.index(s.color) for s in sprites]], dtype=torch.long).view(1, -1),
        boxes,
        torch.ones(1, len(sprites), dtype=torch.bool),
        height,
        width,
        generator,
    )
    return to_pil(image[0])


def sprite_reference(
    sprite: "Sprite | str", size: int = 32, background: str = PLAIN_BACKGROUND, fill: float = 0.7, seed: int = 0
) -> Image.Image:
    """A reference image of one sprite: centred, `fill` of the side, on a plain (or named) backdrop."""
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1]; got {fill}")
    m = (1 - fill) / 2
    return render_scene(background, [(sprite, [m, m, 1 - m, 1 - m])], size=size, seed=seed)


# --------------------------------------------------------------------------------------------
# Seeded cases (evaluation, demos): held-out layouts with 1-5 subjects
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One layout-guided multi-subject task: a prompt (naming the background only) and subjects in boxes.

    `priorities` (None or one int per subject): where boxes overlap, the higher priority is drawn on top.
    """

    background: str
    prompt: str
    sprites: list[Sprite]
    boxes: list[list[float]]
    seed: int
    references: list[Image.Image] = field(default_factory=list, repr=False)
    priorities: list[int] | None = None

    @property
    def subjects(self) -> list[tuple[Sprite, list[float]]]:
        return list(zip(self.sprites, self.boxes))

    def paint_order(self) -> list[int]:
        """Subject indices from bottom to top (by priority, else list order: later on top)."""
        if self.priorities is None:
            return list(range(len(self.sprites)))
        return sorted(range(len(self.sprites)), key=lambda i: (self.priorities[i], i))

    def render(self, size: int | tuple[int, int] = 64) -> Image.Image:
        """The ideal output (the metrics' ceiling)."""
        subjects = self.subjects
        return render_scene(self.background, [subjects[i] for i in self.paint_order()], size=size, seed=self.seed)


# Per subject count: the range of a box's side (fraction of the image side). The shortest side of a
# box is never under 1/8 of the image (8 px at 64 px).
_BOX_SIDE = {
    1: (0.35, 0.7), 2: (0.3, 0.5), 3: (0.28, 0.45), 4: (0.25, 0.4), 5: (0.22, 0.36), 6: (0.2, 0.32), 7: (0.18, 0.3),
}  # fmt: skip
MIN_BOX_SIDE = 0.125
# Case seeds are drawn from this range; training draws its data from torch generators seeded
# with small integers and never sees these multi-subject layouts at all.
EVAL_SEED_OFFSET = 1_000_003


def _random_box(rng: random.Random, lo: float, hi: float) -> list[float]:
    side = rng.uniform(lo, hi)
    aspect = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    w = min(max(side * math.sqrt(aspect), MIN_BOX_SIDE), 0.95)
    h = min(max(side / math.sqrt(aspect), MIN_BOX_SIDE), 0.95)
    x0, y0 = rng.uniform(0.02, 0.98 - w), rng.uniform(0.02, 0.98 - h)
    return [round(x0, 4), round(y0, 4), round(x0 + w, 4), round(y0 + h, 4)]


def _sample_layout(rng: random.Random, n: int, gap: float = 0.03, tries: int = 2000) -> list[list[float]]:
    """n non-overlapping boxes (at least `gap` apart), side lengths from _BOX_SIDE[n], aspect 0.7-1.4."""
    lo, hi = _BOX_SIDE[n]
    for _ in range(tries):
        boxes: list[list[float]] = []
        for _ in range(n):
            for _ in range(200):
                box = _random_box(rng, lo, hi)
                if all(
                    box[0] >= o[2] + gap or o[0] >= box[2] + gap or box[1] >= o[3] + gap or o[1] >= box[3] + gap
                    for o in boxes
                ):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} non-overlapping boxes")


def overlap_fraction(a: list[float], b: list[float]) -> float:
    """Intersection area over the smaller box's area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller


OVERLAP_RANGE = (0.2, 0.5)


def _sample_overlapping_layout(rng: random.Random, n: int, tries: int = 20000) -> list[list[float]]:
    """n boxes (2 or 3) in a chain: each overlaps the previous one by OVERLAP_RANGE of the smaller box;
    boxes that are not neighbours in the chain do not overlap."""
    lo, hi = OVERLAP_RANGE
    for _ in range(tries):
        boxes = [_random_box(rng, 0.35, 0.55)]
        for _ in range(n - 1):
            for _ in range(500):
                box = _random_box(rng, 0.35, 0.55)
                if lo <= overlap_fraction(box, boxes[-1]) <= hi and all(overlap_fraction(box, o) == 0 for o in boxes[:-1]):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} overlapping boxes")


def _case(rng: random.Random, n_subjects: int, seed: int, boxes, background, reference_size, priorities=None) -> Case:
    background = background or rng.choice(BACKGROUNDS)
    distinct = min(n_subjects, len(COLOR_NAMES))
    colors = rng.sample(COLOR_NAMES, distinct) + [rng.choice(COLOR_NAMES) for _ in range(n_subjects - distinct)]
    sprites = [Sprite(rng.choice(SHAPES), c) for c in colors]
    references = [sprite_reference(s, size=reference_size, seed=seed + i) for i, s in enumerate(sprites)]
    return Case(background, DEFAULT_PROMPTS[background], sprites, boxes, seed, references, priorities)


def make_case(n_subjects: int, seed: int, background: str | None = None, reference_size: int = 32) -> Case:
    """One seeded case: a background, `n_subjects` sprites and non-overlapping boxes. Colours are
    distinct up to 5 subjects (segmentation stays unambiguous); 6 and 7 subjects repeat colours."""
    if n_subjects not in _BOX_SIDE:
        raise ValueError(f"n_subjects must be in {sorted(_BOX_SIDE)}; got {n_subjects}")
    rng = random.Random(seed)
    background = background or rng.choice(BACKGROUNDS)
    boxes = _sample_layout(rng, n_subjects)
    return _case(rng, n_subjects, seed, boxes, background, reference_size)


def make_overlap_case(n_subjects: int, seed: int, reference_size: int = 32) -> Case:
    """A case of the overlap family: 2-3 subjects whose boxes overlap (a chain, 20-50% of the smaller
    box), distinct explicit priorities; the highest-priority subject is listed first in even seeds and
    last in odd ones."""
    if n_subjects not in (2, 3):
        raise ValueError(f"overlap cases have 2 or 3 subjects; got {n_subjects}")
    rng = random.Random(seed)
    background = rng.choice(BACKGROUNDS)
    boxes = _sample_overlapping_layout(rng, n_subjects)
    priorities = list(range(n_subjects, 0, -1)) if seed % 2 == 0 else list(range(1, n_subjects + 1))
    # shuffle which chain position gets which priority, keeping "highest first/last" in the list order
    order = list(range(n_subjects))
    rng.shuffle(order)
    boxes = [boxes[i] for i in order]
    return _case(rng, n_subjects, seed, boxes, background, reference_size, priorities)


def make_cases(n_subjects: int, n_cases: int, seed: int = 0, overlap: bool = False) -> list[Case]:
    """`n_cases` held-out cases with `n_subjects` each; reproducible from `seed` (seed 0: the reported
    set; seed 1: validation, used to choose sampling defaults)."""
    base = EVAL_SEED_OFFSET + 1_000_000 * seed + 10_000 * n_subjects + (500_000 if overlap else 0)
    make = make_overlap_case if overlap else make_case
    return [make(n_subjects, base + i) for i in range(n_cases)]
