"""Figures from AnyMS runs: the paper's figure styles as functions of ``Run`` objects.

Every function takes ``Run`` objects (``Run.load(path)`` remakes a figure from a saved run without
generating again) and returns a :class:`matplotlib.figure.Figure`. Nothing here touches pyplot: no
global figure registry, no ``plt.show()``, so the same functions work in a script, a notebook cell and
a widget callback. In a notebook, put the figure last in a cell (or ``display(fig)``) to see it.

- :func:`plot_image`: the generated image with its colour-coded boxes.
- :func:`plot_attention`: one heatmap per subject (or prompt word) over the image (paper Fig. 7).
- :func:`plot_comparison`: one case under several variants, one shared colour scale, and difference
  maps against a reference variant (where crop-and-merge and mask-only differ: the overlaps).
- :func:`plot_ablation_grid`: rows = cases, columns = variants (paper Fig. 6).
- :func:`plot_layout_panel`: reference images, their boxes and the prompt (paper Fig. 8/9).
- :func:`plot_steps`: the predicted clean image over the denoising steps, optionally with maps.
- :func:`save`: PDF and/or PNG at print resolution.

Coordinates: every image is drawn with ``extent=(0, width, height, 0)``, so a normalized box
``[x0, y0, x1, y1]`` sits at pixel edges ``x0 * width ... x1 * width`` and attention grids of any size
line up with the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from anyms_core.layout import paint_order
from anyms_core.run import Run
from anyms_core.variants import VARIANT_LABELS  # column titles in the paper's words

from .palette import (
    DIFFERENCE_CMAP,
    HEATMAP_CMAP,
    OVERLAP_COLOR,
    SUBJECT_COLORS,
    box_to_pixels,
    subject_colors,
)

__all__ = [
    "SUBJECT_COLORS", "VARIANT_LABELS", "subject_colors", "draw_boxes", "draw_overlaps", "draw_heatmap",
    "draw_layout", "overlap_regions", "plot_image", "plot_attention", "plot_comparison", "plot_ablation_grid",
    "plot_layout_panel", "plot_steps", "save",
]

IMAGE_BRANCH_KINDS = ("affinity", "contribution")
PANEL_INCHES = 1.9

# Labels set on the artists, so tests (and users) can find what a figure drew.
IMAGE_LABEL = "image"
HEATMAP_LABEL = "heatmap"
DIFFERENCE_LABEL = "difference"
BOX_GID = "box"
OVERLAP_GID = "overlap"


# --- small drawing helpers (public: the widgets and notebooks use them too) ------------------------

def draw_boxes(
    ax: Axes,
    boxes: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    names: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    linewidth: float = 2.0,
    highlight: int | None = None,
) -> list[Rectangle]:
    """Outlines normalized boxes on ``ax`` at the pixel edges of an image of ``image_size = (width, height)``.

    ``colors`` default to ``subject_colors(names)`` (without names: the Okabe-Ito colours in order); the
    figures here pass ``subject_colors(run.subject_names)``. With ``highlight=j``, box j is drawn bold and
    the others thin and dashed (used on subject j's heatmap). Returns the rectangles, in the boxes' order.
    """
    if names is not None and len(names) != len(boxes):
        raise ValueError(f"Got {len(names)} names for {len(boxes)} boxes.")
    if colors is not None and len(colors) != len(boxes):
        raise ValueError(f"Got {len(colors)} colours for {len(boxes)} boxes.")
    if colors is None:
        colors = subject_colors(names if names is not None else [""] * len(boxes))
    rectangles = []
    for index, box in enumerate(boxes):
        x0, y0, x1, y1 = box_to_pixels(box, image_size)
        color = colors[index]
        faint = highlight is not None and index != highlight
        width = linewidth * (0.5 if faint else 1.0)
        rectangle = Rectangle(
            (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=width,
            linestyle="--" if faint else "-", gid=BOX_GID, label=names[index] if names is not None else f"box {index}",
        )
        # A dark halo keeps light colours visible on light images.
        rectangle.set_path_effects([patheffects.withStroke(linewidth=width + 1.2, foreground="black", alpha=0.5)])
        ax.add_patch(rectangle)
        rectangles.append(rectangle)
        if names is not None and not faint:
            label = ax.text(x0, y0, f" {names[index]}", color="white", fontsize=6, va="bottom", ha="left", clip_on=True,
                            bbox=dict(boxstyle="square,pad=0.1", facecolor=color, edgecolor="none", alpha=0.85))
            # White text with a dark outline reads on every subject colour, light toy colours included.
            label.set_path_effects([patheffects.withStroke(linewidth=1.5, foreground="black", alpha=0.6)])
    return rectangles


def overlap_regions(boxes: Sequence[Sequence[float]]) -> list[list[float]]:
    """The pairwise intersections of normalized boxes (the cells where priority and sum disagree)."""
    regions = []
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            x0, y0 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            x1, y1 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            if x1 > x0 and y1 > y0:
                regions.append([x0, y0, x1, y1])
    return regions


def draw_overlaps(ax: Axes, boxes: Sequence[Sequence[float]], image_size: tuple[int, int],
                  color: str = OVERLAP_COLOR, hatch: str | None = None) -> list[Rectangle]:
    """Outlines (and with ``hatch``, e.g. ``"////"``, hatches) the regions where two or more boxes overlap."""
    rectangles = []
    for region in overlap_regions(boxes):
        x0, y0, x1, y1 = box_to_pixels(region, image_size)
        rectangle = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=0.8,
                              linestyle=":", hatch=hatch, gid=OVERLAP_GID)
        ax.add_patch(rectangle)
        rectangles.append(rectangle)
    return rectangles


def draw_heatmap(
    ax: Axes,
    values: np.ndarray,
    image: Image.Image | None = None,
    image_size: tuple[int, int] | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    cmap: str | Colormap = HEATMAP_CMAP,
    alpha: float = 0.7,
    interpolation: str = "nearest",
    label: str = HEATMAP_LABEL,
) -> AxesImage:
    """Draws a 2-D map stretched over an image's extent (over the image in grey, when ``image`` is given).

    ``interpolation="nearest"`` by default: the attention grid's cells stay visible, and they are what
    the boxes are rasterised to. Returns the heatmap's ``AxesImage`` (for a colour bar).
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"A heatmap is a 2-D array, got shape {values.shape}.")
    if image is not None:
        image_size = image.size
        ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255, extent=(0, image_size[0], image_size[1], 0),
                  interpolation="nearest", label=IMAGE_LABEL)
    if image_size is None:
        image_size = (values.shape[1], values.shape[0])
    width, height = image_size
    artist = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=values.max() if vmax is None else vmax,
                       extent=(0, width, height, 0), alpha=alpha if image is not None else 1.0,
                       interpolation=interpolation, label=label)
    _clean(ax)
    return artist


def draw_layout(ax: Axes, run: Run, background: str = "#EEEEEE", names: bool = True) -> None:
    """The input of a case: each reference image pasted into its box, owners of overlaps on top."""
    _check_run(run)
    width, height = run.image.size
    ax.set_facecolor(background)  # not a patch: patches draw above images
    for index in paint_order(run.subjects(), run.config.get("priority_rule", "order")):
        x0, y0, x1, y1 = box_to_pixels(run.boxes[index], (width, height))
        ax.imshow(np.asarray(run.subject_images[index]), extent=(x0, x1, y1, y0), interpolation="bilinear")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    draw_boxes(ax, run.boxes, (width, height), names=run.subject_names if names else None, colors=_colors(run))
    _clean(ax)


# --- figures --------------------------------------------------------------------------------------

def plot_image(run: Run, ax: Axes | None = None, boxes: bool = True, title: str | None = None,
               names: bool = True) -> Figure:
    """The generated image with its colour-coded boxes. ``title`` defaults to the variant's label."""
    _check_run(run)
    fig, ax = _figure_for(ax, PANEL_INCHES * 1.4, PANEL_INCHES * 1.4)
    _draw_image(ax, run.image)
    if boxes:
        draw_boxes(ax, run.boxes, run.image.size, names=run.subject_names if names else None, colors=_colors(run))
    ax.set_title(VARIANT_LABELS.get(run.variant, run.variant) if title is None else title, fontsize=9)
    return fig


def plot_attention(
    run: Run,
    kind: str = "affinity",
    steps: int | Sequence[int] | slice | None = None,
    resolution: int | tuple[int, int] | None = None,
    layers: str | Sequence[str] | None = None,
    overlay: bool = True,
    axes: Sequence[Axes] | None = None,
    vmax: float | None = None,
    vmin: float | None = 0.0,
    items: Sequence[int | str] | None = None,
    colorbar: bool = True,
) -> Figure:
    """One heatmap per subject (or per prompt word for ``kind="text"``), paper Fig. 7 style.

    Maps are averaged over the selected ``steps`` and ``layers`` (see ``AttentionMaps.maps``). All panels
    share one colour scale from ``vmin`` (default 0) to ``vmax`` (default: the largest value shown), so
    they can be compared; ``vmin=None`` starts it at the smallest value shown (min-max normalized).
    ``overlay``: draw the maps over the image in grey. Each subject's own box is bold, the others dashed.
    """
    _check_run(run)
    maps = _maps_of(run, kind, steps=steps, layers=layers, resolution=resolution, items=items)
    names = _item_names(run, kind, items)
    if axes is None:
        fig = _new_figure(1, len(names))
        axes = list(fig.axes)
    else:
        axes = list(axes)
        if len(axes) != len(names):
            raise ValueError(f"plot_attention draws {len(names)} panels ({names}); got {len(axes)} axes.")
        fig = _root_figure(axes[0])
    vmin, vmax = _shared_limits([maps], vmin, vmax)
    colors = _colors(run)
    artist = None
    for position, (ax, name) in enumerate(zip(axes, names)):
        artist = draw_heatmap(ax, maps[position], image=run.image if overlay else None, image_size=run.image.size, vmin=vmin, vmax=vmax)
        subject = run.subject_names.index(name) if kind in IMAGE_BRANCH_KINDS else None
        draw_boxes(ax, run.boxes, run.image.size, colors=colors, highlight=subject, linewidth=1.5)
        ax.set_title(name, fontsize=9, color=colors[subject] if subject is not None else "black")
    fig.suptitle(f"{kind} · {VARIANT_LABELS.get(run.variant, run.variant)} · {_steps_text(run, steps)}", fontsize=9)
    if colorbar and artist is not None:
        fig.colorbar(artist, ax=axes, shrink=0.8, label=kind)
    return fig


def plot_comparison(
    runs: Sequence[Run],
    kind: str = "affinity",
    differences: bool = True,
    steps: int | Sequence[int] | slice | None = None,
    resolution: int | tuple[int, int] | None = None,
    layers: str | Sequence[str] | None = None,
    overlay: bool = True,
    vmax: float | None = None,
    vmin: float | None = 0.0,
    reference: int = 0,
    titles: Sequence[str] | None = None,
) -> Figure:
    """One case under several variants: images, per-subject maps on ONE colour scale, and differences.

    Columns: one per run, then (``differences=True``) one per ``run - runs[reference]``. Rows: the images
    with their boxes, then one row per subject (or prompt word). Heatmaps share one scale from ``vmin``
    (default 0; None: the smallest value shown) to ``vmax`` (default: the largest value over all
    variants); difference maps share one symmetric scale.
    Regions where boxes overlap are outlined (dotted) on the difference maps: between ``anyms`` and ``mask`` the
    image branch differs only there (priority vs sum), so differences elsewhere come from the diverging
    trajectories of later layers and steps (compare ``steps=0``). A ``text`` run has no image branch and
    gets empty map panels.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("plot_comparison needs at least one run.")
    for run in runs:
        _check_run(run)
    _check_same_case(runs, "plot_comparison")
    if differences and len(runs) < 2:
        raise ValueError("Difference maps need at least two runs; pass differences=False for one run.")
    if not 0 <= reference < len(runs):
        raise ValueError(f"reference={reference} is not an index into the {len(runs)} runs.")
    if titles is not None and len(titles) != len(runs):
        raise ValueError(f"Got {len(titles)} titles for {len(runs)} runs.")
    titles = list(titles) if titles is not None else [VARIANT_LABELS.get(r.variant, r.variant) for r in runs]

    first = runs[0]
    maps: list[np.ndarray | None] = []
    size = None  # every run's maps at the size of the first run's, so differences are cell by cell
    for run in runs:
        values = _maps_of(run, kind, steps=steps, layers=layers, resolution=resolution, size=size, allow_text_variant=True)
        if values is not None and size is None:
            size = values.shape[-2:]
        maps.append(values)
    if all(m is None for m in maps):
        raise ValueError(f"None of the runs has {kind!r} maps: all are variant 'text' (no image branch).")
    names = next(r.attention.items(kind) for r, m in zip(runs, maps) if m is not None)

    pairs = [(index, reference) for index in range(len(runs))
             if differences and index != reference and maps[index] is not None and maps[reference] is not None]
    nrows, ncols = 1 + len(names), len(runs) + len(pairs)
    fig = _new_figure(nrows, ncols)
    grid = np.array(fig.axes, dtype=object).reshape(nrows, ncols)
    image_size = first.image.size
    boxes = first.boxes
    colors = _colors(first)  # every run has the same subjects (checked above)
    vmin, vmax = _shared_limits([m for m in maps if m is not None], vmin, vmax)

    heat_axes, heat_artist = [], None
    for column, (run, values, title) in enumerate(zip(runs, maps, titles)):
        _draw_image(grid[0, column], run.image)
        draw_boxes(grid[0, column], boxes, run.image.size, colors=colors)
        grid[0, column].set_title(title, fontsize=8)
        for row, name in enumerate(names, start=1):
            ax = grid[row, column]
            subject = row - 1 if kind in IMAGE_BRANCH_KINDS else None
            if values is None:
                _empty_panel(ax, "no image branch")
            else:
                heat_artist = draw_heatmap(ax, values[row - 1], image=run.image if overlay else None, image_size=run.image.size,
                                           vmin=vmin, vmax=vmax, label=f"{HEATMAP_LABEL}:{run.variant}:{name}")
                heat_axes.append(ax)
            draw_boxes(ax, boxes, run.image.size, colors=colors, highlight=subject, linewidth=1.2)
            if column == 0:
                ax.set_ylabel(name, fontsize=8, color=colors[subject] if subject is not None else "black")

    diff_axes, diff_artist = [], None
    if pairs:
        deltas = [maps[i] - maps[j] for i, j in pairs]
        limit = max(float(np.abs(d).max()) for d in deltas) or 1.0
        for offset, ((i, j), delta) in enumerate(zip(pairs, deltas)):
            column = len(runs) + offset
            ax = grid[0, column]
            _empty_panel(ax, "")
            ax.set_xlim(0, image_size[0])
            ax.set_ylim(image_size[1], 0)
            draw_boxes(ax, boxes, image_size, colors=colors)
            draw_overlaps(ax, boxes, image_size, color="black", hatch="////")
            ax.set_title(f"{runs[i].variant} − {runs[j].variant}", fontsize=8)
            for row in range(1, nrows):
                ax = grid[row, column]
                diff_artist = draw_heatmap(ax, delta[row - 1], image_size=image_size, vmin=-limit, vmax=limit,
                                           cmap=DIFFERENCE_CMAP, label=f"{DIFFERENCE_LABEL}:{runs[i].variant}-{runs[j].variant}:{names[row - 1]}")
                subject = row - 1 if kind in IMAGE_BRANCH_KINDS else None
                draw_boxes(ax, boxes, image_size, colors=colors, highlight=subject, linewidth=1.2)
                draw_overlaps(ax, boxes, image_size, color="black")
                diff_axes.append(ax)

    fig.suptitle(f"{kind} maps · {_steps_text(first, steps)} · one colour scale across variants", fontsize=9)
    if heat_artist is not None:
        fig.colorbar(heat_artist, ax=list(grid[1:, :len(runs)].ravel()), shrink=0.7, label=kind, location="right")
    if diff_artist is not None:
        fig.colorbar(diff_artist, ax=diff_axes, shrink=0.7, label="difference", location="right")
    return fig


def plot_ablation_grid(
    rows: Sequence[Sequence[Run]],
    row_titles: Sequence[str] | None = None,
    column_titles: Sequence[str] | None = None,
    layout_column: bool = True,
    names: bool = False,
) -> Figure:
    """Paper Fig. 6: rows = cases, columns = variants, every box in its subject's colour.

    ``rows[r][c]`` is case r under variant c; each row must be one case (same boxes). With
    ``layout_column`` a first column shows each case's input: the reference images in their boxes.
    Column titles default to the variants' labels when every row has the same variant in that column.
    """
    rows = [list(row) for row in rows]
    if not rows or not rows[0]:
        raise ValueError("plot_ablation_grid needs a non-empty list of rows of runs.")
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"Every row needs the same number of runs; got {[len(row) for row in rows]}.")
    for index, row in enumerate(rows):
        for run in row:
            _check_run(run)
        _check_same_case(row, f"row {index} of plot_ablation_grid")
    if row_titles is not None and len(row_titles) != len(rows):
        raise ValueError(f"Got {len(row_titles)} row titles for {len(rows)} rows.")
    ncols = len(rows[0])
    if column_titles is not None and len(column_titles) != ncols:
        raise ValueError(f"Got {len(column_titles)} column titles for {ncols} columns.")
    if column_titles is None:
        column_titles = []
        for column in range(ncols):
            variants = {row[column].variant for row in rows}
            column_titles.append(VARIANT_LABELS.get(variants.pop(), "") if len(variants) == 1 else None)

    offset = 1 if layout_column else 0
    fig = _new_figure(len(rows), ncols + offset)
    grid = np.array(fig.axes, dtype=object).reshape(len(rows), ncols + offset)
    for r, row in enumerate(rows):
        if layout_column:
            draw_layout(grid[r, 0], row[0], names=names)
            if r == 0:
                grid[r, 0].set_title("layout", fontsize=8)
        for c, run in enumerate(row):
            ax = grid[r, c + offset]
            _draw_image(ax, run.image)
            draw_boxes(ax, run.boxes, run.image.size, names=run.subject_names if names else None, colors=_colors(run))
            title = column_titles[c] if column_titles[c] is not None else VARIANT_LABELS.get(run.variant, run.variant)
            if r == 0 or column_titles[c] is None:
                ax.set_title(title, fontsize=8)
        label = row_titles[r] if row_titles is not None else f"{len(row[0].boxes)} subjects\n“{row[0].prompt}”"
        grid[r, 0].set_ylabel(label, fontsize=7)
    return fig


def plot_layout_panel(run: Run, show_image: bool = True) -> Figure:
    """Paper Fig. 8/9: the reference images framed in their subjects' colours, the layout and the prompt."""
    _check_run(run)
    count = len(run.subject_images) + 1 + int(show_image)
    fig = _new_figure(1, count, height=PANEL_INCHES * 1.15)
    axes = fig.axes
    colors = _colors(run)
    for index, (image, name) in enumerate(zip(run.subject_images, run.subject_names)):
        ax = axes[index]
        ax.imshow(np.asarray(image), interpolation="bilinear")
        _clean(ax)
        for spine in ax.spines.values():  # the frame is the association: same colour as the box
            spine.set_visible(True)
            spine.set_edgecolor(colors[index])
            spine.set_linewidth(3)
        ax.set_title(name, fontsize=8, color=colors[index])
    draw_layout(axes[len(run.subject_images)], run, names=False)
    axes[len(run.subject_images)].set_title("layout", fontsize=8)
    if show_image:
        ax = axes[-1]
        _draw_image(ax, run.image)
        draw_boxes(ax, run.boxes, run.image.size, colors=colors)
        ax.set_title(VARIANT_LABELS.get(run.variant, run.variant), fontsize=8)
    fig.supxlabel(f"“{run.prompt}”", fontsize=9, style="italic")
    return fig


def plot_steps(
    run: Run,
    steps: Sequence[int] | None = None,
    kind: str | None = None,
    max_columns: int = 8,
    resolution: int | tuple[int, int] | None = None,
    layers: str | Sequence[str] | None = None,
    vmax: float | None = None,
    vmin: float | None = 0.0,
) -> Figure:
    """The predicted clean image (x0) at chosen steps; with ``kind``, each subject's map at those steps below.

    ``steps`` default to ``max_columns`` evenly spaced steps including the first and the last. The maps
    of all steps share one colour scale, so you can watch the layout being decided.
    """
    _check_run(run)
    if not run.previews:
        raise ValueError("This run has no per-step previews: generate it with previews=True.")
    total = len(run.previews)
    if steps is None:
        steps = sorted({int(round(s)) for s in np.linspace(0, total - 1, min(total, max_columns))})
    steps = list(steps)
    bad = [s for s in steps if not 0 <= s < total]
    if bad:
        raise ValueError(f"Steps {bad} are out of range: this run has {total} steps (0..{total - 1}).")
    maps = None
    names: list[str] = []
    if kind is not None:
        maps = _maps_of(run, kind, steps=steps, layers=layers, resolution=resolution, per_step=True)
        names = run.attention.items(kind)
    fig = _new_figure(1 + len(names), len(steps))
    grid = np.array(fig.axes, dtype=object).reshape(1 + len(names), len(steps))
    vmin, vmax = _shared_limits([maps], vmin, vmax) if maps is not None else (vmin, vmax)
    colors = _colors(run)
    artist = None
    for column, step in enumerate(steps):
        ax = grid[0, column]
        _draw_image(ax, Image.fromarray(run.previews[step]), size=run.image.size)
        draw_boxes(ax, run.boxes, run.image.size, colors=colors, linewidth=1.2)
        ax.set_title(f"step {step + 1}/{total}", fontsize=8)
        for row, name in enumerate(names, start=1):
            subject = row - 1 if kind in IMAGE_BRANCH_KINDS else None
            artist = draw_heatmap(grid[row, column], maps[column, row - 1], image_size=run.image.size, vmin=vmin, vmax=vmax)
            draw_boxes(grid[row, column], run.boxes, run.image.size, colors=colors, highlight=subject, linewidth=1.2)
            if column == 0:
                grid[row, column].set_ylabel(name, fontsize=8, color=colors[subject] if subject is not None else "black")
    grid[0, 0].set_ylabel("predicted x0", fontsize=8)
    fig.suptitle(f"{VARIANT_LABELS.get(run.variant, run.variant)} over the denoising steps", fontsize=9)
    if artist is not None:
        fig.colorbar(artist, ax=list(grid[1:].ravel()), shrink=0.7, label=kind)
    return fig


def save(fig: Figure, path: str | Path, dpi: int = 300) -> list[Path]:
    """Writes ``fig`` by suffix: ``.pdf``, ``.png``, or both when ``path`` has no suffix. Returns the paths."""
    path = Path(path)
    if path.suffix == "":
        targets = [path.with_suffix(".pdf"), path.with_suffix(".png")]
    elif path.suffix.lower() in (".pdf", ".png"):
        targets = [path]
    else:
        raise ValueError(f"save writes .pdf or .png (or both for a path without suffix), not {path.suffix!r}.")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A fixed creation date keeps PDFs byte-identical between runs.
        metadata = {"CreationDate": None} if target.suffix.lower() == ".pdf" else {"Software": None}
        fig.savefig(target, dpi=dpi, bbox_inches="tight", metadata=metadata)
    return targets


# --- internals ------------------------------------------------------------------------------------

def _check_run(run: object) -> None:
    if not isinstance(run, Run):
        raise ValueError(f"Expected an anyms_core.Run, got {type(run).__name__} (use Run.load(path) for a saved run).")


def _colors(run: Run) -> list[str]:
    """The box, title and frame colour of each subject of ``run`` (the one rule: ``palette.subject_colors``)."""
    return subject_colors(run.subject_names)


def _check_same_case(runs: Sequence[Run], where: str) -> None:
    """Side-by-side figures compare variants of one case: same subjects in the same boxes."""
    first = runs[0]
    for index, run in enumerate(runs[1:], start=1):
        if run.subject_names != first.subject_names or not np.allclose(run.boxes, first.boxes):
            raise ValueError(
                f"{where} shows one case under several variants, but run {index} has subjects {run.subject_names} "
                f"in boxes {run.boxes} and run 0 has {first.subject_names} in {first.boxes}."
            )


def _maps_of(run: Run, kind: str, steps=None, layers=None, resolution=None, items=None, size=None,
             per_step: bool = False, allow_text_variant: bool = False) -> np.ndarray | None:
    """``run.attention.maps(...)`` with errors that say what to do instead."""
    attention = run.attention
    if attention is None:
        raise ValueError(
            f"This {run.variant!r} run was generated with record off, so it has no attention maps: "
            f"generate it again with record=True (or record={kind!r})."
        )
    if kind not in attention.kinds:
        raise ValueError(f"This run recorded {attention.kinds} maps, not {kind!r}: generate it with record={kind!r}.")
    if kind in IMAGE_BRANCH_KINDS and not any(k == kind for k, _, _ in attention.entries):
        if run.variant == "text":
            if allow_text_variant:
                return None
            raise ValueError(f"A 'text' run has no image branch, so it has no {kind!r} maps; plot another variant.")
        raise ValueError(f"This run has no {kind!r} maps recorded (all dropped by the memory budget?).")
    return attention.maps(kind, steps=steps, layers=layers, resolution=resolution, items=items, size=size, per_step=per_step)


def _item_names(run: Run, kind: str, items: Sequence[int | str] | None) -> list[str]:
    names = run.attention.items(kind)
    if items is None:
        return list(names)
    return [item if isinstance(item, str) else names[int(item)] for item in items]


def _steps_text(run: Run, steps) -> str:
    recorded = run.attention.steps if run.attention is not None else []
    if steps is None:
        return f"mean of all {len(recorded)} steps" if recorded else "all steps"
    if isinstance(steps, int):
        return f"step {steps}"
    if isinstance(steps, slice):
        return f"steps {recorded[steps][0]}..{recorded[steps][-1]}" if recorded[steps] else "no steps"
    return f"steps {list(steps)}"


def _shared_limits(arrays: Sequence[np.ndarray | None], vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """One colour scale for every panel of a figure: given limits, else the extremes of all maps shown."""
    present = [a for a in arrays if a is not None]
    low = float(vmin) if vmin is not None else min((float(np.min(a)) for a in present), default=0.0)
    high = float(vmax) if vmax is not None else max((float(np.max(a)) for a in present), default=1.0)
    return low, (high if high > low else low + 1.0)


def _new_figure(nrows: int, ncols: int, height: float | None = None) -> Figure:
    fig = Figure(figsize=(PANEL_INCHES * ncols + 0.8, (height or PANEL_INCHES) * nrows + 0.4), layout="constrained")
    fig.subplots(nrows, ncols, squeeze=False)
    return fig


def _figure_for(ax: Axes | None, width: float, height: float) -> tuple[Figure, Axes]:
    if ax is not None:
        return _root_figure(ax), ax
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _root_figure(ax: Axes) -> Figure:
    return ax.figure.figure  # a SubFigure's .figure is the root Figure; a Figure's is itself


def _draw_image(ax: Axes, image: Image.Image, size: tuple[int, int] | None = None) -> AxesImage:
    """An image at pixel extent ``size`` (default its own size): previews are stretched to the run's size."""
    width, height = size or image.size
    artist = ax.imshow(np.asarray(image), extent=(0, width, height, 0), interpolation="nearest", label=IMAGE_LABEL)
    _clean(ax)
    return artist


def _empty_panel(ax: Axes, text: str) -> None:
    ax.set_facecolor("#F4F4F4")
    if text:
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=7, color="#666666")
    _clean(ax)


def _clean(ax: Axes) -> None:
    """No ticks or frame, but a y-label still shows (row titles live there)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
