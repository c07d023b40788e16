"""``Explorer``: the whole AnyMS loop in one notebook cell.

Box editor + subject thumbnails + prompt + variant + generate, with the result, a step scrubber and a
variant comparison below. With the toy world's pipeline (fractions of a second per image) every box
change re-generates by itself after a short debounce, by default; errors from the core become messages
in the widget.
"""

from __future__ import annotations

import contextlib
import html
import threading
from typing import Iterator, Sequence

import ipywidgets as widgets
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from anyms_core import VARIANTS, AnyMS, Run, Subject
from anyms_core.variants import check_variant
from anyms_core.models import load_pipeline

from .. import figures
from ._images import figure_png, png_bytes, png_mimebundle, upscale
from .box_editor import BoxEditor
from .comparison import DEFAULT_VARIANTS, VariantComparison
from .scrubber import StepScrubber

DEFAULT_STEPS = 50  # diffusers' default, for the progress bar before the first run says otherwise


class Explorer(widgets.VBox):
    """Edit a layout, generate, and look inside the generation, in one widget.

    Args:
        subjects: the subjects (reference image, starting box, name).
        pipe: a pipeline for :class:`~anyms_core.AnyMS`; default ``load_pipeline("toy")``.
        prompt: the starting prompt.
        variant: the starting variant (one of ``anyms_core.VARIANTS``).
        seed: the starting seed.
        compare_variants: the variants ticked for the comparison tab.
        auto: re-generate (after ``debounce_s``) whenever the layout or a setting changes; the
            "re-generate on every change" checkbox shows it and turns it on or off later. Default (None):
            on for the toy world's ``ToyWorldPipeline``, fast enough to follow every drag; off for any
            other pipeline (SDXL: press Generate). Never decided by timing a generation.
        debounce_s: wait this long after the last change before re-generating (0: at once, in the handler).
        generate_kwargs: more arguments for ``AnyMS.generate`` (``num_inference_steps``, ``height``, ...).
        record: what attention to record (see ``AnyMS.generate``); the scrubber and comparison show it.
        display_width: width of the editor canvas and of the result image, in screen pixels.
    """

    def __init__(
        self,
        subjects: Sequence[Subject],
        pipe=None,
        prompt: str = "a photo on grass",
        variant: str = "anyms",
        seed: int = 0,
        compare_variants: Sequence[str] = DEFAULT_VARIANTS,
        auto: bool | None = None,
        debounce_s: float = 0.3,
        generate_kwargs: dict | None = None,
        record=True,
        display_width: int = 320,
    ) -> None:
        for name in (variant, *compare_variants):
            check_variant(name)
        if debounce_s < 0:
            raise ValueError(f"debounce_s must be >= 0, got {debounce_s}.")
        pipe = pipe if pipe is not None else load_pipeline("toy")
        if auto is None:
            auto = _is_toy_pipeline(pipe)
        self.anyms = AnyMS(pipe)
        self.generate_kwargs = dict(generate_kwargs or {})
        forbidden = sorted(set(self.generate_kwargs) & {"prompt", "subjects", "variant", "seed", "record"})
        if forbidden:
            raise ValueError(f"generate_kwargs must not set {forbidden}: the Explorer's own controls set them.")
        self.record = record
        self.debounce_s = float(debounce_s)
        self.display_width = display_width
        self.run: Run | None = None
        self.last_error: Exception | None = None
        self._generate_lock = threading.Lock()  # one generation at a time, whoever asks
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()
        self._steps_done = 0

        height = self.generate_kwargs.get("height")
        width = self.generate_kwargs.get("width")
        self.editor = BoxEditor(subjects, aspect=(width / height) if height and width else 1.0, display_width=display_width)
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False, layout=widgets.Layout(width="320px"))
        self.variant = widgets.Dropdown(options=[(figures.VARIANT_LABELS.get(v, v), v) for v in VARIANTS], value=variant,
                                        description="variant", layout=widgets.Layout(width="320px"))
        self.seed = widgets.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed", layout=widgets.Layout(width="200px"))
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.auto = widgets.Checkbox(value=bool(auto), description="re-generate on every change", indent=False)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="idle", layout=widgets.Layout(width="320px"))
        self.status = widgets.HTML()
        self.status.add_class("anyms-status")
        self.result = widgets.Image(format="png")
        self.result.add_class("anyms-result")
        self.result_caption = widgets.HTML()

        self.scrubber = StepScrubber(panel_size=160)
        self.comparison = VariantComparison()
        self.compare_choices = [widgets.Checkbox(value=v in compare_variants, description=v, indent=False,
                                                 layout=widgets.Layout(width="90px")) for v in VARIANTS]
        self.compare_button = widgets.Button(description="Compare variants", icon="columns", layout=widgets.Layout(width="auto"))
        self.comparison_note = widgets.HTML()
        compare_tab = widgets.VBox([widgets.HBox(self.compare_choices + [self.compare_button]), self.comparison_note, self.comparison])
        self.tabs = widgets.Tab([self.scrubber, compare_tab])
        self.tabs.set_title(0, "Denoising steps")
        self.tabs.set_title(1, "Variants side by side")

        settings = widgets.VBox([self.prompt, self.variant, self.seed, widgets.HBox([self.generate_button, self.auto]),
                                 self.progress, self.status])
        result = widgets.VBox([widgets.HTML("<b>result</b>"), self.result, self.result_caption])
        super().__init__([widgets.HBox([self.editor, result]), settings, self.tabs])
        self.add_class("anyms-explorer")

        self.editor.observe(self._on_change, names=["boxes", "order"])
        for control in (self.prompt, self.variant, self.seed):
            control.observe(self._on_change, names="value")
        self.generate_button.on_click(lambda _: self.generate())
        self.compare_button.on_click(lambda _: self.compare())
        self.generate()

    # --- generation ------------------------------------------------------------------------------
    def generate(self) -> Run | None:
        """Generates with the current layout and settings; shows the result or the error. Returns the run."""
        with self._generate_lock:
            subjects = self._subjects_or_message()
            if subjects is None:
                return None
            try:
                with self._busy("generating", runs=1):
                    run = self._generate(self.variant.value, subjects)
            except Exception as error:  # shown in the widget: a notebook user must never get a dead widget
                self._show_error("Could not generate", error)
                return None
            self.run = run
            self.last_error = None
            self.result.value = png_bytes(upscale(run.image, self.display_width))
            self.result.width = self.display_width
            self.result_caption.value = f"<span style='font-size: 11px'>{html.escape(run.variant)}, seed {run.config['seed']}</span>"
            self.editor.set_background(run.image)
            self.scrubber.set_run(run)
            if self.comparison.runs:
                self.comparison_note.value = "<i>The layout or settings changed: press Compare variants to update.</i>"
            seconds = run.timings.get("total") or 0.0
            self._show_status(f"Generated <b>{html.escape(run.variant)}</b> in {seconds:.2f} s ({run.num_steps} steps).")
            return run

    def compare(self) -> list[Run] | None:
        """Generates the current case under every ticked variant and shows them side by side."""
        variants = [box.description for box in self.compare_choices if box.value]
        if not variants:
            self._show_status("Tick at least one variant to compare.", error=True)
            return None
        with self._generate_lock:
            subjects = self._subjects_or_message()
            if subjects is None:
                return None
            try:
                with self._busy("comparing", runs=len(variants)):
                    runs = [self._generate(variant, subjects) for variant in variants]
                self.comparison.set_runs(runs)
            except Exception as error:
                self._show_error("Could not compare", error)
                return None
            self.comparison_note.value = ""
            self.tabs.selected_index = 1
            self._show_status(f"Compared {', '.join(variants)}.")
            return runs

    def schedule_generation(self) -> None:
        """Re-generates after ``debounce_s`` without changes (at once when it is 0)."""
        if self.debounce_s == 0:
            self.generate()
            return
        with self._timer_lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce_s, self.generate)
            self._timer.daemon = True
            self._timer.start()

    def _on_change(self, change) -> None:
        if self.auto.value:
            self.schedule_generation()
        else:
            self._show_status("Changed: press Generate (or tick re-generate on every change).")

    def _generate(self, variant: str, subjects: list[Subject]) -> Run:
        return self.anyms.generate(self.prompt.value, subjects, variant=variant, seed=self.seed.value,
                                   record=self.record, callback=self._count_step, **self.generate_kwargs)

    def _count_step(self, step: dict) -> None:
        self._steps_done += 1
        self.progress.value = min(self._steps_done, self.progress.max)

    def _expected_steps(self) -> int:
        if "num_inference_steps" in self.generate_kwargs:
            return int(self.generate_kwargs["num_inference_steps"])
        return self.run.num_steps if self.run is not None else DEFAULT_STEPS

    @contextlib.contextmanager
    def _busy(self, label: str, runs: int) -> Iterator[None]:
        """Progress bar running and buttons disabled for the duration of the block."""
        self._steps_done = 0
        self.progress.value = 0
        self.progress.max = max(1, runs * self._expected_steps())
        self.progress.description = label
        self.progress.bar_style = "info"
        self.generate_button.disabled = self.compare_button.disabled = True
        finished = False
        try:
            yield
            finished = True
        finally:
            self.progress.value = self.progress.max if finished else 0
            self.progress.description = "idle"
            self.progress.bar_style = ""
            self.generate_button.disabled = self.compare_button.disabled = False

    # --- messages --------------------------------------------------------------------------------
    def _subjects_or_message(self) -> list[Subject] | None:
        try:
            return self.editor.subjects()
        except ValueError as error:
            self._show_error("Not ready", error)
            return None

    def _show_error(self, what: str, error: Exception) -> None:
        self.last_error = error
        # A ValueError from the core is a message for the user; anything else is a bug, so name its type.
        text = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        self._show_status(f"<b>{html.escape(what)}:</b> {html.escape(text)}", error=True)

    def _show_status(self, message: str, error: bool = False) -> None:
        color = "#b00020" if error else "#2e7d32"
        role = "anyms-error" if error else "anyms-ok"
        self.status.value = f"<div class='{role}' style='color: {color}; max-width: 640px'>{message}</div>"

    # --- static picture --------------------------------------------------------------------------
    def plot(self, axes: Sequence[Axes] | None = None) -> Figure:
        """The layout on the latest image and the result without boxes (the layout alone before a run),
        on ``axes`` (two, or one before a run; a new figure if None)."""
        panels = 2 if self.run is not None else 1
        if axes is None:
            figure = Figure(figsize=(3.4 * panels, 3.4), layout="constrained")
            axes = figure.subplots(1, panels, squeeze=False)[0]
        axes = list(axes)
        if len(axes) != panels:
            raise ValueError(f"Explorer.plot draws {panels} panels; got {len(axes)} axes.")
        self.editor.plot(ax=axes[0])
        if self.run is not None:
            figures.plot_image(self.run, ax=axes[1], boxes=False)
        return axes[0].figure

    def to_png(self) -> bytes:
        return figure_png(self.plot(), dpi=80)

    def _repr_mimebundle_(self, **kwargs):
        return png_mimebundle(super()._repr_mimebundle_(**kwargs), self.to_png())

    def close(self) -> None:
        timer = getattr(self, "_timer", None)  # absent when __init__ refused its arguments
        if timer is not None:
            timer.cancel()
        super().close()


def _is_toy_pipeline(pipe) -> bool:
    """Whether ``pipe`` is the toy world's pipeline (imported here: only this default needs it)."""
    from anyms_core.toy.pipeline import ToyWorldPipeline

    return isinstance(pipe, ToyWorldPipeline)
