"""What the figure functions draw: panels, box coordinates, one shared colour scale, files, errors.

Most tests build ``Run`` objects directly from synthetic arrays (no model, no BLAS), so they are fast
and exactly reproducible; one test goes through a real (tiny, random) pipeline and ``Run.save/load``.
Set ``ANYMS_UPDATE_REFERENCE=1`` to rewrite the committed reference PNG after an intended change.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.testing.compare import compare_images
from PIL import Image

from anyms_core import AnyMS, Run, Subject
from anyms_core.recording import AttentionMaps
from anyms_viz import figures
import colorsys

from anyms_viz.palette import SUBJECT_COLORS, color_rgb, subject_colors

REFERENCE_DIR = Path(__file__).parent / "reference"
BOXES = [[0.05, 0.1, 0.55, 0.6], [0.4, 0.4, 0.95, 0.95], [0.5, 0.05, 0.95, 0.45]]
NAMES = ["red circle", "cyan square", "lime cross"]


def cell_masks(boxes, grid: int) -> np.ndarray:
    masks = np.zeros((len(boxes), grid, grid), np.float32)
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        masks[index, round(y0 * grid):round(y1 * grid), round(x0 * grid):round(x1 * grid)] = 1.0
    return masks


def synthetic_run(variant: str = "anyms", scale: float = 1.0, boxes=BOXES, names=NAMES, size=(32, 32),
                  grid: int = 8, steps: int = 3, attention: bool = True, previews: bool = True) -> Run:
    """A deterministic Run: an image gradient, box-shaped maps that grow with the step and ``scale``."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 90)], -1).astype(np.uint8)
    references = [Image.new("RGB", (16, 16), (200, 40 * i, 40)) for i in range(len(boxes))]
    maps = None
    if attention:
        maps = AttentionMaps(kinds=["affinity", "contribution"], subjects=list(names), words=[], policy="resolution",
                             budget_bytes=2**20, grids={} if variant == "text" else {f"{grid}x{grid}": (grid, grid)})
        if variant != "text":  # like the recorder: the text-only variant has no image branch to record
            masks = cell_masks(boxes, grid)
            ramp = np.linspace(0.2, 1.0, grid, dtype=np.float32)[None, None, :]
            for step in range(steps):
                for kind, values in (("affinity", 0.2 + 0.6 * masks), ("contribution", masks * ramp)):
                    maps.entries[(kind, step, f"{grid}x{grid}")] = torch.from_numpy(values * scale * (step + 1) / steps).half()
    config = {
        "prompt": "a photo on grass", "subjects": [{"name": n, "box": list(b), "priority": None} for n, b in zip(names, boxes)],
        "variant": variant, "seed": 0, "steps": steps, "priority_rule": "order", "height": height, "width": width,
    }
    frames = [np.full((16, 16, 3), 20 * step % 256, np.uint8) for step in range(steps)] if previews else []
    return Run([Image.fromarray(image)], config, references, maps, frames, {})


def heatmap_images(fig: Figure, prefix: str = figures.HEATMAP_LABEL):
    return [image for ax in fig.axes for image in ax.images if image.get_label().startswith(prefix)]


def box_patches(ax):
    return [patch for patch in ax.patches if patch.get_gid() == figures.BOX_GID]


# --- what is drawn --------------------------------------------------------------------------------

def test_plot_attention_draws_one_panel_per_subject_on_one_scale():
    fig = figures.plot_attention(synthetic_run(), kind="contribution")
    heatmaps = heatmap_images(fig)
    assert len(heatmaps) == 3
    (clim,) = {h.get_clim() for h in heatmaps}
    assert clim == (0.0, pytest.approx(2 / 3, abs=1e-3))  # the mean over steps of maps peaking at 1/3, 2/3, 1
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == NAMES
    assert [ax.title.get_color() for ax in fig.axes[:3]] == subject_colors(NAMES)


def test_plot_attention_into_given_axes_and_checks_their_number():
    fig = Figure()
    axes = fig.subplots(1, 3)
    assert figures.plot_attention(synthetic_run(), axes=axes, colorbar=False) is fig
    with pytest.raises(ValueError, match="3 panels"):
        figures.plot_attention(synthetic_run(), axes=axes[:2])


def test_boxes_are_drawn_at_pixel_edges_of_a_non_square_image():
    run = synthetic_run(boxes=[[0.25, 0.5, 0.75, 1.0]], names=["a"], size=(64, 32))
    fig = figures.plot_image(run)
    (rectangle,) = box_patches(fig.axes[0])
    assert rectangle.get_xy() == (16.0, 16.0)
    assert (rectangle.get_width(), rectangle.get_height()) == (32.0, 16.0)
    assert matplotlib.colors.to_hex(rectangle.get_edgecolor()) == SUBJECT_COLORS[0].lower()  # "a" is no toy sprite
    # The image spans exactly [0, width] x [height, 0] in the same coordinates.
    assert fig.axes[0].images[0].get_extent() == [0, 64, 32, 0]


def test_plot_image_into_a_given_axis():
    fig = Figure()
    ax = fig.add_subplot()
    assert figures.plot_image(synthetic_run(), ax=ax, title="mine") is fig
    assert ax.get_title() == "mine" and len(box_patches(ax)) == 3


def test_comparison_shares_one_colour_scale_across_variants():
    runs = [synthetic_run("anyms", 1.0), synthetic_run("mask", 2.0), synthetic_run("none", 0.5)]
    fig = figures.plot_comparison(runs, kind="affinity")
    heatmaps = heatmap_images(fig)
    assert len(heatmaps) == 3 * 3  # variants x subjects
    expected_vmax = max(float(r.attention.maps("affinity").max()) for r in runs)
    (clim,) = {h.get_clim() for h in heatmaps}
    assert clim == (0.0, pytest.approx(expected_vmax, rel=1e-4))
    differences = heatmap_images(fig, figures.DIFFERENCE_LABEL)
    assert len(differences) == 2 * 3  # (variants - 1) x subjects
    limits = {d.get_clim() for d in differences}
    assert len(limits) == 1 and next(iter(limits))[0] == -next(iter(limits))[1]
    # Panels: a row of images and one row per subject, one column per variant and per difference.
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == (1 + 3) * (3 + 2)


def test_min_max_normalized_scale_is_still_shared():
    runs = [synthetic_run("anyms", 1.0), synthetic_run("mask", 2.0)]
    fig = figures.plot_comparison(runs, kind="affinity", vmin=None, differences=False)
    maps = [r.attention.maps("affinity") for r in runs]
    (clim,) = {h.get_clim() for h in heatmap_images(fig)}
    assert clim == (pytest.approx(min(m.min() for m in maps), rel=1e-4), pytest.approx(max(m.max() for m in maps), rel=1e-4))


def test_comparison_marks_overlaps_and_leaves_text_variant_empty():
    runs = [synthetic_run("anyms"), synthetic_run("mask"), synthetic_run("text")]
    fig = figures.plot_comparison(runs, kind="contribution")
    assert len(heatmap_images(fig)) == 2 * 3
    assert len(heatmap_images(fig, figures.DIFFERENCE_LABEL)) == 1 * 3  # text has nothing to subtract
    assert sum(t.get_text() == "no image branch" for ax in fig.axes for t in ax.texts) == 3
    overlaps = [p for ax in fig.axes for p in ax.patches if p.get_gid() == figures.OVERLAP_GID]
    assert len(overlaps) == 3 * 4  # three overlapping pairs, on the layout panel and three subject rows


def hue_degrees(color: str) -> float:
    return colorsys.rgb_to_hsv(*(value / 255 for value in color_rgb(color)))[0] * 360


def test_toy_subjects_are_drawn_in_their_own_colour():
    red, yellow, cyan, lime = subject_colors(["red circle", "yellow triangle", "cyan square", "lime cross"])
    assert hue_degrees(red) < 10 or hue_degrees(red) > 350  # red, not vermillion (26 degrees)
    assert 45 < hue_degrees(yellow) < 60  # yellow, not pink
    assert 175 < hue_degrees(cyan) < 195 and 80 < hue_degrees(lime) < 100


def test_other_subjects_get_okabe_ito_in_order_away_from_toy_hues():
    assert subject_colors(["cat", "dog", "bird"]) == list(SUBJECT_COLORS[:3])
    assert subject_colors([]) == []
    # Vermillion is too close to the red circle's hue: the dog gets the next Okabe-Ito colour.
    red, dog, cat = subject_colors(["red circle", "dog", "cat"])
    assert [dog, cat] == list(SUBJECT_COLORS[1:3])
    assert subject_colors(["dog", "red circle"])[0] == SUBJECT_COLORS[1]
    assert subject_colors(["red square", "red circle"])[0] == subject_colors(["red circle"])[0]  # one colour per sprite colour
    assert subject_colors(["red circle", "Red circle", "red blob"])[1:] == list(SUBJECT_COLORS[1:3])  # not sprite names


def test_every_figure_draws_toy_subjects_in_their_own_colour():
    run = synthetic_run()  # NAMES are toy sprites
    expected = [c.lower() for c in subject_colors(NAMES)]
    figures_drawn = [figures.plot_image(run), figures.plot_comparison([run, synthetic_run("mask")]),
                     figures.plot_attention(run), figures.plot_steps(run, kind="affinity"), figures.plot_layout_panel(run),
                     figures.plot_ablation_grid([[run]])]
    for fig in figures_drawn:
        for ax in fig.axes:
            boxes = box_patches(ax)
            if boxes:
                assert [matplotlib.colors.to_hex(b.get_edgecolor()) for b in boxes] == expected


def test_overlap_regions():
    assert figures.overlap_regions(BOXES) == [[0.4, 0.4, 0.55, 0.6], [0.5, 0.1, 0.55, 0.45], [0.5, 0.4, 0.95, 0.45]]
    assert figures.overlap_regions([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]) == []


def test_ablation_grid_has_a_layout_column_and_variant_titles():
    rows = [[synthetic_run(v) for v in ("anyms", "mask", "none")] for _ in range(2)]
    fig = figures.plot_ablation_grid(rows)
    assert len(fig.axes) == 2 * 4
    assert [ax.get_title() for ax in fig.axes[:4]] == ["layout"] + [figures.VARIANT_LABELS[v] for v in ("anyms", "mask", "none")]
    assert all(len(box_patches(ax)) == 3 for ax in fig.axes)
    assert len(figures.plot_ablation_grid(rows, layout_column=False).axes) == 2 * 3


def test_layout_panel_frames_references_in_subject_colours():
    fig = figures.plot_layout_panel(synthetic_run())
    assert len(fig.axes) == 3 + 2
    for index in range(3):
        assert matplotlib.colors.to_hex(fig.axes[index].spines["top"].get_edgecolor()) == subject_colors(NAMES)[index].lower()
    assert "a photo on grass" in fig.get_supxlabel()


def test_plot_steps_draws_previews_and_maps_per_step():
    fig = figures.plot_steps(synthetic_run(steps=3), kind="contribution")
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == (1 + 3) * 3
    heatmaps = heatmap_images(fig)
    assert len({h.get_clim() for h in heatmaps}) == 1
    assert len(figures.plot_steps(synthetic_run(steps=12), max_columns=4).axes) == 4


def test_save_writes_pdf_and_png(tmp_path):
    fig = figures.plot_image(synthetic_run())
    written = figures.save(fig, tmp_path / "out" / "figure", dpi=50)
    assert [p.suffix for p in written] == [".pdf", ".png"]
    assert written[0].read_bytes().startswith(b"%PDF") and written[1].read_bytes().startswith(b"\x89PNG")
    assert figures.save(fig, tmp_path / "only.png", dpi=50) == [tmp_path / "only.png"]
    with pytest.raises(ValueError, match=r"\.pdf or \.png"):
        figures.save(fig, tmp_path / "figure.jpg")


# --- loud errors ----------------------------------------------------------------------------------

def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="record=True"):
        figures.plot_attention(synthetic_run(attention=False))
    with pytest.raises(ValueError, match="record='text'"):
        figures.plot_attention(synthetic_run(), kind="text")
    with pytest.raises(ValueError, match="no image branch"):
        figures.plot_attention(synthetic_run("text"))
    with pytest.raises(ValueError, match="previews=True"):
        figures.plot_steps(synthetic_run(previews=False))
    with pytest.raises(ValueError, match="out of range"):
        figures.plot_steps(synthetic_run(steps=3), steps=[5])
    with pytest.raises(ValueError, match="Run.load"):
        figures.plot_image("runs/some-run")
    with pytest.raises(ValueError, match="one case"):
        figures.plot_comparison([synthetic_run(), synthetic_run(boxes=[[0, 0, 1, 1]] * 3)])
    with pytest.raises(ValueError, match="differences=False"):
        figures.plot_comparison([synthetic_run()])
    with pytest.raises(ValueError, match="all are variant 'text'"):
        figures.plot_comparison([synthetic_run("text"), synthetic_run("text")])
    with pytest.raises(ValueError, match="same number of runs"):
        figures.plot_ablation_grid([[synthetic_run()], [synthetic_run(), synthetic_run()]])


# --- a real pipeline, saved and loaded --------------------------------------------------------------

def test_figures_from_a_real_run_after_save_and_load(tiny_sdxl, tmp_path):
    subjects = [Subject(Image.new("RGB", (32, 32), (220, 30, 30)), BOXES[0], "red"),
                Subject(Image.new("RGB", (32, 32), (30, 200, 220)), BOXES[1], "cyan")]
    anyms = AnyMS(tiny_sdxl)
    runs = [anyms.generate("a photo", subjects, variant=v, height=64, width=64, num_inference_steps=3) for v in ("anyms", "mask")]
    loaded = [Run.load(run.save(tmp_path / run.variant)) for run in runs]
    fig = figures.plot_comparison(loaded, kind="contribution", steps=0)
    assert len(heatmap_images(fig)) == 2 * 2
    np.testing.assert_allclose(heatmap_images(fig)[0].get_array(), runs[0].attention.maps("contribution", steps=0)[0], atol=1e-6)
    assert len(figures.plot_steps(loaded[0], kind="affinity").axes) > 0


# --- one image comparison against a committed reference -------------------------------------------

def test_comparison_figure_matches_reference_png(tmp_path):
    runs = [synthetic_run("anyms", 1.0), synthetic_run("mask", 1.5), synthetic_run("text")]
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "text.antialiased": True}):
        fig = figures.plot_comparison(runs, kind="contribution")
        actual = tmp_path / "comparison.png"
        figures.save(fig, actual, dpi=60)
    expected = REFERENCE_DIR / "comparison.png"
    if os.environ.get("ANYMS_UPDATE_REFERENCE") == "1":
        expected.parent.mkdir(exist_ok=True)
        expected.write_bytes(actual.read_bytes())
    # RMS tolerance on the 0-255 scale: absorbs font rasterisation differences, not a moved panel.
    result = compare_images(str(expected), str(actual), tol=6)
    assert result is None, result
