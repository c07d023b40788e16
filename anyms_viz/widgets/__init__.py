"""Notebook widgets for AnyMS runs: a box editor, a step scrubber, a variant comparison and an explorer.

Each is an ipywidget (the box editor an anywidget, no front-end build step) with a static PNG beside
its live view, so a saved notebook still shows a picture where no kernel runs (GitHub, nbconvert).
"""

from .box_editor import BoxEditor
from .comparison import VariantComparison, generate_variants
from .explorer import Explorer
from .scrubber import StepScrubber

__all__ = ["BoxEditor", "StepScrubber", "VariantComparison", "Explorer", "generate_variants"]
