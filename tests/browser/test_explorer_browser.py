"""The Explorer in real JupyterLab + Chromium: render, keyboard, drag to create / move / resize, re-generation, scrubber.

The tests share one notebook (opening one costs a kernel start and the imports) and run in file
order, as one user session would: each test still checks its own preconditions and waits on real
conditions (kernel values, DOM state), never on fixed sleeps.
"""

from __future__ import annotations

import pytest

from .harness import open_notebook, write_notebook

NOTEBOOK = "explorer.ipynb"
MODEL = "toy"  # the default model: 32x32 images, ~0.3 s per image on one CPU thread
GENERATE_KWARGS: dict = {}  # the toy pipeline's own defaults
SETUP = f"""
import torch
torch.set_num_threads(1)
from anyms_core import Subject
from anyms_core.models import load_pipeline
from anyms_core.toy.world import sprite_reference
from anyms_viz.widgets import Explorer

subjects = [
    Subject(sprite_reference("red circle"), [0.08, 0.1, 0.45, 0.5], name="red circle"),
    Subject(sprite_reference("cyan square"), [0.55, 0.5, 0.92, 0.9], name="cyan square"),
]
explorer = Explorer(subjects, pipe=load_pipeline({MODEL!r}), auto=True, debounce_s=0.2, generate_kwargs={GENERATE_KWARGS!r})
explorer
"""
IMAGE_HASH = "__import__('hashlib').md5(explorer.run.image.tobytes()).hexdigest()"
TOLERANCE = 0.012  # normalized; a few screen pixels plus the 4-decimal rounding
GENERATION_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def session(browser, jupyter_lab):
    write_notebook(jupyter_lab.root / NOTEBOOK, [SETUP])
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = context.new_page()
    kernel = open_notebook(page, jupyter_lab, NOTEBOOK)
    try:
        page.wait_for_selector(".anyms-explorer .anyms-box-editor svg.anyms-canvas", timeout=GENERATION_TIMEOUT_S * 1000)
        yield page, kernel
    finally:
        kernel.close()
        context.close()


def canvas_box(page) -> dict:
    """The drawing area on screen: the background image (the SVG has a margin around it)."""
    return page.locator(".anyms-explorer svg.anyms-canvas .anyms-background").bounding_box()


def to_pixels(canvas: dict, x: float, y: float) -> tuple[float, float]:
    return canvas["x"] + x * canvas["width"], canvas["y"] + y * canvas["height"]


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def close_to(box, expected) -> bool:
    return box is not None and all(abs(a - b) <= TOLERANCE for a, b in zip(box, expected))


def wait_for_regeneration(kernel, previous_hash: str) -> str:
    """Waits until the kernel's latest run used the editor's boxes and its image differs from before."""
    wait_until_settled(kernel)
    return kernel.wait_for(IMAGE_HASH, lambda value: value != previous_hash, timeout=GENERATION_TIMEOUT_S, what="a new image")


def wait_until_settled(kernel) -> None:
    """Waits until no generation is pending or running: the last run used the editor's current boxes.

    An edit starts a debounced re-generation, and a new run resets the scrubber to its last step, so a
    test that follows an edit waits for this first.
    """
    kernel.wait_for("explorer.run.boxes == explorer.editor.boxes and explorer.progress.description == 'idle'",
                    lambda same: same, timeout=GENERATION_TIMEOUT_S, what="the explorer idle with the editor's boxes")


def screenshot(page, artifacts, name: str, part: str = ".anyms-explorer") -> None:
    element = page.locator(part)
    element.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # let the last image paint (see the notes: images settle after their update)
    element.screenshot(path=str(artifacts / name))


def test_explorer_renders(session, artifacts):
    page, kernel = session
    assert page.locator(".anyms-explorer rect.anyms-box").count() == 2
    page.wait_for_selector(".anyms-explorer .anyms-result img, .anyms-explorer img.anyms-result")
    status = page.locator(".anyms-explorer .anyms-status")
    status.get_by_text("Generated").wait_for()
    assert page.locator(".anyms-explorer .anyms-legend-row").count() == 2
    assert page.locator(".anyms-explorer img.anyms-thumbnail").count() == 2
    assert kernel.evaluate("explorer.editor.boxes") == [[0.08, 0.1, 0.45, 0.5], [0.55, 0.5, 0.92, 0.9]]
    screenshot(page, artifacts, "01-explorer-initial.png")


def test_keys_pick_a_subject_and_delete_its_box(session, artifacts):
    page, kernel = session
    page.locator(".anyms-explorer .anyms-box-editor").focus()
    page.keyboard.press("2")
    kernel.wait_for("explorer.editor.selected", lambda value: value == 1, what="subject 2 selected")
    page.keyboard.press("Delete")
    kernel.wait_for("explorer.editor.boxes[1]", lambda box: box is None, what="box 2 deleted")
    # The core's complaint is a readable message in the widget, not a traceback.
    page.locator(".anyms-explorer .anyms-error").get_by_text("Place a box for cyan square").wait_for()
    # JupyterLab did not also take "2" as "make this cell a heading".
    assert page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets[0].model.type") == "code"
    assert page.locator(".anyms-explorer rect.anyms-box").count() == 1
    screenshot(page, artifacts, "02-box-deleted.png")


def test_drag_creates_a_box_that_reaches_the_kernel(session, artifacts):
    page, kernel = session
    assert kernel.evaluate("explorer.editor.boxes[1]") is None, "needs subject 2 without a box"
    before = kernel.evaluate(IMAGE_HASH)
    canvas = canvas_box(page)
    drag(page, to_pixels(canvas, 0.5, 0.55), to_pixels(canvas, 0.9, 0.95))
    box = kernel.wait_for("explorer.editor.boxes[1]", lambda box: close_to(box, [0.5, 0.55, 0.9, 0.95]), what="the drawn box")
    assert box[2] - box[0] > 0 and box[3] - box[1] > 0
    wait_for_regeneration(kernel, before)
    page.locator(".anyms-explorer .anyms-ok").get_by_text("Generated").wait_for()
    screenshot(page, artifacts, "03-box-drawn.png")


def test_drag_moves_a_box_and_regenerates(session, artifacts):
    page, kernel = session
    start_box = kernel.evaluate("explorer.editor.boxes[0]")
    before_hash = kernel.evaluate(IMAGE_HASH)
    before_src = page.locator(".anyms-explorer img.anyms-result").get_attribute("src")
    canvas = canvas_box(page)
    center = ((start_box[0] + start_box[2]) / 2, (start_box[1] + start_box[3]) / 2)
    shift = (0.15, 0.2)
    drag(page, to_pixels(canvas, *center), to_pixels(canvas, center[0] + shift[0], center[1] + shift[1]))
    expected = [start_box[0] + shift[0], start_box[1] + shift[1], start_box[2] + shift[0], start_box[3] + shift[1]]
    kernel.wait_for("explorer.editor.boxes[0]", lambda box: close_to(box, expected), what="the moved box")
    wait_for_regeneration(kernel, before_hash)
    # The browser shows the new image, too.
    page.wait_for_function(
        "(old) => document.querySelector('.anyms-explorer img.anyms-result').getAttribute('src') !== old", arg=before_src,
    )
    screenshot(page, artifacts, "04-box-moved.png")


def test_resizing_cannot_leave_the_canvas(session, artifacts):
    page, kernel = session
    page.locator(".anyms-explorer .anyms-box-editor").focus()
    page.keyboard.press("2")
    kernel.wait_for("explorer.editor.selected", lambda value: value == 1, what="subject 2 selected")
    handle = page.locator(".anyms-explorer .anyms-handle-se").bounding_box()
    canvas = canvas_box(page)
    start = (handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    drag(page, start, (canvas["x"] + canvas["width"] + 60, canvas["y"] + canvas["height"] + 60))  # far outside
    box = kernel.wait_for("explorer.editor.boxes[1]", lambda box: box[2] == 1.0 and box[3] == 1.0, what="a box clamped to the edge")
    assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_scrubber_slider_changes_the_shown_step(session, artifacts):
    page, kernel = session
    # The resize before this starts a re-generation; its run would reset the scrubber mid-test.
    wait_until_settled(kernel)
    steps = kernel.evaluate("explorer.scrubber.num_steps")
    assert steps > 1
    kernel.wait_for("explorer.scrubber.step", lambda step: step == steps - 1, what="the scrubber at the last step")
    label = page.locator(".anyms-explorer .anyms-step-label")
    label.get_by_text(f"step {steps} / {steps}").wait_for()
    first_panel = page.locator(".anyms-explorer .anyms-step-scrubber img").first
    first_panel.scroll_into_view_if_needed()
    before_src = first_panel.get_attribute("src")
    screenshot(page, artifacts, "05-scrubber-last-step.png")
    # Drag the slider's handle to the left end of its track: the first step.
    page.locator(".anyms-explorer .anyms-step-slider").scroll_into_view_if_needed()
    handle = page.locator(".anyms-explorer .anyms-step-slider .noUi-handle").bounding_box()
    track = page.locator(".anyms-explorer .anyms-step-slider .noUi-target").bounding_box()
    drag(page, (handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2), (track["x"] - 20, handle["y"] + handle["height"] / 2))
    kernel.wait_for("explorer.scrubber.step", lambda step: step == 0, what="the scrubber at step 0")
    label.get_by_text(f"step 1 / {steps}").wait_for()
    page.wait_for_function(
        "(old) => document.querySelector('.anyms-explorer .anyms-step-scrubber img').getAttribute('src') !== old", arg=before_src,
    )
    screenshot(page, artifacts, "06-scrubber-first-step.png")


def test_compare_button_shows_the_variants_side_by_side(session, artifacts):
    page, kernel = session
    page.locator(".anyms-explorer .lm-TabBar-tab", has_text="Variants side by side").click()
    page.locator(".anyms-explorer button", has_text="Compare variants").click()
    kernel.wait_for("[run.variant for run in explorer.comparison.runs]", lambda variants: variants == ["anyms", "mask", "none"],
                    timeout=GENERATION_TIMEOUT_S, what="three compared runs")
    view = page.locator(".anyms-explorer img.anyms-comparison-view")
    view.wait_for(state="visible")
    page.locator(".anyms-explorer .anyms-ok").get_by_text("Compared anyms, mask, none").wait_for()
    screenshot(page, artifacts, "07-variants-side-by-side.png", part=".anyms-explorer .anyms-variant-comparison")
