"""Colours and raster overlays shared by the figures and the widgets.

One rule everywhere, :func:`subject_colors`: the same subject names get the same colours in a notebook
figure, an exported PDF and a widget. A toy-world subject named like a sprite (``"red circle"``) is
drawn in its own colour, a shade darker (so the box never contradicts the sprite: a red circle's box is
red, not orange); every other subject gets an Okabe-Ito colour (colour-blind safe), in order, skipping
those whose hue is close to a sprite colour in the same list. The heatmap and difference colour maps
are perceptually uniform and colour-blind safe as well.

The raster helpers here (``overlay_heatmap``, ``draw_boxes_on_image``) need only PIL and numpy, so a
widget can make a PNG without creating a matplotlib figure.
"""

from __future__ import annotations

import colorsys
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
SPRITE_SHADE = 0.85  # toy sprite colours are drawn this much darker: same hue, outlines stay visible on light images
SIMILAR_HUE_DEGREES = 30.0  # an Okabe-Ito colour this close in hue to a sprite colour in the same figure is skipped


def subject_colors(names: Sequence[str]) -> list[str]:
    """The hex colour of each subject, by name: the one colour rule of every figure and widget.

    A name that parses as a toy-world sprite (``"<colour> <shape>"``, e.g. ``"red circle"``) gets that
    sprite's own colour, ``SPRITE_SHADE`` darker (same hue). Every other name gets the next Okabe-Ito
    colour of ``SUBJECT_COLORS`` in order, skipping colours within ``SIMILAR_HUE_DEGREES`` of the hue of a
    sprite colour in ``names`` (so a non-toy subject never looks like a toy one); with no sprite names
    this is simply ``SUBJECT_COLORS[i]`` for subject ``i``. Two sprites of one colour share it.
    """
    sprite_rgbs = [_sprite_rgb(name) for name in names]
    sprite_hues = [colorsys.rgb_to_hsv(*rgb)[0] for rgb in sprite_rgbs if rgb is not None]
    others = [color for color in SUBJECT_COLORS if not _hue_is_near(color, sprite_hues)] or list(SUBJECT_COLORS)
    colors, next_other = [], 0
    for rgb in sprite_rgbs:
        if rgb is not None:
            colors.append(_to_hex([SPRITE_SHADE * value for value in rgb]))
        else:
            colors.append(others[next_other % len(others)])
            next_other += 1
    return colors


def color_rgb(color: str) -> tuple[int, int, int]:
    """A ``"#RRGGBB"`` colour as 8-bit RGB, for PIL drawing."""
    value = color.lstrip("#")
    return tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def _sprite_rgb(name: str) -> tuple[float, float, float] | None:
    """The RGB (0..1) of the toy sprite called ``name``, or None when ``name`` is not a sprite's name."""
    from anyms_core.toy.world import Sprite  # lazy: the palette does not need the toy world otherwise

    try:
        return Sprite.parse(name).rgb
    except ValueError:
        return None


def _hue_is_near(color: str, hues: Sequence[float]) -> bool:
    hue, saturation, _ = colorsys.rgb_to_hsv(*(value / 255 for value in color_rgb(color)))
    if saturation < 0.2:  # black and greys have no hue to confuse
        return False
    return any(min(abs(hue - h), 1 - abs(hue - h)) * 360 < SIMILAR_HUE_DEGREES for h in hues)


def _to_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(min(max(value, 0.0), 1.0) * 255):02X}" for value in rgb)


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
    """A copy of ``image`` with each normalized box outlined in its colour (and its name, if given).

    ``colors`` default to ``subject_colors(names)`` (without names: the Okabe-Ito colours in order).
    """
    if names is not None and len(names) != len(boxes):
        raise ValueError(f"Got {len(names)} names for {len(boxes)} boxes.")
    if colors is not None and len(colors) != len(boxes):
        raise ValueError(f"Got {len(colors)} colours for {len(boxes)} boxes.")
    if colors is None:
        colors = subject_colors(names if names is not None else [""] * len(boxes))
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for index, box in enumerate(boxes):
        x0, y0, x1, y1 = box_to_pixels(box, out.size)
        color = colors[index]
        # PIL's rectangle includes its end pixel: the last pixel inside the box is x1 - 1.
        draw.rectangle([round(x0), round(y0), max(round(x1) - 1, round(x0)), max(round(y1) - 1, round(y0))],
                       outline=color, width=width)
        if names is not None:
            draw.text((round(x0) + width + 1, round(y0) + width), names[index], fill=color)
    return out
