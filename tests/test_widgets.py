"""The Python side of the widgets: traits, validation, round trips, re-generation, messages, static PNGs.

The front end (drawing with the mouse, keys, what the browser shows) is tested in tests/browser/.
"""

from __future__ import annotations

import matplotlib.colors
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from anyms_core import AnyMS, Subject
from anyms_core.layout import paint_order
from anyms_core.models import load_pipeline
from anyms_core.toy.world import sprite_reference
from anyms_viz import figures
from anyms_viz.palette import SUBJECT_COLORS, color_rgb, subject_colors
from anyms_viz.widgets import BoxEditor, Explorer, StepScrubber, VariantComparison, generate_variants

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
FAST = {"height": 64, "width": 64, "num_inference_steps": 3}
RECORD = {"kinds": ["affinity", "contribution", "text"], "words": ["grass"]}
PROMPT = "a photo on grass"


def make_subjects(priorities=(None, None)) -> list[Subject]:
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(24, 24, 3) * 255).astype(np.uint8)) for _ in range(2)]
    return [
        Subject(images[0], [0.1, 0.1, 0.5, 0.6], name="cat", priority=priorities[0]),
        Subject(images[1], [0.4, 0.3, 0.9, 0.9], name="dog", priority=priorities[1]),
    ]


def bundle_of(widget) -> dict:
    bundle = widget._repr_mimebundle_()
    return bundle[0] if isinstance(bundle, tuple) else bundle


def assert_png(data: bytes) -> None:
    assert isinstance(data, bytes) and data.startswith(PNG_SIGNATURE)


@pytest.fixture(scope="module")
def anyms(tiny_sdxl) -> AnyMS:
    return AnyMS(tiny_sdxl)


@pytest.fixture(scope="module")
def runs(anyms):
    return {run.variant: run for run in generate_variants(anyms, PROMPT, make_subjects(), ("anyms", "mask", "none", "text"),
                                                           record=RECORD, **FAST)}


# --- BoxEditor ------------------------------------------------------------------------------------
def test_box_editor_traits_come_from_the_subjects():
    editor = BoxEditor(make_subjects())
    assert editor.names == ["cat", "dog"]
    assert editor.boxes == [[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9]]
    assert editor.order == [0, 1] and editor.selected == -1
    assert len(set(editor.colors)) == 2 and all(c.startswith("#") for c in editor.colors)
    assert all(t.startswith("data:image/png;base64,") for t in editor.thumbnails)
    assert editor.background == "" and editor.aspect == 1.0


def test_box_editor_order_follows_explicit_priorities():
    editor = BoxEditor(make_subjects(priorities=(2.0, 1.0)))
    assert editor.order == [1, 0]  # lowest first: the cat owns the overlap
    assert editor.priorities() == [1.0, 0.0]


def test_boxes_set_from_python_reach_the_front_end_state():
    editor = BoxEditor(make_subjects())
    editor.set_box("dog", [0.5, 0.5, 1.0, 1.0])
    assert editor.get_state()["boxes"] == [[0.1, 0.1, 0.5, 0.6], [0.5, 0.5, 1.0, 1.0]]
    editor.boxes = [[0, 0, 0.25, 0.25], None]
    assert editor.get_state()["boxes"] == [[0.0, 0.0, 0.25, 0.25], None]
    assert editor.missing == ["dog"]


def test_boxes_from_the_front_end_reach_python():
    editor = BoxEditor(make_subjects())
    seen = []
    editor.observe(lambda change: seen.append(change["new"]), names="boxes")
    editor.set_state({"boxes": [[0.2, 0.2, 0.4, 0.4], [0.6, 0.6, 0.8, 0.9]], "order": [1, 0]})  # what a comm message does
    assert seen == [[[0.2, 0.2, 0.4, 0.4], [0.6, 0.6, 0.8, 0.9]]]
    subjects = editor.subjects()
    assert [list(s.box) for s in subjects] == [[0.2, 0.2, 0.4, 0.4], [0.6, 0.6, 0.8, 0.9]]
    assert paint_order(subjects) == [1, 0]


@pytest.mark.parametrize("boxes, message", [
    ([[0.2, 0.2, 0.2, 0.4], None], "empty"),
    ([[0.2, 0.4, 0.5, 0.3], None], "empty"),
    ([[-0.1, 0.2, 0.5, 0.4], None], "outside"),
    ([[0.2, 0.2, 1.2, 0.4], None], "outside"),
    ([[0.2, 0.2, float("nan"), 0.4], None], "NaN"),
    ([[0.2, 0.2, 0.4], None], "four numbers"),
    ([[0.2, 0.2, 0.4, 0.4]], "2 subjects"),
])
def test_invalid_boxes_are_rejected_loudly(boxes, message):
    editor = BoxEditor(make_subjects())
    with pytest.raises(ValueError, match=message):
        editor.boxes = boxes
    with pytest.raises(ValueError, match=message):
        editor.set_state({"boxes": boxes})  # from the front end too
    assert editor.boxes == [[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9]]


def test_other_invalid_state_is_rejected():
    editor = BoxEditor(make_subjects())
    with pytest.raises(ValueError, match="permutation"):
        editor.order = [0, 0]
    with pytest.raises(ValueError, match="selected"):
        editor.selected = 2
    with pytest.raises(ValueError, match="No subject named"):
        editor.set_box("bird", [0, 0, 1, 1])
    with pytest.raises(ValueError, match="Subject"):
        BoxEditor([])


def test_subjects_need_every_box():
    editor = BoxEditor(make_subjects())
    editor.set_box(0, None)
    with pytest.raises(ValueError, match="Place a box for cat"):
        editor.subjects()


def test_background_sets_the_aspect_and_blank_canvas_keeps_it():
    editor = BoxEditor(make_subjects(), aspect=1.5)
    assert editor.aspect == 1.5 and editor.background == ""
    editor.set_background(Image.new("RGB", (64, 32)))
    assert editor.aspect == 2.0 and editor.background.startswith("data:image/png;base64,")
    editor.set_background(None, aspect=0.5)
    assert editor.aspect == 0.5 and editor.background == ""


def test_box_editor_static_picture():
    editor = BoxEditor(make_subjects())
    editor.set_box(1, None)
    assert_png(editor.to_png())
    bundle = bundle_of(editor)
    assert WIDGET_MIME in bundle and "image/png" in bundle
    figure = Figure()
    ax = figure.add_subplot()
    assert editor.plot(ax=ax) is figure


# --- StepScrubber ---------------------------------------------------------------------------------
def test_scrubber_shows_every_step(runs):
    run = runs["anyms"]
    scrubber = StepScrubber(run)
    assert scrubber.num_steps == run.num_steps == FAST["num_inference_steps"]
    assert scrubber.slider.max == scrubber.num_steps - 1 and scrubber.step == scrubber.num_steps - 1
    assert list(scrubber.kind.options) == ["affinity", "contribution", "text"]
    panels = scrubber.panels.children
    assert len(panels) == 1 + len(run.subject_names)
    last_frame = [bytes(panel.children[1].value) for panel in panels]
    scrubber.step = 0
    assert "step 1 / 3" in scrubber.step_label.value
    assert [bytes(panel.children[1].value) for panel in panels] != last_frame
    with pytest.raises(ValueError, match="out of range"):
        scrubber.step = 3


def test_scrubber_kinds_and_layers(runs):
    scrubber = StepScrubber(runs["anyms"], kind="text")
    assert len(scrubber.panels.children) == 1 + 1  # x0 and the word "grass"
    assert "grass" in scrubber.panels.children[1].children[0].value
    grids = [label for label in scrubber.layers.options if label.endswith("grid")]
    assert grids, scrubber.layers.options
    scrubber.layers.value = grids[-1]
    scrubber.kind.value = "contribution"
    assert len(scrubber.panels.children) == 3
    with pytest.raises(ValueError, match="no 'affinity' maps"):
        StepScrubber(runs["text"], kind="affinity")
    assert list(StepScrubber(runs["text"]).kind.options) == ["text"]


def test_scrubber_colour_range(runs):
    scrubber = StepScrubber(runs["anyms"], kind="affinity")
    assert "affinity: 0 " in scrubber.scale.value
    before = bytes(scrubber.panels.children[1].children[1].value)
    scrubber.range.value = "min"  # affinities of two subjects sit near 0.5: stretch them
    assert "affinity: 0 " not in scrubber.scale.value
    assert bytes(scrubber.panels.children[1].children[1].value) != before


def test_scrubber_static_pictures(runs):
    scrubber = StepScrubber(runs["mask"])
    assert_png(scrubber.to_png())
    assert "image/png" in bundle_of(scrubber)
    figure = Figure()
    axes = figure.subplots(1, 3)
    assert scrubber.plot(step=0, axes=axes) is figure
    with pytest.raises(ValueError, match="3 panels"):
        scrubber.plot(axes=axes[:2])
    assert_png(StepScrubber().to_png())


# --- VariantComparison ----------------------------------------------------------------------------
def test_comparison_side_by_side(runs):
    comparison = VariantComparison([runs["anyms"], runs["mask"], runs["none"]])
    assert comparison.kind.value == "affinity"
    first = bytes(comparison.view.value)
    assert first.startswith(PNG_SIGNATURE)
    comparison.reference.value = 1
    assert bytes(comparison.view.value) != first
    comparison.kind.value = "contribution"
    assert isinstance(comparison.plot(), Figure)
    assert comparison.to_png().startswith(PNG_SIGNATURE) and "image/png" in bundle_of(comparison)


def test_comparison_of_text_runs_says_why_it_is_empty(runs):
    comparison = VariantComparison([runs["text"]])
    assert comparison.kind.value == "text"
    comparison.set_runs([runs["text"]], kind="text")
    assert comparison.message.value == ""
    with pytest.raises(ValueError, match="no 'contribution' maps|None of these runs"):
        comparison.set_runs([runs["text"]], kind="contribution")


def test_generate_variants_checks_its_arguments(anyms):
    with pytest.raises(ValueError, match="Unknown AnyMS variant 'crop'"):
        generate_variants(anyms, PROMPT, make_subjects(), ("anyms", "crop"))
    with pytest.raises(ValueError, match="Choose one or more variants"):
        generate_variants(anyms, PROMPT, make_subjects(), ())
    with pytest.raises(ValueError, match="once"):
        generate_variants(anyms, PROMPT, make_subjects(), ("anyms", "anyms"))


# --- Explorer -------------------------------------------------------------------------------------
@pytest.fixture
def explorer(tiny_sdxl):
    explorer = Explorer(make_subjects(), pipe=tiny_sdxl, prompt=PROMPT, auto=True, debounce_s=0, generate_kwargs=FAST)
    yield explorer
    explorer.close()


def test_explorer_generates_at_once(explorer):
    assert explorer.run is not None and explorer.last_error is None
    assert "Generated" in explorer.status.value
    assert explorer.scrubber.run is explorer.run
    assert explorer.editor.background.startswith("data:image/png")
    assert explorer.progress.value == explorer.progress.max and explorer.progress.description == "idle"
    assert bytes(explorer.result.value).startswith(PNG_SIGNATURE)


def test_explorer_regenerates_on_box_change(explorer):
    first = explorer.run
    explorer.editor.set_box("dog", [0.5, 0.5, 0.95, 0.95])  # the observer runs the handler; debounce 0: at once
    assert explorer.run is not first
    assert explorer.run.boxes == [[0.1, 0.1, 0.5, 0.6], [0.5, 0.5, 0.95, 0.95]]
    second = explorer.run
    explorer.editor.order = [1, 0]
    assert explorer.run is not second and explorer.run.config["subjects"][0]["priority"] == 1.0
    explorer.variant.value = "mask"
    assert explorer.run.variant == "mask"


def test_explorer_shows_errors_and_recovers(explorer):
    good = explorer.run
    explorer.editor.set_box("dog", None)
    assert explorer.run is good
    assert "anyms-error" in explorer.status.value and "Place a box for dog" in explorer.status.value
    explorer.editor.set_box("dog", [0.5, 0.5, 0.9, 0.9])
    assert explorer.run is not good and "anyms-ok" in explorer.status.value

    explorer.generate_kwargs["height"] = 60  # the core refuses: a message, not an exception
    assert explorer.generate() is None
    assert isinstance(explorer.last_error, ValueError)
    assert "Could not generate" in explorer.status.value and "divisible by 8" in explorer.status.value
    assert not explorer.generate_button.disabled and explorer.progress.description == "idle"
    explorer.generate_kwargs["height"] = 64
    assert explorer.generate() is not None and explorer.last_error is None


def test_explorer_waits_for_the_button_when_auto_is_off(tiny_sdxl):
    explorer = Explorer(make_subjects(), pipe=tiny_sdxl, prompt=PROMPT, debounce_s=0, generate_kwargs=FAST)
    assert explorer.auto.value is False  # the default for any pipeline but the toy world's
    first = explorer.run
    explorer.editor.set_box("dog", [0.5, 0.5, 0.95, 0.95])
    assert explorer.run is first and "press Generate" in explorer.status.value
    explorer.generate_button.click()
    assert explorer.run is not first
    explorer.auto.value = True  # the checkbox turns it on later
    second = explorer.run
    explorer.editor.set_box("dog", [0.45, 0.5, 0.95, 0.95])
    assert explorer.run is not second
    explorer.close()


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline("toy")


TOY_SUBJECTS = [("red circle", [0.05, 0.05, 0.45, 0.45]), ("yellow triangle", [0.55, 0.55, 0.95, 0.95])]
TOY_FAST = {"num_inference_steps": 2}


def toy_subjects() -> list[Subject]:
    return [Subject(sprite_reference(name), box, name=name) for name, box in TOY_SUBJECTS]


def test_explorer_auto_is_on_by_default_for_the_toy_world(toy_pipe):
    explorer = Explorer(toy_subjects(), pipe=toy_pipe, debounce_s=0, generate_kwargs=TOY_FAST)
    assert explorer.auto.value is True  # a setting, not a timing
    first = explorer.run
    explorer.editor.set_box("red circle", [0.1, 0.05, 0.45, 0.45])
    assert explorer.run is not first  # re-generated by itself
    explorer.close()
    manual = Explorer(toy_subjects(), pipe=toy_pipe, auto=False, debounce_s=0, generate_kwargs=TOY_FAST)
    assert manual.auto.value is False
    manual.close()


def test_toy_subjects_have_their_own_colour_in_every_widget_and_figure(toy_pipe):
    """One rule: the red circle's box is red in the editor, the scrubber, the comparison and the figures."""
    explorer = Explorer(toy_subjects(), pipe=toy_pipe, auto=False, generate_kwargs=TOY_FAST)
    expected = subject_colors(["red circle", "yellow triangle"])
    assert explorer.editor.colors == expected
    red = color_rgb(expected[0])
    assert red[0] > 150 and red[1] < 60 and red[2] < 60  # red, not Okabe-Ito vermillion
    # The scrubber draws each box's outline in its colour: the top-left corner of each box.
    caption, image = explorer.scrubber.frame()[0]
    for (_, box), color in zip(TOY_SUBJECTS, expected):
        assert image.getpixel((round(box[0] * image.width), round(box[1] * image.height))) == color_rgb(color)
    # The figures (also what VariantComparison shows) use the same colours.
    figure = figures.plot_image(explorer.run)
    edges = [matplotlib.colors.to_hex(p.get_edgecolor()).upper() for p in figure.axes[0].patches if p.get_gid() == figures.BOX_GID]
    assert edges == expected
    explorer.compare()
    comparison = explorer.comparison.plot()
    labels = [ax.yaxis.label for ax in comparison.axes if ax.get_ylabel() in ("red circle", "yellow triangle")]
    assert [matplotlib.colors.to_hex(label.get_color()).upper() for label in labels] == expected
    explorer.close()


def test_other_subjects_keep_the_okabe_ito_colours():
    editor = BoxEditor(make_subjects())  # "cat" and "dog": not toy sprites
    assert editor.colors == list(SUBJECT_COLORS[:2])


def test_explorer_compares_variants(explorer):
    for choice in explorer.compare_choices:
        choice.value = choice.description in ("anyms", "none")
    runs = explorer.compare()
    assert [run.variant for run in runs] == ["anyms", "none"]
    assert explorer.comparison.runs == runs and explorer.tabs.selected_index == 1
    for choice in explorer.compare_choices:
        choice.value = False
    assert explorer.compare() is None and "Tick at least one" in explorer.status.value


def test_explorer_static_picture(explorer):
    assert_png(explorer.to_png())
    figure = Figure()
    assert explorer.plot(axes=figure.subplots(1, 2)) is figure
    bundle = bundle_of(explorer)
    assert WIDGET_MIME in bundle and "image/png" in bundle


def test_explorer_rejects_bad_arguments(tiny_sdxl):
    with pytest.raises(ValueError, match="Unknown AnyMS variant 'crop'"):
        Explorer(make_subjects(), pipe=tiny_sdxl, variant="crop")
    with pytest.raises(ValueError, match="Unknown AnyMS variant 'mask-only'"):
        Explorer(make_subjects(), pipe=tiny_sdxl, compare_variants=("anyms", "mask-only"))
    with pytest.raises(ValueError, match="must not set"):
        Explorer(make_subjects(), pipe=tiny_sdxl, generate_kwargs={"seed": 3})


def test_widgets_without_the_notebook_extras_name_the_extra(monkeypatch):
    import importlib
    import sys

    for name in [m for m in sys.modules if m == "anyms_viz.widgets" or m.startswith("anyms_viz.widgets.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "anywidget", None)  # as if not installed
    with pytest.raises(ImportError, match=r"anywidget is missing.*anyms\[notebooks\]"):
        importlib.import_module("anyms_viz.widgets")
