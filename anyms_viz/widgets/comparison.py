"""``VariantComparison``: one case and seed under several variants, side by side.

The view is :func:`anyms_viz.figures.plot_comparison` (images, per-subject maps on one shared colour
scale, difference maps against a reference variant), re-drawn when a control changes.
"""

from __future__ import annotations

import html
from typing import Sequence

import ipywidgets as widgets
from matplotlib.figure import Figure

from anyms_core import VARIANTS, AnyMS, Run, Subject
from anyms_core.variants import check_variant

from .. import figures
from ._images import figure_png, png_mimebundle
from .scrubber import layer_choices, recorded_kinds

DEFAULT_VARIANTS = ("anyms", "mask", "none")


def generate_variants(anyms: AnyMS, prompt: str, subjects: Sequence[Subject], variants: Sequence[str] = DEFAULT_VARIANTS,
                      seed: int = 0, **generate_kwargs) -> list[Run]:
    """The same case and seed under each of ``variants`` (any subset of ``anyms_core.VARIANTS``)."""
    variants = list(variants)
    if not variants:
        raise ValueError(f"Choose one or more variants from {VARIANTS}; got {variants}.")
    for variant in variants:
        check_variant(variant)
    if len(set(variants)) != len(variants):
        raise ValueError(f"Each variant once, please; got {variants}.")
    return [anyms.generate(prompt, subjects, variant=variant, seed=seed, **generate_kwargs) for variant in variants]


class VariantComparison(widgets.VBox):
    """Runs of one case (same subjects, boxes and seed) under different variants, side by side.

    Args:
        runs: the runs, e.g. from :func:`generate_variants`; ``set_runs`` swaps them.
        kind: the kind of map to compare (default: the first kind every run with maps recorded).
        dpi: resolution of the rendered figure.
    """

    def __init__(self, runs: Sequence[Run] = (), kind: str | None = None, dpi: int = 72) -> None:
        self.runs: list[Run] = []
        self.dpi = dpi
        self.kind = widgets.Dropdown(description="maps", layout=widgets.Layout(width="220px"))
        self.layers = widgets.Dropdown(description="layers", layout=widgets.Layout(width="240px"))
        self.reference = widgets.Dropdown(description="diff. against", style={"description_width": "initial"},
                                          layout=widgets.Layout(width="220px"))
        self.differences = widgets.Checkbox(value=True, description="difference maps", indent=False)
        self.view = widgets.Image(format="png")
        self.view.add_class("anyms-comparison-view")
        self.message = widgets.HTML()
        super().__init__([widgets.HBox([self.kind, self.layers, self.reference, self.differences]), self.message, self.view])
        self.add_class("anyms-variant-comparison")
        self._drawing_enabled = True
        for control in (self.kind, self.layers, self.reference, self.differences):
            control.observe(lambda _: self._draw(), names="value")
        self.set_runs(runs, kind=kind)

    @classmethod
    def generate(cls, anyms: AnyMS, prompt: str, subjects: Sequence[Subject], variants: Sequence[str] = DEFAULT_VARIANTS,
                 seed: int = 0, **generate_kwargs) -> "VariantComparison":
        """Generates the case under each variant and shows the runs."""
        return cls(generate_variants(anyms, prompt, subjects, variants, seed=seed, **generate_kwargs))

    def set_runs(self, runs: Sequence[Run], kind: str | None = None) -> None:
        runs = list(runs)
        for index, run in enumerate(runs):
            if not isinstance(run, Run):
                raise ValueError(f"runs[{index}] must be an anyms_core.Run, got {type(run).__name__}.")
        # Kinds any run recorded; plot_comparison shows a variant without them (``text``) as empty panels.
        kinds = []
        for run in runs:
            kinds.extend(k for k in recorded_kinds(run) if k not in kinds)
        if kind is not None and kind not in kinds:
            raise ValueError(f"None of these runs has {kind!r} maps; they have {kinds or 'none'}.")
        self.runs = runs
        labels = [label for label, _ in layer_choices(runs[0])] if runs else []
        self._drawing_enabled = False
        try:
            self.kind.options = kinds
            self.kind.value = kind or (self.kind.value if self.kind.value in kinds else (kinds[0] if kinds else None))
            self.layers.options = labels
            self.layers.value = self.layers.value if self.layers.value in labels else (labels[0] if labels else None)
            variants = [(run.variant, index) for index, run in enumerate(runs)]
            self.reference.options = variants
            self.reference.value = self.reference.value if self.reference.value in range(len(runs)) else (0 if runs else None)
            self.differences.disabled = len(runs) < 2
        finally:
            self._drawing_enabled = True
        self._draw()

    def plot(self) -> Figure:
        """The comparison figure for the current controls (see ``figures.plot_comparison``)."""
        if not self.runs:
            raise ValueError("VariantComparison has no runs to plot; call set_runs(runs) first.")
        if self.kind.value is None:
            raise ValueError("None of these runs recorded attention maps: generate them with record=True.")
        selection = dict(layer_choices(self.runs[0])).get(self.layers.value, {})
        return figures.plot_comparison(
            self.runs, kind=self.kind.value, differences=self.differences.value and len(self.runs) > 1,
            reference=self.reference.value or 0, **selection,
        )

    def _draw(self) -> None:
        if not self._drawing_enabled:
            return
        if not self.runs:
            self.message.value = "<i>No runs to compare yet.</i>"
            self.view.layout.display = "none"
            return
        try:
            self.view.value = figure_png(self.plot(), dpi=self.dpi)
        except ValueError as error:  # e.g. only 'text' runs: say so, keep the widget alive
            self.message.value = f"<span style='color: #b00020'>{html.escape(str(error))}</span>"
            self.view.layout.display = "none"
            return
        self.message.value = ""
        self.view.layout.display = None

    def to_png(self) -> bytes:
        return bytes(self.view.value) if self.runs and self.view.value else figure_png(_empty_figure("no runs"), dpi=self.dpi)

    def _repr_mimebundle_(self, **kwargs):
        return png_mimebundle(super()._repr_mimebundle_(**kwargs), self.to_png())


def _empty_figure(text: str) -> Figure:
    figure = Figure(figsize=(3, 0.6))
    figure.text(0.5, 0.5, text, ha="center", va="center")
    return figure
