"""Small conversions the widgets share: PIL images and figures to PNG bytes and data URLs."""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image | np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib ``Figure`` (drawn with Agg: no pyplot, no global state)."""
    if figure.canvas is None or not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def upscale(image: Image.Image, longest_side: int) -> Image.Image:
    """``image`` enlarged with nearest neighbour so its longest side is about ``longest_side``.

    Toy images are 32x32: enlarging by a whole factor keeps every pixel (and attention cell) crisp.
    """
    factor = max(1, round(longest_side / max(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def png_mimebundle(widget_bundle: dict | tuple[dict, dict] | None, png: bytes) -> tuple[dict, dict]:
    """A widget's own mime bundle plus a static PNG, for viewers without a kernel (GitHub, nbconvert).

    Front ends with the widget manager show the live widget (its mime type ranks first); others the PNG.
    """
    data, metadata = widget_bundle if isinstance(widget_bundle, tuple) else (widget_bundle or {}, {})
    return {**data, "image/png": base64.b64encode(png).decode("ascii")}, dict(metadata)
