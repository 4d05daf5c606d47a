"""Gradio demo page: ``multimodal demo [--model DIR] [--host 127.0.0.1] [--port 7860]``.

Tabs Generate, Classify, Search, Caption and Complete, each also an API endpoint
(``/generate``, ``/classify``, ``/search``, ``/caption``, ``/complete``) for ``gradio_client``;
generate, classify and complete also return a note naming prompt words the model never saw,
and a component the model never trained is refused with the command that trains it.
Hardened by default: binds 127.0.0.1, never shares, sends no analytics, a bounded queue with a
concurrency limit; uploads bounded in size, in files per request and in pixels (checked from
the header before decoding) and deleted after ``DemoLimits.upload_max_age_s``; security headers
on every response (``multimodal.web``); every input bounded and checked on the server (the
sliders' bounds are only a convenience of the page); errors say what is wrong without a server
path; Gradio serves no file outside its own cache.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diffusion.schedule import scheduler_names

from .config import DemoLimits
from .files import CARD_NAME, read_regular
from .knowledge import UnseenWordsWarning, knowledge_summary, trained_components, unseen_message
from .pipeline import FoundationPipeline
from .preprocess import as_pil, preprocess, to_rgb
from .templates import DEFAULT_TEMPLATES

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "assets" / "models" / "shapes"
EXAMPLES = ROOT / "assets" / "demo"
THUMBNAIL = 192  # pixels: search results are shown at most this large
CLASSIFY_LABELS = ("red circle", "blue square", "green triangle", "yellow diamond")
HEAD_NAMES = {"decoder": "image decoder", "language": "language head"}
# uploaded and example images are shown as large as results, with crisp pixels (a 32-pixel image stays visible)
CSS = (".model-input img { width: 256px !important; height: 256px !important; object-fit: contain; image-rendering: pixelated;"
       " border: 1px solid #9ca3af; }")  # a white image on a white page still shows where it ends


def _error(message: str) -> Exception:
    """A message for the page, without any server path (a path is shortened to its file name)."""
    import gradio as gr

    message = scrub(message)
    print(f"demo: refused a request: {message}", file=sys.stderr, flush=True)  # one line, not a traceback: the input was bad
    return gr.Error(message, print_exception=False)


def scrub(message: str) -> str:
    """``message`` with every absolute path replaced by its last part: what the server's disk
    looks like is nobody's business."""
    return re.sub(r"(?<![\w.])(?:/[^\s/'\"`]+)+/([^\s/'\"`]+)", r"\1", message)


def _answering(fn):
    """Errors of the pipeline (bad input, untrained parts, NaN) become page messages, scrubbed."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except gr.Error:  # already a page message (a ValueError too, in Gradio 6)
            raise
        except (ValueError, OSError, FloatingPointError) as err:  # UntrainedComponentError is a ValueError
            raise _error(str(err)) from None
    return wrapper


def _text(value: Any, name: str, limits: DemoLimits, allow_empty: bool = False, max_chars: int | None = None) -> str:
    max_chars = max_chars or limits.max_text_chars
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _error(f"{name} must be text")
    value = value.strip()
    if not value and not allow_empty:
        raise _error(f"{name} is empty")
    if len(value) > max_chars:
        raise _error(f"{name} is too long: {len(value)} characters (at most {max_chars})")
    return value


def _number(value: Any, name: str, low: float, high: float, integer: bool = True) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _error(f"{name} must be a number, got {value!r}") from None
    if not low <= number <= high or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise _error(f"{name} must be {kind} between {low:g} and {high:g}, got {value}")
    return int(number) if integer else number


def _image(value: Any, limits: DemoLimits, name: str = "image") -> Image.Image:
    """An uploaded image (a path in Gradio's cache), decoded only after its header passed the checks."""
    if value is None:
        raise _error(f"{name}: upload an image first")
    if not isinstance(value, (str, Path, Image.Image)):
        value = getattr(value, "name", value)  # a gr.File item of older Gradio versions: its path
    if isinstance(value, (str, Path)):
        try:
            return as_pil(value, limits.max_pixels)
        except ValueError as err:
            raise _error(f"{name}: {str(err).split(': ', 1)[-1]}") from None
    if isinstance(value, Image.Image):  # the pipeline's preprocessing makes it RGB, as in training
        return value
    raise _error(f"{name}: unsupported input {type(value).__name__}")


def _view(image: Image.Image, size: int = 192) -> Image.Image:
    """Small model images enlarged with nearest-neighbour for the page (crisp pixels)."""
    return image.resize((size, size), Image.NEAREST) if image.width < size else image


def _note(pipe: FoundationPipeline, texts: list[str]) -> str:
    """The note under a result: prompt words the model never saw in training."""
    words = pipe.unseen_words(texts)
    return f"**Note:** {unseen_message(words)}." if words else ""


def _image_input(**kwargs):
    """A ``gr.Image`` that hands over the uploaded file's path without opening it: Gradio's own
    preprocessing opens uploads with PIL (tracebacks for broken files, a bare error for huge
    ones); this project's image layer checks and decodes them instead (``_image``). (Patched on
    the instance: a subclass would make Gradio write a .pyi file into this package.)"""
    import gradio as gr

    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and (payload.url or "").startswith("data:"):  # Gradio would decode it whole, unchecked
            raise _error("image: send the image as a file upload, not a data: URL")
        if payload is not None and payload.path is not None:
            return payload.path
        return original(payload)

    component.preprocess = preprocess
    return component


def _quiet(*components) -> None:
    """Gradio's own checks of a component's value (a slider's range, a dropdown's choices, an
    upload's type) raise errors that it logs with a traceback: log one line, as the page's own
    checks do. (Patched on the instances, as ``_image_input``.)"""
    import gradio as gr

    for component in components:
        def preprocess(payload, original=component.preprocess, label=component.label):
            try:
                return original(payload)
            except gr.Error as err:
                raise _error(str(err.message)) from None
            except (TypeError, ValueError):  # a value of the wrong kind from an API client
                raise _error(f"{label}: a value of the wrong kind ({type(payload).__name__})") from None
        component.preprocess = preprocess


def example_images() -> list[Path]:
    return sorted(EXAMPLES.glob("*.png"))


def example_labels(path: Path) -> str:
    """Labels for a shipped example image (``large_red_triangle.png``): its own color and shape
    among three others, alphabetical, so that every example can be answered right."""
    answer = " ".join(path.stem.split("_")[-2:])
    return ", ".join(sorted([answer, *[label for label in CLASSIFY_LABELS if label != answer][:3]]))


def _card(pipe: FoundationPipeline) -> str:
    """The model folder's card (README.md), for the page's "Model card" section; "" when none."""
    folder = Path(pipe.model.name_or_path) if pipe.model.name_or_path else None
    if folder is None or not (folder / CARD_NAME).is_file():
        return ""
    try:
        text = read_regular(folder / CARD_NAME, 1 << 20).decode("utf-8", errors="replace")
        return re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # the hub's YAML header is for machines
    except (OSError, ValueError):
        return ""


def build_demo(pipe: FoundationPipeline, limits: DemoLimits = DemoLimits(), gallery: list[Path] | None = None):
    """The ``gr.Blocks`` page for ``pipe`` (not launched). ``gallery``: the images the Search
    tab searches besides uploads (default: the shipped example images)."""
    import gradio as gr

    lock = threading.Lock()  # one model, shared by the queue's workers: one call at a time
    gallery = example_images() if gallery is None else gallery
    has_decoder, has_language = pipe.model.decoder is not None, pipe.model.language is not None
    schedulers = scheduler_names(pipe.model.config.decoder)
    sampling = pipe.model.config.sampling  # the model's recommended settings: the page's defaults

    @_answering
    def generate(prompt, negative, steps, guidance, seed, scheduler, num_images, progress=gr.Progress(track_tqdm=True)):
        prompt = _text(prompt, "prompt", limits)
        negative = _text(negative, "negative prompt", limits, allow_empty=True) or None
        steps = _number(steps, "steps", 1, limits.max_steps)
        guidance = _number(guidance, "guidance", 0, limits.max_guidance, integer=False)
        seed = _number(seed, "seed", 0, 2**31 - 1)
        count = _number(num_images, "number of images", 1, limits.max_images)
        if scheduler not in schedulers:
            raise _error(f"scheduler must be one of {', '.join(schedulers)}, got {scheduler!r}")
        if not has_decoder:
            raise _error("this model has no diffusion decoder")
        pipe._require("text", "decoder")
        with lock, warnings.catch_warnings():  # no filter can be set from the page: nothing to act on in the log
            warnings.filterwarnings("ignore", message="generating without a prompt filter")
            out = pipe(
                prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=count, scheduler=scheduler,
                generator=[torch.Generator().manual_seed(seed + i) for i in range(count)],
            )
        return [(_view(img), f"seed {seed + i}") for i, img in enumerate(out.images)], _note(pipe, [prompt])

    @_answering
    def classify(image, labels):
        image = _image(image, limits)
        names = [n.strip() for n in _text(labels, "labels", limits, max_chars=limits.max_labels * 40).replace("\n", ",").split(",") if n.strip()]
        if not 2 <= len(names) <= limits.max_labels:
            raise _error(f"labels: give between 2 and {limits.max_labels} comma-separated labels, got {len(names)}")
        pipe._require("text", "image")
        with lock, warnings.catch_warnings():  # said in the note instead
            warnings.simplefilter("ignore", UnseenWordsWarning)
            probs = pipe.classify(image, names, templates=DEFAULT_TEMPLATES)[0]
        return {name: float(p) for name, p in zip(names, probs)}, _note(pipe, [t.format(n) for t in DEFAULT_TEMPLATES for n in names])

    @_answering
    def search(query, uploads, top_k):
        query = _text(query, "query", limits)
        uploads = list(uploads or [])
        if len(uploads) > limits.max_uploads:
            raise _error(f"uploads: at most {limits.max_uploads} images, got {len(uploads)}")
        sources = [(p, Path(p).name) for p in gallery] + [(u, Path(str(getattr(u, "name", u))).name) for u in uploads]
        if not sources:
            raise _error("nothing to search: upload images")
        top_k = min(_number(top_k, "results", 1, 16), len(sources))  # the slider's range; as many as there are
        pipe._require("text", "image")
        size, pixels, thumbs = pipe.model.config.image.image_size, [], []
        for source, _ in sources:  # one decoded image at a time: the model's input and a thumbnail are kept
            image = _image(source, limits, "upload")
            pixels.append(preprocess(image, size))
            thumb = to_rgb(image)
            thumb.thumbnail((THUMBNAIL, THUMBNAIL))
            thumbs.append(thumb)
            del image
        with lock:
            ranked = pipe.retrieve(query, torch.stack(pixels), top_k=top_k)
        where = (f"the {len(gallery)} built-in example images" + (f" and {len(uploads)} uploaded" if uploads else
                 " (upload images to search yours too)") if gallery else f"{len(uploads)} uploaded images")
        table = "\n".join(f"{r}. `{sources[i][1]}` {score:.3f}" for r, (i, score) in enumerate(ranked, 1))
        return [(_view(thumbs[i]), f"{score:.3f} {Path(sources[i][1]).stem}") for i, score in ranked], f"Searched {where}:\n\n{table}"

    @_answering
    def caption(image, num_beams):
        image = _image(image, limits)
        beams = _number(num_beams, "beams", 1, 8)
        if not has_language:
            raise _error("this model has no language head")
        pipe._require("text", "image", "language")
        with lock:
            return pipe.caption(image, num_beams=beams, max_new_tokens=limits.max_new_tokens)[0]

    @_answering
    def complete(text, max_new_tokens):
        text = _text(text, "text", limits)
        budget = _number(max_new_tokens, "new tokens", 1, limits.max_new_tokens)
        if not has_language:
            raise _error("this model has no language head")
        pipe._require("text", "language")
        with lock:
            return pipe.complete(text, max_new_tokens=budget)[0], _note(pipe, [text])

    examples = [str(p) for p in example_images()[:4]]
    trained = trained_components(pipe.model.config)
    untrained = [c for c in ("decoder", "language") if getattr(pipe.model, c) is not None and c not in trained]
    card = _card(pipe)
    summary = knowledge_summary(pipe.model.config, pipe.model.vocabulary, pipe.model.tokenizer)
    folder = Path(pipe.model.name_or_path) if pipe.model.name_or_path else None  # runs/align/model: "align/model", no server path
    name = "this model" if folder is None else (f"{folder.parent.name}/{folder.name}" if folder.name == "model" else folder.name)
    with gr.Blocks(title="multimodal-foundation demo", analytics_enabled=False,
                   delete_cache=(limits.upload_check_s, limits.upload_max_age_s)) as demo:
        gr.Markdown(
            "# multimodal-foundation\nOne shared text encoder: generate images, classify and search "
            f"images zero-shot, caption images and complete text.\n\n**Model `{name}`.** {summary}"
            + (" Its full model card is at the bottom of the page." if card else "")
            + "".join(f"\n\n**This model's {HEAD_NAMES[c]} was never trained**: "
                      + ("its output is noise (run with --allow-untrained)." if pipe.allow_untrained else "its tab is refused.")
                      for c in untrained), elem_id="model-summary"
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    g_prompt = gr.Textbox(label="Prompt", value="a large red circle", max_length=limits.max_text_chars)
                    g_negative = gr.Textbox(label="Negative prompt", value="", max_length=limits.max_text_chars)
                    g_steps = gr.Slider(1, limits.max_steps, value=min(sampling.steps, limits.max_steps), step=1, label="Steps")
                    g_guidance = gr.Slider(0, limits.max_guidance, value=min(sampling.guidance_scale, limits.max_guidance),
                                           step=0.5, label="Guidance")
                    g_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    g_scheduler = gr.Dropdown(schedulers, value=pipe.scheduler, label="Scheduler")
                    g_count = gr.Slider(1, limits.max_images, value=min(4, limits.max_images), step=1, label="Number of images")
                    g_button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    g_gallery = gr.Gallery(label="Images", columns=4, elem_id="generate-gallery", format="png")  # lossless: the pixels the model made
                    g_note = gr.Markdown(elem_id="generate-note")
            g_button.click(generate, [g_prompt, g_negative, g_steps, g_guidance, g_seed, g_scheduler, g_count],
                           [g_gallery, g_note], api_name="generate")
            gr.Examples([["a red circle"], ["a blue square"], ["a green triangle"]], [g_prompt], elem_id="generate-examples")
        with gr.Tab("Classify"):
            with gr.Row():
                c_image = _image_input(label="Image", elem_classes=["model-input"], elem_id="classify-image")  # a path, decoded by the project's checks
                with gr.Column():
                    c_labels = gr.Textbox(label="Labels (comma-separated)", value="red circle, blue square, green triangle, yellow diamond")
                    c_button = gr.Button("Classify", variant="primary")
                    c_out = gr.Label(label="Probabilities", num_top_classes=5, elem_id="classify-out")
                    c_note = gr.Markdown(elem_id="classify-note")
            c_button.click(classify, [c_image, c_labels], [c_out, c_note], api_name="classify")
            if examples:
                gr.Examples([[e, example_labels(Path(e))] for e in examples], [c_image, c_labels], elem_id="classify-examples")
        with gr.Tab("Search"):
            with gr.Row():
                with gr.Column():
                    s_query = gr.Textbox(label="Query", value="a red shape")
                    s_uploads = gr.File(label="Add images", file_count="multiple", file_types=["image"])
                    s_top = gr.Slider(1, 16, value=4, step=1, label="Results")
                    s_button = gr.Button("Search", variant="primary")
                with gr.Column():
                    s_out = gr.Gallery(label="Ranked results", columns=4, elem_id="search-gallery")
                    s_note = gr.Markdown(elem_id="search-note")
            s_button.click(search, [s_query, s_uploads, s_top], [s_out, s_note], api_name="search")
            gr.Examples([["a red shape"], ["a large square"]], [s_query], elem_id="search-examples")
        with gr.Tab("Caption"):
            with gr.Row():
                p_image = _image_input(label="Image", elem_classes=["model-input"], elem_id="caption-image")
                with gr.Column():
                    p_beams = gr.Slider(1, 8, value=1, step=1, label="Beams")
                    p_button = gr.Button("Caption", variant="primary")
                    p_out = gr.Textbox(label="Caption", elem_id="caption-out")
            p_button.click(caption, [p_image, p_beams], p_out, api_name="caption")
            if examples:
                gr.Examples([[e] for e in examples], [p_image], elem_id="caption-examples")
        with gr.Tab("Complete"):
            t_text = gr.Textbox(label="Text", value="a picture of a")
            t_tokens = gr.Slider(1, limits.max_new_tokens, value=8, step=1, label="New tokens")
            t_button = gr.Button("Complete", variant="primary")
            t_out = gr.Textbox(label="Completion", elem_id="complete-out")
            t_note = gr.Markdown(elem_id="complete-note")
            t_button.click(complete, [t_text, t_tokens], [t_out, t_note], api_name="complete")
            gr.Examples([["a picture of a"], ["a drawing of a small"]], [t_text], elem_id="complete-examples")
        if card:
            with gr.Accordion("Model card", open=False, elem_id="model-card"):
                gr.Markdown(card)
        _quiet(g_prompt, g_negative, g_steps, g_guidance, g_seed, g_scheduler, g_count, c_labels, s_query, s_uploads, s_top, p_beams,
               t_text, t_tokens)
    demo.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    return demo


def launch(model: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None,
           limits: DemoLimits = DemoLimits(), prevent_thread_lock: bool = False, quiet: bool = False,
           adapter: str | Path | None = None, allow_untrained: bool = False, device: str = "cpu"):
    """Load the model (default: the shipped shapes model; a LoRA adapter folder brings its base),
    optionally with a LoRA ``adapter`` on it, and serve the page. Returns the ``gr.Blocks`` (its
    ``local_url`` tells where it runs; ``close()`` stops it)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no usage reports
    from starlette.middleware import Middleware

    from .web import GuardMiddleware, parse_size

    directory = Path(model) if model is not None else SHIPPED_MODEL
    pipe = FoundationPipeline.from_pretrained(directory, adapter=adapter, allow_untrained=allow_untrained, device=device)
    demo = build_demo(pipe, limits)
    guard = Middleware(GuardMiddleware, max_files=limits.max_uploads,
                       max_bytes=limits.max_uploads * parse_size(limits.max_file_size) + (1 << 20))
    demo.launch(
        server_name=host, server_port=port, share=False, max_file_size=limits.max_file_size,
        prevent_thread_lock=True, show_error=False, quiet=True, ssr_mode=False,
        app_kwargs={"middleware": [guard]}, css=CSS,
    )
    if not quiet:  # Gradio's own banner suggests share=True, which this page never does
        where = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else f"bound to {host}"
        print(f"demo of {directory} running on {demo.local_url} ({where}; never shared); Ctrl+C stops it", flush=True)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo
