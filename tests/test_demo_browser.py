"""The demo page as a user sees it, in headless Debian Chromium: the shipped model, every example
of every tab clicked and its answer checked, input images shown large, the model's summary in
the header; a screenshot of each tab goes to the test's tmp folder."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from multimodal.demo import example_images, example_labels, launch  # noqa: E402
from train.shapes import SHAPES, analyze  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")]
TIMEOUT = 180_000  # ms: CPU sampling of four images


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    app = launch(port=None, prevent_thread_lock=True, quiet=True)  # the shipped model
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(app.local_url, wait_until="networkidle")
            yield page
        finally:
            browser.close()
            app.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _examples(page, tab: str):
    """The example buttons of a tab's ``gr.Examples``, in order."""
    items = page.locator(f"#{tab}-examples .gallery-item, #{tab}-examples tbody tr.tr-body")
    items.first.wait_for()
    return items


def _changed(page, selector: str, previous: str | None, prop: str = "innerText", start: str = "") -> str:
    """``prop`` of the first element matching ``selector`` once it is non-empty, starts with
    ``start`` and differs from ``previous`` (polled by selector: Gradio re-renders components)."""
    js = "([sel, prop]) => { const el = document.querySelector(sel); return el ? String(el[prop] ?? '').trim() : ''; }"
    page.wait_for_function(f"([sel, prop, prev, start]) => {{ const v = ({js})([sel, prop]); return v && v !== prev && v.startsWith(start); }}",
                           arg=[selector, prop, previous, start], timeout=TIMEOUT)
    return page.evaluate(js, [selector, prop])


def _answer(path: str) -> tuple[str, str]:
    color, shape = Path(path).stem.split("_")[-2:]
    return color, shape


def test_header_says_what_the_model_knows(page, tmp_path_factory):
    summary = page.locator("#model-summary").inner_text()
    assert "Trained on the embedded captioned-shapes data" in summary and re.search(r"knows \d+ words: a, ", summary), summary
    assert "model card" in summary.lower()
    page.locator("#model-card button").first.click()
    sync_api.expect(page.locator("#model-card").get_by_text("Metrics (held-out split)")).to_be_visible()
    assert "library_name" not in page.locator("#model-card").inner_text()  # the card's YAML header is not shown


def test_generate_examples_draw_what_they_say(page, tmp_path_factory):
    _tab(page, "Generate")
    prompts = ["a red circle", "a blue square", "a green triangle"]  # what the shipped model follows (not size, position)
    items = _examples(page, "generate")
    assert items.count() == len(prompts)
    previous = None
    for i, prompt in enumerate(prompts):
        items.nth(i).click()
        sync_api.expect(page.get_by_label("Prompt", exact=True)).to_have_value(prompt, timeout=TIMEOUT)
        page.get_by_role("button", name="Generate", exact=True).click()
        previous = _changed(page, "#generate-gallery img", previous, "src")
        image = Image.open(io.BytesIO(page.request.get(previous).body())).convert("RGB").resize((32, 32), Image.NEAREST)
        found = analyze(np.asarray(image))
        words = prompt.split()
        assert found is not None and found.color in words and found.shape in words, (prompt, found)
    page.screenshot(path=str(tmp_path_factory.getbasetemp() / "tab_generate.png"), full_page=True)


def test_classify_examples_bring_labels_with_their_answer(page, tmp_path_factory):
    _tab(page, "Classify")
    items = _examples(page, "classify")
    shown = [str(p) for p in example_images()[:4]]
    assert items.count() == len(shown)
    previous = None
    for i, path in enumerate(shown):
        items.nth(i).click()
        labels = example_labels(Path(path))
        sync_api.expect(page.get_by_label("Labels (comma-separated)")).to_have_value(labels, timeout=TIMEOUT)
        color, shape = _answer(path)
        assert f"{color} {shape}" in labels.split(", ")
        width = page.locator("#classify-image img").first.bounding_box()["width"]
        assert width >= 128, f"input image shown {width} px wide"
        page.get_by_role("button", name="Classify", exact=True).click()
        previous = _changed(page, "#classify-out h2", previous)  # the examples' answers all differ
        assert previous == f"{color} {shape}", (path, previous)
    page.screenshot(path=str(tmp_path_factory.getbasetemp() / "tab_classify.png"), full_page=True)


def test_search_examples_rank_the_right_image_first(page, tmp_path_factory):
    _tab(page, "Search")
    items = _examples(page, "search")
    wanted = {"a red shape": ("red",), "a large square": ("large", "square")}
    assert items.count() == len(wanted)
    note = None
    for i, (query, words) in enumerate(wanted.items()):
        items.nth(i).click()
        sync_api.expect(page.get_by_label("Query")).to_have_value(query, timeout=TIMEOUT)
        page.get_by_role("button", name="Search", exact=True).click()
        note = _changed(page, "#search-note", note, start="Searched")
        assert "built-in example images" in note
        first = re.search(r"(\S+\.png)", note).group(1)  # the list of results, best first
        assert all(w in first for w in words), (query, note)
    page.screenshot(path=str(tmp_path_factory.getbasetemp() / "tab_search.png"), full_page=True)


def test_caption_examples_name_color_and_shape(page, tmp_path_factory):
    _tab(page, "Caption")
    items = _examples(page, "caption")
    shown = [str(p) for p in example_images()[:4]]
    assert items.count() == len(shown)
    caption = None
    for i, path in enumerate(shown):
        items.nth(i).click()
        assert page.locator("#caption-image img").first.bounding_box()["width"] >= 128
        page.get_by_role("button", name="Caption", exact=True).click()
        caption = _changed(page, "#caption-out textarea", caption, "value")  # the examples' captions all differ
        color, shape = _answer(path)
        assert color in caption.split() and shape in caption.split(), (path, caption)
    page.screenshot(path=str(tmp_path_factory.getbasetemp() / "tab_caption.png"), full_page=True)


def test_complete_examples_go_on_as_captions(page, tmp_path_factory):
    _tab(page, "Complete")
    items = _examples(page, "complete")
    starts = ["a picture of a", "a drawing of a small"]
    assert items.count() == len(starts)
    text = None
    for i, start in enumerate(starts):
        items.nth(i).click()
        page.get_by_role("button", name="Complete", exact=True).click()
        text = _changed(page, "#complete-out textarea", text, "value")
        assert text.startswith(start) and any(s in text.split() for s in SHAPES), (start, text)
    page.screenshot(path=str(tmp_path_factory.getbasetemp() / "tab_complete.png"), full_page=True)
