"""``StepScrubber``: play through the denoising steps of a ``Run``, with per-subject attention maps.

Each frame shows the predicted clean image (x0) at one step and, for the chosen kind of map, one
panel per subject (or prompt word) with the map over that step's image and the boxes on top. All
steps and panels of a selection share one colour scale (0 to the largest value, or the smallest to
the largest: affinities of a few subjects all sit near 1/S), so a map growing over the steps looks like it. Frames are rasters (PIL, no matplotlib), cheap enough to play.
"""

from __future__ import annotations

import base64
import html
from typing import Sequence

import ipywidgets as widgets
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from anyms_core import Run

from .. import figures
from ..palette import HEATMAP_CMAP, draw_boxes_on_image, heatmap_to_rgba, overlay_heatmap, subject_colors
from ._images import figure_png, png_bytes, png_mimebundle, upscale

ALL_LAYERS = "all layers"


def recorded_kinds(run: Run) -> list[str]:
    """The kinds of map ``run`` actually holds (a ``text`` run records no image-branch maps)."""
    if run.attention is None:
        return []
    present = {kind for kind, _, _ in run.attention.entries}
    return [kind for kind in run.attention.kinds if kind in present]


def layer_choices(run: Run) -> list[tuple[str, dict]]:
    """(label, selection) pairs for the layers dropdown: all layers, each grid size, and under the
    ``layer`` policy each UNet block (``down_blocks.1``, ``mid_block``, ...)."""
    choices: list[tuple[str, dict]] = [(ALL_LAYERS, {})]
    if run.attention is None:
        return choices
    for height, width in run.attention.resolutions:
        choices.append((f"{height}x{width} grid", {"resolution": (height, width)}))
    if run.attention.policy == "layer":
        blocks = []
        for key in run.attention.keys:
            parts = key.split(".")
            block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
            if block not in blocks:
                blocks.append(block)
        choices.extend((block, {"layers": block + "."}) for block in blocks)
    return choices


class StepScrubber(widgets.VBox):
    """A slider (with play / pause) over the denoising steps of ``run``.

    Args:
        run: the run to show (``set_run`` swaps it); None shows an empty scrubber.
        kind: ``"affinity"``, ``"contribution"`` or ``"text"`` (one panel per recorded prompt word);
            default: the first kind the run recorded.
        panel_size: the longest side of each panel in screen pixels.
        interval_ms: time per step while playing.
    """

    def __init__(self, run: Run | None = None, kind: str | None = None, panel_size: int = 192, interval_ms: int = 350) -> None:
        self.run: Run | None = None
        self.panel_size = panel_size
        self._maps_cache: dict[tuple[str, str], tuple[dict[int, np.ndarray], float, float]] = {}
        self.play = widgets.Play(min=0, max=0, step=1, interval=interval_ms, description="play", show_repeat=False)
        # No read-out: the slider counts from 0, people count steps from 1; the label says "step k / N".
        self.slider = widgets.IntSlider(min=0, max=0, description="step", continuous_update=True, readout=False,
                                        layout=widgets.Layout(width="360px"))
        self.slider.add_class("anyms-step-slider")
        widgets.jslink((self.play, "value"), (self.slider, "value"))  # playing needs no kernel round trip
        self.kind = widgets.Dropdown(description="maps", layout=widgets.Layout(width="220px"))
        self.layers = widgets.Dropdown(description="layers", layout=widgets.Layout(width="240px"))
        self.range = widgets.Dropdown(options=[("0 to max", "zero"), ("min to max", "min")], value="zero",
                                      description="colours", layout=widgets.Layout(width="200px"))
        self.step_label = widgets.HTML()
        self.step_label.add_class("anyms-step-label")
        self.panels = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.scale = widgets.HTML()
        controls = widgets.HBox([self.play, self.slider, self.step_label])
        options = widgets.HBox([self.kind, self.layers, self.range], layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__([controls, options, self.panels, self.scale])
        self.add_class("anyms-step-scrubber")
        self.slider.observe(lambda _: self._draw(), names="value")
        self.kind.observe(lambda _: self._draw(), names="value")
        self.layers.observe(lambda _: self._draw(), names="value")
        self.range.observe(lambda _: self._draw(), names="value")
        self.set_run(run, kind=kind)

    # --- state -----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.slider.value

    @step.setter
    def step(self, value: int) -> None:
        if not self.slider.min <= value <= self.slider.max:
            raise ValueError(f"Step {value} is out of range {self.slider.min}..{self.slider.max}.")
        self.slider.value = value

    def set_run(self, run: Run | None, kind: str | None = None) -> None:
        """Shows ``run`` from its last step, keeping the chosen kind and layers when the run has them."""
        if run is not None and not isinstance(run, Run):
            raise ValueError(f"StepScrubber shows an anyms_core.Run, got {type(run).__name__}.")
        kinds = recorded_kinds(run) if run is not None else []
        if kind is not None and kind not in kinds:
            raise ValueError(f"This run has no {kind!r} maps; it has {kinds or 'none'}.")
        self.run = run
        self._maps_cache.clear()
        wanted_kind = kind or (self.kind.value if self.kind.value in kinds else (kinds[0] if kinds else None))
        layer_labels = [label for label, _ in layer_choices(run)] if run is not None else [ALL_LAYERS]
        wanted_layers = self.layers.value if self.layers.value in layer_labels else ALL_LAYERS
        # The observers stay quiet while options and values change: one _draw at the end.
        self._drawing_enabled = False
        try:
            self.kind.options = kinds or ["no maps recorded"]
            self.kind.value = wanted_kind or "no maps recorded"
            self.kind.disabled = not kinds
            self.layers.options = layer_labels
            self.layers.value = wanted_layers
            self.layers.disabled = not kinds
            last = max(self.num_steps - 1, 0)
            self.play.playing = False
            self.slider.max = self.play.max = last
            self.slider.value = self.play.value = last
            self.slider.disabled = self.play.disabled = self.num_steps <= 1
        finally:
            self._drawing_enabled = True
        self._draw()

    @property
    def num_steps(self) -> int:
        return len(self.run.previews) if self.run is not None else 0

    def _selection(self) -> dict:
        return dict(layer_choices(self.run)).get(self.layers.value, {})

    def _maps(self) -> tuple[dict[int, np.ndarray], float, float] | None:
        """Maps of the chosen kind and layers, {step: [items, h, w]} for every recorded step, and the colour range."""
        if self.run is None or self.kind.value not in recorded_kinds(self.run):
            return None
        key = (self.kind.value, self.layers.value)
        if key not in self._maps_cache:
            kind = self.kind.value
            steps = sorted({step for k, step, _ in self.run.attention.entries if k == kind})
            maps = self.run.attention.maps(kind, steps=steps, per_step=True, **self._selection())
            low, high = (float(maps.min()), float(maps.max())) if maps.size else (0.0, 0.0)
            self._maps_cache[key] = (dict(zip(steps, maps)), low, high)
        by_step, low, high = self._maps_cache[key]
        vmin = low if self.range.value == "min" else 0.0
        return by_step, vmin, high if high > vmin else vmin + 1.0

    # --- drawing ---------------------------------------------------------------------------------
    def frame(self, step: int | None = None) -> list[tuple[str, Image.Image]]:
        """The panels of one step as (caption, image) pairs: the predicted x0, then one per map item."""
        run = self.run
        if run is None:
            return []
        step = self.step if step is None else step
        boxes = run.boxes
        colors = subject_colors(run.subject_names)
        if run.previews:
            base = Image.fromarray(run.previews[step]).resize(run.image.size, Image.NEAREST)
            caption = f"predicted x0 · step {step + 1}/{self.num_steps}"
        else:
            base, caption = run.image, "final image (no per-step previews recorded)"
        base = upscale(base, self.panel_size)
        panels = [(caption, draw_boxes_on_image(base, boxes, colors=colors))]
        maps = self._maps()
        if maps is None:
            return panels
        by_step, vmin, vmax = maps
        for index, item in enumerate(run.attention.items(self.kind.value)):
            if step not in by_step:
                panels.append((f"{item}: no map at this step", base))
                continue
            overlaid = overlay_heatmap(base, by_step[step][index], vmin=vmin, vmax=vmax)
            outlined = draw_boxes_on_image(overlaid, boxes, colors=colors, width=1)
            if self.kind.value != "text":  # the subject's own box, bold
                outlined = draw_boxes_on_image(outlined, [boxes[index]], colors=[colors[index]], width=3)
            panels.append((f"{self.kind.value}: {item}", outlined))
        return panels

    def _draw(self) -> None:
        if not getattr(self, "_drawing_enabled", True):
            return
        if self.run is None:
            self.panels.children = [widgets.HTML("<i>No run yet.</i>")]
            self.step_label.value = ""
            self.scale.value = ""
            return
        self.step_label.value = f"<b>step {self.step + 1} / {self.num_steps}</b>"
        panels = self.frame()
        children = list(self.panels.children)
        if len(children) != len(panels) or not all(isinstance(c, widgets.VBox) for c in children):
            # Built once per layout; later frames only swap the images, so nothing flickers.
            children = [widgets.VBox([widgets.HTML(), widgets.Image(format="png")]) for _ in panels]
            self.panels.children = children
        for child, (caption, image) in zip(children, panels):
            label, picture = child.children
            label.value = f"<div style='font-size: 11px; line-height: 1.2'>{html.escape(caption)}</div>"
            picture.value = png_bytes(image)
            picture.width = image.width
            picture.add_class("anyms-panel")
            child.layout.width = f"{image.width + 8}px"  # captions wrap instead of running into the next panel
        maps = self._maps()
        self.scale.value = "" if maps is None else _colour_scale_html(self.kind.value, maps[1], maps[2])

    # --- static pictures -------------------------------------------------------------------------
    def plot(self, step: int | None = None, axes: Sequence[Axes] | None = None) -> Figure:
        """One step as a figure: the predicted x0 and each map panel, on ``axes`` (new figure if None)."""
        if self.run is None:
            raise ValueError("StepScrubber has no run to plot; call set_run(run) first.")
        panels = self.frame(step)
        if axes is None:
            figure = Figure(figsize=(2.2 * len(panels), 2.4), layout="constrained")
            axes = figure.subplots(1, len(panels), squeeze=False)[0]
        axes = list(axes)
        if len(axes) != len(panels):
            raise ValueError(f"This step has {len(panels)} panels; got {len(axes)} axes.")
        for ax, (caption, image) in zip(axes, panels):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(caption, fontsize=8)
            ax.set_axis_off()
        return axes[0].figure

    def to_png(self) -> bytes:
        """The static picture: every step's x0 (and the maps) as a film strip, else the current frame."""
        if self.run is None:
            return png_bytes(Image.new("RGB", (200, 40), "white"))
        if self.run.previews:
            kind = self.kind.value if self.kind.value in recorded_kinds(self.run) else None
            return figure_png(figures.plot_steps(self.run, kind=kind, **self._selection()), dpi=80)
        return figure_png(self.plot(), dpi=80)

    def _repr_mimebundle_(self, **kwargs):
        return png_mimebundle(super()._repr_mimebundle_(**kwargs), self.to_png())


def _colour_scale_html(kind: str, vmin: float, vmax: float) -> str:
    """A colour bar as an inline PNG, with its range: the same scale for every step and panel."""
    gradient = heatmap_to_rgba(np.linspace(0, 1, 160, dtype=np.float32)[None].repeat(10, 0), vmin=0.0, vmax=1.0, cmap=HEATMAP_CMAP)
    encoded = base64.b64encode(png_bytes(gradient)).decode("ascii")
    return (f"<span style='font-size: 11px'>{html.escape(kind)}: {vmin:.3g} "
            f"<img src='data:image/png;base64,{encoded}' style='vertical-align: middle; height: 10px'> "
            f"{vmax:.3g} (one scale for all steps and panels)</span>")
