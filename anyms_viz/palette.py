"""Colours and raster overlays shared by the figures and the widgets.

One palette everywhere: subject ``i`` has the same colour in a notebook figure, an exported PDF and a
widget's PNG. The subject colours are Okabe-Ito (colour-blind safe), ordered so that the first five
all read well as text on white; the heatmap and difference colour maps are perceptually uniform and
colour-blind safe as well.

The raster helpers here (``overlay_heatmap``, ``draw_boxes_on_image``) need only PIL and numpy, so a
widget can make a PNG without creating a matplotlib figure.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

# Okabe & Ito (2008), "Color Universal Design". Yellow and sky blue come late: they are hard to read as
# text on white, and most layouts have at most five subjects.
SUBJECT_COLORS: tuple[str, ...] = (
    "#D55E00",  # vermillion
    "#0072B2",  # blue
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
HEATMAP_CMAP = "viridis"  # attention maps: sequential, perceptually uniform
DIFFERENCE_CMAP = "RdBu_r"  # differences between variants: diverging, symmetric around zero
OVERLAP_COLOR = "#FFFFFF"  # outlines of regions where two or more boxes overlap


def subject_color(index: int) -> str:
    """The hex colour of subject ``index`` (the palette repeats after eight subjects)."""
    if index < 0:
        raise ValueError(f"Subject index must be >= 0, got {index}.")
    return SUBJECT_COLORS[index % len(SUBJECT_COLORS)]


def subject_color_rgb(index: int) -> tuple[int, int, int]:
    """The colour of subject ``index`` as 8-bit RGB, for PIL drawing."""
    value = subject_color(index).lstrip("#")
    return tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def box_to_pixels(box: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A normalized ``[x0, y0, x1, y1]`` box (origin top-left) in pixel edges of a ``(width, height)`` image."""
    if len(box) != 4:
        raise ValueError(f"A box is four numbers [x0, y0, x1, y1], got {list(box)!r}.")
    width, height = image_size
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 * width, y0 * height, x1 * width, y1 * height


def heatmap_to_rgba(values: np.ndarray, vmin: float = 0.0, vmax: float | None = None,
                    cmap: str = HEATMAP_CMAP, alpha: float = 1.0) -> np.ndarray:
    """A 2-D map as uint8 RGBA ``[h, w, 4]`` through ``cmap``, scaled from ``vmin`` to ``vmax`` (default: its max)."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"A heatmap is a 2-D array, got shape {values.shape}.")
    if vmax is None:
        vmax = float(values.max())
    span = vmax - vmin
    scaled = np.clip((values - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    rgba = colormaps[cmap](scaled)
    rgba[..., 3] = alpha
    return (rgba * 255).round().astype(np.uint8)


def overlay_heatmap(image: Image.Image, values: np.ndarray, vmin: float = 0.0, vmax: float | None = None,
                    cmap: str = HEATMAP_CMAP, alpha: float = 0.65, greyscale: bool = True) -> Image.Image:
    """``values`` drawn over ``image`` (resized to it with nearest neighbour, so grid cells stay visible)."""
    base = image.convert("L").convert("RGBA") if greyscale else image.convert("RGBA")
    heat = Image.fromarray(heatmap_to_rgba(values, vmin, vmax, cmap, alpha), mode="RGBA")
    heat = heat.resize(base.size, Image.NEAREST)
    return Image.alpha_composite(base, heat).convert("RGB")


def draw_boxes_on_image(image: Image.Image, boxes: Sequence[Sequence[float]], names: Sequence[str] | None = None,
                        colors: Sequence[str] | None = None, width: int = 2) -> Image.Image:
    """A copy of ``image`` with each normalized box outlined in its subject colour (and its name, if given)."""
    if names is not None and len(names) != len(boxes):
        raise ValueError(f"Got {len(names)} names for {len(boxes)} boxes.")
    if colors is not None and len(colors) != len(boxes):
        raise ValueError(f"Got {len(colors)} colours for {len(boxes)} boxes.")
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for index, box in enumerate(boxes):
        x0, y0, x1, y1 = box_to_pixels(box, out.size)
        color = colors[index] if colors is not None else subject_color(index)
        # PIL's rectangle includes its end pixel: the last pixel inside the box is x1 - 1.
        draw.rectangle([round(x0), round(y0), max(round(x1) - 1, round(x0)), max(round(y1) - 1, round(y0))],
                       outline=color, width=width)
        if names is not None:
            draw.text((round(x0) + width + 1, round(y0) + width), names[index], fill=color)
    return out
