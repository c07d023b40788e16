"""``BoxEditor``: draw, move, resize, delete and re-order one box per subject, in a notebook.

An anywidget: the front end is ``box_editor.js`` (SVG, no build step); the value is the synced trait
``boxes``, a list with one normalized ``[x0, y0, x1, y1]`` box (origin top-left) or ``None`` (not
placed yet) per subject. Python may set it too; invalid boxes are rejected on both sides.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Sequence

import anywidget
import traitlets
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from anyms_core import Subject
from anyms_core.config import real_number
from anyms_core.layout import paint_order, subject_names, validate_box

from .. import figures
from ..palette import subject_colors
from ._images import data_url, figure_png, png_mimebundle, upscale

THUMBNAIL_SIDE = 48


class InvalidWidgetValue(ValueError, traitlets.TraitError):
    """A ValueError, like every input error of the core; also a TraitError, so that traitlets rolls a
    rejected front-end update (``set_state``) back instead of keeping the invalid value."""


class BoxEditor(anywidget.AnyWidget):
    """Edits the layout of ``subjects``: one labelled, coloured box each.

    Mouse: drag on an empty spot to draw the selected subject's box (or the first one without a box),
    drag a box to move it, drag a handle to resize it. Keys: 1-9 pick a subject, Delete removes its
    box, ``]`` / ``[`` raise / lower its priority, arrows nudge it (Shift: more), Escape deselects.

    Args:
        subjects: the subjects; their names, reference images (shown as thumbnails), boxes and
            priorities are the starting point. Box colours follow ``palette.subject_colors(names)``.
        background: the image to draw on (e.g. a generated image); None gives a blank canvas.
        aspect: width / height of the blank canvas (with a background: the background's).
        display_width: the canvas width in screen pixels.
        min_size: the smallest box side the UI produces, as a fraction of the canvas side.
    """

    _esm = Path(__file__).with_name("box_editor.js")
    _css = Path(__file__).with_name("box_editor.css")

    boxes = traitlets.List(traitlets.Any()).tag(sync=True)
    names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    colors = traitlets.List(traitlets.Unicode()).tag(sync=True)
    thumbnails = traitlets.List(traitlets.Unicode()).tag(sync=True)
    # Paint order, lowest priority first: a later subject owns the overlap (the core's convention).
    order = traitlets.List(traitlets.Int()).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    background = traitlets.Unicode("").tag(sync=True)
    aspect = traitlets.Float(1.0).tag(sync=True)
    display_width = traitlets.Int(320).tag(sync=True)
    min_size = traitlets.Float(0.02).tag(sync=True)

    def __init__(
        self,
        subjects: Sequence[Subject],
        background: Image.Image | None = None,
        aspect: float = 1.0,
        display_width: int = 320,
        min_size: float = 0.02,
        **kwargs,
    ) -> None:
        if isinstance(subjects, Subject):
            raise ValueError("BoxEditor needs a list of anyms_core.Subject, got a single Subject: wrap it in a list.")
        subjects = list(subjects)
        if not subjects or not all(isinstance(s, Subject) for s in subjects):
            raise ValueError("BoxEditor needs a non-empty list of anyms_core.Subject.")
        fixed = sorted(set(kwargs) & {"names", "colors", "thumbnails", "boxes", "order"})
        if fixed:
            raise ValueError(f"BoxEditor takes {fixed} from its subjects; set names, boxes and priorities on the Subjects.")
        self._subject_images = [s.image for s in subjects]
        names = subject_names(subjects)
        super().__init__(
            names=names,
            colors=subject_colors(names),
            thumbnails=[data_url(_thumbnail(s.image)) for s in subjects],
            boxes=[list(s.box) for s in subjects],
            order=paint_order(subjects),
            display_width=display_width,
            min_size=min_size,
            **kwargs,
        )
        self._background_image: Image.Image | None = None
        self.set_background(background, aspect=aspect)

    # --- validation: the Python side rejects what the UI can never produce ------------------------
    @traitlets.validate("boxes")
    def _validate_boxes(self, proposal) -> list:
        boxes = list(proposal["value"])
        names = self.names
        if len(boxes) != len(names):
            raise InvalidWidgetValue(f"BoxEditor has {len(names)} subjects {names}, got {len(boxes)} boxes.")
        try:
            return [None if box is None else list(validate_box(box, what=f"Box of {names[i]!r}")) for i, box in enumerate(boxes)]
        except ValueError as error:
            raise InvalidWidgetValue(str(error)) from None

    @traitlets.validate("names", "colors", "thumbnails")
    def _validate_per_subject_lists(self, proposal) -> list:
        values = list(proposal["value"])
        count = len(getattr(self, "_subject_images", values))
        if len(values) != count:
            raise InvalidWidgetValue(f"BoxEditor has {count} subjects, got {len(values)} {proposal['trait'].name}.")
        return values

    @traitlets.validate("min_size")
    def _validate_min_size(self, proposal) -> float:
        value = _finite(proposal["value"], "min_size")
        if not 0 < value < 0.5:
            raise InvalidWidgetValue(f"min_size is a fraction of the canvas side in (0, 0.5), got {value}.")
        return value

    @traitlets.validate("display_width")
    def _validate_display_width(self, proposal) -> int:
        value = int(proposal["value"])
        if not 16 <= value <= 4096:
            raise InvalidWidgetValue(f"display_width is a width in screen pixels in [16, 4096], got {value}.")
        return value

    @traitlets.validate("order")
    def _validate_order(self, proposal) -> list:
        order = [int(i) for i in proposal["value"]]
        if sorted(order) != list(range(len(self.names))):
            raise InvalidWidgetValue(f"order must be a permutation of the subject indices 0..{len(self.names) - 1}, got {order}.")
        return order

    @traitlets.validate("selected")
    def _validate_selected(self, proposal) -> int:
        index = int(proposal["value"])
        if not -1 <= index < len(self.names):
            raise InvalidWidgetValue(f"selected must be -1 (none) or a subject index below {len(self.names)}, got {index}.")
        return index

    @traitlets.validate("aspect")
    def _validate_aspect(self, proposal) -> float:
        aspect = _finite(proposal["value"], "aspect")
        if not 0.1 <= aspect <= 10:
            raise InvalidWidgetValue(f"aspect (width / height) must be in [0.1, 10], got {aspect}.")
        return aspect

    # --- Python API ------------------------------------------------------------------------------
    def index_of(self, subject: int | str) -> int:
        """The index of a subject given by index or name."""
        if isinstance(subject, str):
            if subject not in self.names:
                raise ValueError(f"No subject named {subject!r}; subjects: {self.names}.")
            return self.names.index(subject)
        if isinstance(subject, bool) or not isinstance(subject, numbers.Integral):
            raise ValueError(f"A subject is given by its index (an int) or its name, got {type(subject).__name__} {subject!r}.")
        if not 0 <= subject < len(self.names):
            raise ValueError(f"Subject index {subject} is out of range for {len(self.names)} subjects.")
        return int(subject)

    def set_box(self, subject: int | str, box: Sequence[float] | None) -> None:
        """Sets (or with None removes) one subject's box."""
        index = self.index_of(subject)
        boxes = list(self.boxes)
        # validated as given: list("0011") would read a string one character at a time
        boxes[index] = None if box is None else list(validate_box(box, what=f"Box of {self.names[index]!r}"))
        self.boxes = boxes

    def set_background(self, image: Image.Image | None, aspect: float | None = None) -> None:
        """Draws on ``image`` (its aspect ratio wins), or on a blank canvas of ``aspect`` when None."""
        self._background_image = None if image is None else image.convert("RGB")
        if image is None:
            self.background = ""
            if aspect is not None:
                self.aspect = aspect
        else:
            self.aspect = image.width / image.height
            # Small images (the toy world's 32x32) are enlarged here, so that every browser shows crisp pixels.
            self.background = data_url(upscale(self._background_image, self.display_width))

    @property
    def missing(self) -> list[str]:
        """Names of the subjects without a box."""
        return [name for name, box in zip(self.names, self.boxes) if box is None]

    def priorities(self) -> list[float]:
        """Per subject, its priority for ``Subject.priority``: higher owns the overlaps."""
        return [float(self.order.index(i)) for i in range(len(self.names))]

    def subjects(self) -> list[Subject]:
        """The subjects with the edited boxes and priorities; a ``ValueError`` if some box is missing."""
        if self.missing:
            raise ValueError(f"Place a box for {', '.join(self.missing)} first (drag on the canvas).")
        return [
            Subject(image=image, box=box, name=name, priority=priority)
            for image, box, name, priority in zip(self._subject_images, self.boxes, self.names, self.priorities())
        ]

    # --- static picture --------------------------------------------------------------------------
    def plot(self, ax: Axes | None = None) -> Figure:
        """The canvas with its placed boxes on ``ax`` (a new figure if None); returns the figure."""
        if ax is None:
            figure = Figure(figsize=(3.4 * min(self.aspect, 2), 3.4 / max(self.aspect, 0.5)), layout="constrained")
            ax = figure.add_subplot()
        if self._background_image is not None:
            size = self._background_image.size
            ax.imshow(self._background_image, extent=(0, size[0], size[1], 0), interpolation="nearest")
        else:  # a blank canvas of the output's aspect ratio
            size = (round(100 * self.aspect), 100)
            ax.set_facecolor("#F4F4F4")
            ax.set_xlim(0, size[0])
            ax.set_ylim(size[1], 0)
        placed = [i for i in self.order if self.boxes[i] is not None]  # painted in priority order
        figures.draw_boxes(ax, [self.boxes[i] for i in placed], size, names=[f"{i + 1} {self.names[i]}" for i in placed],
                           colors=[self.colors[i] for i in placed])
        ax.set_xticks([])
        ax.set_yticks([])
        missing = f" · no box: {', '.join(self.missing)}" if self.missing else ""
        ax.set_title(f"layout{missing}", fontsize=9)
        return ax.figure

    def to_png(self) -> bytes:
        return figure_png(self.plot(), dpi=80)

    def _repr_mimebundle_(self, **kwargs):
        return png_mimebundle(super()._repr_mimebundle_(**kwargs), self.to_png())


def _finite(value, what: str) -> float:
    try:
        return real_number(value, what)
    except ValueError as error:
        raise InvalidWidgetValue(str(error)) from None


def _thumbnail(image: Image.Image) -> Image.Image:
    thumbnail = image.copy()
    if max(thumbnail.size) > THUMBNAIL_SIDE:
        thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return thumbnail
