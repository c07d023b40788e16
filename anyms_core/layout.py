"""Subjects, boxes and their rasterisation onto the attention grids of a UNet.

Boxes are normalized ``[x0, y0, x1, y1]`` with the origin at the top-left, everywhere in the public
API. The processors never see boxes: they see a :class:`GridLayout`, the exact per-cell rasterisation
of all boxes for one attention grid (one UNet level), computed once per grid size and cached.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from .config import PRIORITY_RULES, SubjectConfig, real_number, validate_box

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray]

__all__ = ["PRIORITY_RULES", "GridLayout", "Subject", "box_to_cells", "image_digest", "level_grid", "load_reference_image",
           "paint_order", "round_half_up", "subject_names", "validate_box", "validate_subjects"]


def load_reference_image(image: ImageLike) -> Image.Image:
    """Returns ``image`` as an 8-bit RGB PIL image, or raises a ``ValueError`` saying why it cannot."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read the reference image {os.fspath(image)!r}: {error}") from None
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            f"A subject image must be a PIL image, a path or a numpy array, got {type(image).__name__}."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"A subject image must not be empty, got {image.width}x{image.height} pixels.")
    return _to_rgb(image)


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"A subject image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"A subject image must not be empty, got an array of shape {array.shape}.")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("A subject image array contains NaN or infinite values.")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError("A float subject image array must hold values in [0, 1].")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"A subject image array must be uint8, uint16 or float in [0, 1], got {array.dtype}.")
    return Image.fromarray(array)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB; transparency is composited over white (the reference's backdrop)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of PIL's clipping conversion.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return Image.fromarray(np.round(np.clip(array / peak, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first (PIL has no La -> RGB)
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert a subject image of mode {image.mode!r} to RGB: {error}") from None


def image_digest(image: Image.Image) -> str:
    """``"sha256:<hex>"`` of an RGB image's size and pixels: how a run records an in-memory reference image."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class Subject:
    """A subject to place: its reference image and its normalized box ``[x0, y0, x1, y1]``.

    Immutable: the box is checked once, here, and cannot change afterwards (build a new ``Subject``, e.g.
    with ``dataclasses.replace(subject, box=...)``, which validates again). ``box`` is kept as a tuple
    of floats and ``image`` as an 8-bit RGB PIL image.

    ``priority``: where boxes overlap, the subject with the higher priority owns the overlap. A subject
    that sets none has priority 0; among equal priorities the session's priority rule decides (by
    default the later subject in the list wins).
    """

    image: ImageLike
    box: Sequence[float]
    name: str | None = None
    priority: float | None = None
    source: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"A subject's name must be a string, got {type(self.name).__name__} {self.name!r}.")
        label = f"subject {self.name!r}" if self.name else "subject"
        object.__setattr__(self, "box", validate_box(self.box, what=f"box of {label}"))
        if self.priority is not None:
            object.__setattr__(self, "priority", real_number(self.priority, f"priority of {label}"))
        source = os.fspath(self.image) if isinstance(self.image, (str, os.PathLike)) else None
        object.__setattr__(self, "image", load_reference_image(self.image))
        object.__setattr__(self, "source", source)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)

    def to_config(self, image: str | None = None) -> SubjectConfig:
        """This subject as a :class:`~anyms_core.config.SubjectConfig`; the image is recorded as ``image``
        if given, else as the path it was read from, else by the hash of its pixels."""
        return SubjectConfig(box=self.box, name=self.name, priority=self.priority,
                             image=image or self.source or image_digest(self.image))


def validate_subjects(subjects: Sequence[Subject]) -> list[Subject]:
    if isinstance(subjects, Subject):
        raise ValueError("subjects must be a list of anyms_core.Subject, got a single Subject: wrap it in a list.")
    subjects = list(subjects)
    if not subjects:
        raise ValueError("AnyMS needs at least one subject.")
    for index, subject in enumerate(subjects):
        if not isinstance(subject, Subject):
            raise ValueError(f"subjects[{index}] must be an anyms_core.Subject, got {type(subject).__name__}.")
    return subjects


def subject_names(subjects: Sequence[Subject]) -> list[str]:
    return [subject.name if subject.name else f"subject {index}" for index, subject in enumerate(subjects)]


def paint_order(subjects: Sequence[Subject], rule: str = "order") -> list[int]:
    """Subject indices from lowest to highest priority: painting in this order lets the owner win.

    Explicit priorities decide first (higher wins; a subject without one has priority 0). Among equal
    priorities (e.g. when none is set) the rule decides: ``"order"``: later in the list wins;
    ``"area"``: the smaller box wins (equal areas: later wins).
    """
    if rule not in PRIORITY_RULES:
        raise ValueError(f"Unknown priority rule {rule!r}; choose one of {PRIORITY_RULES}.")

    def priority(i: int) -> float:
        return subjects[i].priority if subjects[i].priority is not None else 0.0

    if rule == "area":
        return sorted(range(len(subjects)), key=lambda i: (priority(i), -subjects[i].area, i))
    return sorted(range(len(subjects)), key=lambda i: (priority(i), i))


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def box_to_cells(box: Sequence[float], grid_height: int, grid_width: int) -> tuple[int, int, int, int]:
    """Rasterises a normalized box to ``(row0, row1, col0, col1)`` (end-exclusive) on a grid.

    Edges round half up (not Python's banker's rounding) so a box covers the same cells at every
    level, and a box always keeps at least one cell.
    """
    x0, y0, x1, y1 = box
    col0, col1 = _edges_to_cells(x0, x1, grid_width)
    row0, row1 = _edges_to_cells(y0, y1, grid_height)
    return row0, row1, col0, col1


def _edges_to_cells(start: float, end: float, size: int) -> tuple[int, int]:
    first = min(round_half_up(start * size), size - 1)
    last = max(round_half_up(end * size), first + 1)
    return first, min(last, size)


def level_grid(latent_height: int, latent_width: int, sequence_length: int) -> tuple[int, int]:
    """The (height, width) of the attention grid with ``sequence_length`` queries.

    UNet levels halve with ceil (stride-2 convs with padding 1), so level k has
    ``ceil(h / 2**k) x ceil(w / 2**k)`` cells. Never guessed from a square root.
    """
    height, width = latent_height, latent_width
    for _ in range(16):
        if height * width == sequence_length:
            return height, width
        if height == 1 and width == 1:
            break
        height, width = -(-height // 2), -(-width // 2)
    raise ValueError(
        f"No UNet level of a {latent_height}x{latent_width} latent has {sequence_length} positions; "
        "the attention layer's input does not come from this UNet's spatial grid."
    )


@dataclass
class GridLayout:
    """All boxes rasterised on one attention grid.

    ``cells[j]``: subject j's box as (row0, row1, col0, col1); ``owner``: per cell the index of the
    subject that owns it under the priority order, -1 outside all boxes; ``masks``: [S, h*w] hard 0/1
    box masks (float, for the mask-only ablation).
    """

    height: int
    width: int
    cells: list[tuple[int, int, int, int]]
    paint_order: list[int]
    owner: torch.Tensor
    masks: torch.Tensor
    _device_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, boxes: Sequence[Sequence[float]], order: Sequence[int], height: int, width: int) -> "GridLayout":
        cells = [box_to_cells(box, height, width) for box in boxes]
        owner = torch.full((height, width), -1, dtype=torch.long)
        masks = torch.zeros(len(boxes), height, width)
        for index, (row0, row1, col0, col1) in enumerate(cells):
            masks[index, row0:row1, col0:col1] = 1.0
        for index in order:
            row0, row1, col0, col1 = cells[index]
            owner[row0:row1, col0:col1] = index
        return cls(height, width, cells, list(order), owner.flatten(), masks.flatten(1))

    def masks_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = ("masks", device, dtype)
        if key not in self._device_cache:
            self._device_cache[key] = self.masks.to(device=device, dtype=dtype)
        return self._device_cache[key]

    def crop_and_merge_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors for crop-and-merge, built once per grid and device.

        ``crop``: [S, L] flat indices of the cells of each subject's box (row-major), padded to the largest
        box by repeating its last cell (padded rows are computed but never read). ``merge``: [N] for each
        cell, the row of its owner's crop in the concatenated crops (``j * L + position``), or ``S * L`` (a
        zero row) outside all boxes.
        """
        key = ("crop_and_merge", device)
        if key not in self._device_cache:
            boxes = [torch.arange(self.height * self.width).view(self.height, self.width)[r0:r1, c0:c1].flatten()
                     for r0, r1, c0, c1 in self.cells]
            length = max(len(cells) for cells in boxes)
            crop = torch.stack([torch.cat([cells, cells[-1:].expand(length - len(cells))]) for cells in boxes])
            merge = torch.full((self.height * self.width,), len(boxes) * length, dtype=torch.long)
            for subject in self.paint_order:  # later in the paint order overwrites: the owner's row wins
                merge[boxes[subject]] = subject * length + torch.arange(len(boxes[subject]))
            self._device_cache[key] = (crop.to(device), merge.to(device))
        return self._device_cache[key]

    def owner_one_hot_on(self, device: torch.device) -> torch.Tensor:
        """[N, S] float: 1 where subject j owns the cell."""
        key = ("owner_one_hot", device)
        if key not in self._device_cache:
            subjects = torch.arange(self.masks.shape[0])
            self._device_cache[key] = (self.owner[:, None] == subjects[None, :]).float().to(device)
        return self._device_cache[key]
