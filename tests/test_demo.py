"""The Gradio demo, launched for real (prevent_thread_lock) on a tiny random model and called
through gradio_client like any remote user would."""

from __future__ import annotations

import concurrent.futures
import io
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from multimodal import FoundationConfig, FoundationModel  # noqa: E402
from multimodal.demo import DemoLimits, example_images, launch  # noqa: E402

LIMITS = DemoLimits(max_steps=4, max_images=2, max_file_size="100kb")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = FoundationModel(FoundationConfig.from_preset("tiny"))
    known = "a picture of a red circle blue square green triangle shape large an image drawing"
    model.vocabulary = frozenset(model.tokenize(known.split()).flatten().tolist())  # as if trained on these words
    model.save_pretrained(folder)
    app = launch(folder, port=None, limits=LIMITS, prevent_thread_lock=True, quiet=True)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(demo):
    return gradio_client.Client(demo.local_url, verbose=False)


def _open(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def test_every_tab_answers_through_the_api(client):
    images, note = client.predict("a red circle", "", 2, 3.0, 7, "ddim", 2, api_name="/generate")
    assert note == ""  # every word known
    assert len(images) == 2 and [item["caption"] for item in images] == ["seed 7", "seed 8"]
    assert _open(images[0]["image"]).size == (192, 192)

    example = gradio_client.handle_file(str(example_images()[0]))
    probs, note = client.predict(example, "red circle, blue square, green triangle", api_name="/classify")
    assert note == ""
    confidences = {c["label"]: c["confidence"] for c in probs["confidences"]}
    assert set(confidences) == {"red circle", "blue square", "green triangle"}
    assert abs(sum(confidences.values()) - 1) < 1e-4

    upload = [gradio_client.handle_file(str(p)) for p in example_images()[:2]]
    ranked, note = client.predict("a red shape", upload, 3, api_name="/search")
    assert len(ranked) == 3 and all(" " in item["caption"] for item in ranked)
    assert note.startswith("Searched the 8 built-in example images and 2 uploaded")  # says what it searched
    assert [line.split("`")[1] for line in note.splitlines()[2:]] == [re.split(r"\s", item["caption"], 1)[1] + ".png" for item in ranked]

    caption = client.predict(example, 1, api_name="/caption")
    assert isinstance(caption, str)
    completion, note = client.predict("a picture of a", 3, api_name="/complete")
    assert isinstance(completion, str) and completion.startswith("a picture of a") and note == ""


def test_words_the_model_never_saw_get_a_note_under_the_result(client):
    _, note = client.predict("a cat on a red circle", "", 1, 3.0, 0, "ddim", 1, api_name="/generate")
    assert "never saw 'cat', 'on'" in note
    _, note = client.predict("a zebra", 2, api_name="/complete")
    assert "'zebra'" in note


def test_out_of_range_input_is_refused_with_a_message(client, capfd):
    # the sliders' bounds are checked by Gradio on the server before our own check; each refusal
    # is one line in the server log, never a traceback
    with pytest.raises(Exception, match=r"Value 500 is greater than maximum value 4"):
        client.predict("a red circle", "", 500, 3.0, 0, "ddim", 1, api_name="/generate")
    with pytest.raises(Exception, match=r"Value 9 is greater than maximum value 2"):
        client.predict("a red circle", "", 2, 3.0, 0, "ddim", 9, api_name="/generate")
    with pytest.raises(Exception, match=r"seed must be a whole number between 0 and"):
        client.predict("a red circle", "", 2, 3.0, 2**40, "ddim", 1, api_name="/generate")
    with pytest.raises(Exception, match=r"prompt is too long"):
        client.predict("x" * 1000, "", 2, 3.0, 0, "ddim", 1, api_name="/generate")
    with pytest.raises(Exception, match=r"nonsense is not in the list of choices"):
        client.predict("a red circle", "", 2, 3.0, 0, "nonsense", 1, api_name="/generate")
    with pytest.raises(Exception, match=r"Steps: a value of the wrong kind \(str\)"):
        client.predict("a red circle", "", "abc", 3.0, 0, "ddim", 1, api_name="/generate")
    log = capfd.readouterr().err
    assert "Traceback" not in log and log.count("demo: refused a request") == 6, log


def test_no_file_outside_the_app_is_served(demo):
    secret = Path(__file__)  # a file the app never served
    for route in ("gradio_api/file=", "file="):
        url = f"{demo.local_url}{route}{secret}"
        try:
            with urllib.request.urlopen(url) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            assert err.code in (403, 404)
        else:  # some routes answer 200 with the page itself, never with the file
            assert b"def test_no_file_outside_the_app_is_served" not in body
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{demo.local_url}gradio_api/file=/etc/passwd")
    assert refused.value.code in (403, 404)


def test_oversized_upload_is_refused(demo, tmp_path):
    big = tmp_path / "big.png"
    Image.effect_noise((400, 400), 64).convert("RGB").save(big)  # ~480 kB of noise > 100 kB limit
    assert big.stat().st_size > 100_000
    boundary = "----multimodaltest"
    body = io.BytesIO()
    body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
               "Content-Type: image/png\r\n\r\n".encode())
    body.write(big.read_bytes())
    body.write(f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(f"{demo.local_url}gradio_api/upload", data=body.getvalue(), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 413


def _multipart(files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "----multimodaltest"
    body = io.BytesIO()
    for name, data in files.items():
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                   "Content-Type: image/png\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def _upload(url: str, files: dict[str, bytes]) -> list[str]:
    body, content_type = _multipart(files)
    request = urllib.request.Request(f"{url}gradio_api/upload", data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request) as response:
        return __import__("json").loads(response.read())


def test_a_huge_image_under_the_size_limit_is_refused_before_decoding(client, tmp_path):
    from test_hardening_inputs import huge_png

    bomb = huge_png(tmp_path / "bomb.png", 13000, 13000)
    assert bomb.stat().st_size < 100_000  # under this demo's upload limit
    for api, args in (("/classify", ("a, b",)), ("/caption", (1,))):
        with pytest.raises(Exception, match=r"image: bomb.png is 13000x13000 = 169000000 pixels, more than the 16777216 allowed \(refused before decoding\)") as err:
            client.predict(gradio_client.handle_file(str(bomb)), *args, api_name=api)
        assert "/" not in str(err.value)  # no server path
    with pytest.raises(Exception, match="upload: bomb.png is 13000x13000"):
        client.predict("a red shape", [gradio_client.handle_file(str(bomb))], 1, api_name="/search")


def test_errors_never_show_a_server_path(client, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for api, args in (("/classify", ("a, b",)), ("/caption", (1,))):
        with pytest.raises(Exception) as err:
            client.predict(gradio_client.handle_file(str(broken)), *args, api_name=api)
        message = str(err.value)
        assert "broken.png" in message and "/" not in message and str(Path.cwd()) not in message, message


def test_more_files_than_allowed_in_one_upload_are_refused(demo):
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, format="PNG")
    files = {f"{i}.png": tiny.getvalue() for i in range(LIMITS.max_uploads + 1)}
    with pytest.raises(urllib.error.HTTPError) as refused:
        _upload(demo.local_url, files)
    assert refused.value.code == 413 and b"at most 16 files per upload" in refused.value.read()
    body, content_type = _multipart(files)  # the boundary written as Gradio's parser reads it, not as a regex would
    for header in (content_type.replace("boundary=", "BOUNDARY="), content_type.replace("boundary=", "xboundary=abc; boundary=")):
        request = urllib.request.Request(f"{demo.local_url}gradio_api/upload", data=body, method="POST", headers={"Content-Type": header})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 413 and refused.value.headers["X-Frame-Options"] == "DENY"
    assert len(_upload(demo.local_url, dict(list(files.items())[:2]))) == 2


def test_security_headers_and_no_analytics(demo):
    with urllib.request.urlopen(demo.local_url) as response:
        headers = response.headers
    assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert demo.analytics_enabled is False


def test_uploads_are_deleted_after_their_time(tmp_path):
    folder = tmp_path / "model"
    FoundationModel(FoundationConfig.from_preset("tiny")).save_pretrained(folder)
    app = launch(folder, port=None, limits=DemoLimits(upload_max_age_s=1, upload_check_s=1), prevent_thread_lock=True, quiet=True)
    try:
        tiny = io.BytesIO()
        Image.new("RGB", (4, 4)).save(tiny, format="PNG")
        (path,) = _upload(app.local_url, {"a.png": tiny.getvalue()})
        assert Path(path).is_file()
        deadline = time.monotonic() + 30
        while Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(path).exists()
    finally:
        app.close()


def test_twenty_concurrent_generate_calls_complete(client):
    jobs = [client.submit(f"a shape number {i}", "", 1, 2.0, i, "ddim", 1, api_name="/generate") for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: job.result(timeout=300), jobs))
    assert len(results) == 20 and all(len(images) == 1 and images[0]["caption"] == f"seed {i}" for i, (images, _) in enumerate(results))


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_browser_generates_an_image(demo, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(demo.local_url, wait_until="networkidle")
            prompt = page.get_by_label("Prompt", exact=True)
            prompt.fill("a small blue square")
            page.get_by_role("button", name="Generate", exact=True).click()
            images = page.locator("#generate-gallery img")
            images.first.wait_for(timeout=120_000)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            assert images.count() == LIMITS.max_images  # the default number of images, capped by the limits
            assert images.first.evaluate("img => img.naturalWidth") == 192
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
