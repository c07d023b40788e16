"""Notebook widgets for AnyMS runs: a box editor, a step scrubber, a variant comparison and an explorer.

Each is an ipywidget (the box editor an anywidget, no front-end build step) with a static PNG beside
its live view, so a saved notebook still shows a picture where no kernel runs (GitHub, nbconvert).
"""

try:
    import anywidget  # noqa: F401
    import ipywidgets  # noqa: F401
except ImportError as error:  # the core and the CLI do not need them; say which extra does
    raise ImportError(f"anyms_viz.widgets needs the notebook extras ({error.name} is missing): "
                      "pip install 'anyms[notebooks]' (from a checkout: pip install '.[notebooks]')") from error

from .box_editor import BoxEditor
from .comparison import VariantComparison, generate_variants
from .explorer import Explorer
from .scrubber import StepScrubber

__all__ = ["BoxEditor", "StepScrubber", "VariantComparison", "Explorer", "generate_variants"]
