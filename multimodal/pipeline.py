"""``FoundationPipeline``: the Python API (generation, embedding, zero-shot classification, retrieval)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import warnings

import numpy as np
import torch
from PIL import Image

from diffusion.decoder import TextCondition
from diffusion.sampling import sample
from diffusion.schedule import sampling_scheduler, scheduler_names

from .checks import MAX_GUIDANCE, OUTPUT_TYPES, check_finite, check_generation_inputs, is_int, texts_arg  # noqa: F401
from .config import GenerationArgs
from .knowledge import UnseenWordsWarning, check_trained, unseen_message, unseen_words
from .language import generate_tokens
from .losses import token_log_likelihood
from .model import OPTIONAL_HEADS, FoundationModel
from .preprocess import ImageInput, as_pil, preprocess
from .safety import OutputChecker, PromptBlocked, PromptFilter, check_prompts, compile_prompt_filter  # noqa: F401
from .templates import check_templates, class_prompts
from .zero_shot import prototypes, zero_shot_weights



@dataclass
class GenerationOutput:
    """``images``: list of PIL images, a numpy array [N, S, S, C] in [0, 1], or a tensor
    [N, C, S, S] in [0, 1], by ``output_type``; ``flagged``: per image, whether the output
    checker flagged it (flagged images are blacked out); None without a checker;
    ``unseen_words``: prompt words the model never saw in training (its output for them is a guess)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    flagged: list[bool] | None = None
    unseen_words: list[str] = field(default_factory=list)


class Completions(list):
    """``complete``'s texts (a list of str) with ``unseen_words``: prompt words the model never saw."""

    unseen_words: list[str]



class FoundationPipeline:
    """Args:
        model: a ``FoundationModel``.
        scheduler: default sampling scheduler (``ddim``, ``dpm++``, ``euler``, ...); None: the
            model's recommended one (``config.sampling``), as every other door uses.
        prompt_filter: refuses prompts (generation and completion): a word list (whole words,
            any case) or a callable returning True or a reason (str) for a prompt to refuse.
        output_checker: a callable over generated images [N, C, S, S] in [0, 1] returning one
            bool per image; flagged images are blacked out and reported in ``flagged``.
    Generating with neither warns once per pipeline.
        allow_untrained: run components the model's training record says were never trained
            (with a warning) instead of refusing them (``multimodal.knowledge``).
    """

    def __init__(
        self, model: FoundationModel, scheduler: str | None = None,
        prompt_filter: PromptFilter | None = None, output_checker: OutputChecker | None = None,
        allow_untrained: bool = False,
    ):
        self.model = model.eval()
        self.allow_untrained = allow_untrained
        names = scheduler_names(model.config.decoder)  # a flow-matching decoder takes fewer
        if scheduler is not None and scheduler not in names:
            why = " (a flow-matching decoder; the others need a DDPM-trained one)" if model.config.decoder.objective == "flow" else ""
            raise ValueError(f"scheduler must be one of {', '.join(names)}{why}, got {scheduler!r}")
        self.scheduler = scheduler or model.config.sampling.scheduler
        self.prompt_filter, self.output_checker = compile_prompt_filter(prompt_filter), output_checker
        self._warned_unfiltered = False

    def _require(self, *components: str) -> None:
        check_trained(self.model.config, components, self.allow_untrained, getattr(self.model, "name_or_path", None))

    def unseen_words(self, texts: str | Sequence[str]) -> list[str]:
        """Words of ``texts`` with a token the model never saw in its training captions (empty
        when the model's vocabulary is unknown)."""
        return unseen_words(self.model.tokenizer, self.model.vocabulary, texts)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``PromptBlocked`` naming the filter (and its reason) for a refused prompt."""
        check_prompts(self.prompt_filter, prompts)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable[[int, int, torch.Tensor], None] | None = None,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        show_progress: bool = True,
    ) -> GenerationOutput:
        """Generate images from text with the diffusion decoder (classifier-free guidance).

        ``num_inference_steps`` / ``guidance_scale`` / ``scheduler``: None takes the model's
        recommended settings (``config.sampling``). ``generator``: one generator (images draw
        their starting noise from it in order) or one per image; with one per image, a batch
        gives the same images as one call per image. ``negative_prompt`` replaces the empty
        prompt as the unconditional branch.
        """
        settings = self.model.config.sampling
        steps = settings.steps if num_inference_steps is None else num_inference_steps
        guidance = settings.guidance_scale if guidance_scale is None else guidance_scale
        prompts, negatives, generators = self.check_inputs(
            prompt, negative_prompt, steps, guidance, num_images_per_prompt, generator, output_type, height, width)
        cond, uncond = self.encode_prompt(prompts, negatives, num_images_per_prompt)
        decoder = self.model.decoder
        images = sample(
            decoder, sampling_scheduler(scheduler or self.scheduler, decoder.config), cond, uncond, generators,
            steps, guidance, show_progress, callback_on_step_end,
        )
        output = self.postprocess(images, output_type)
        output.unseen_words = self.unseen_words(prompts)
        return output

    def check_inputs(
        self, prompt: Any, negative_prompt: Any, steps: int, guidance: float, per_prompt: int,
        generator: Any, output_type: str, height: int | None, width: int | None,
    ) -> tuple[list[str], list[str], list[torch.Generator | None]]:
        """Every argument checked before any work: (prompts, negative prompts, one generator per image)."""
        self.model.require("decoder")
        self._require("text", "decoder")
        prompts, negatives, generators = check_generation_inputs(
            self.model.decoder.config, prompt, negative_prompt, steps, guidance, per_prompt, generator, output_type, height, width)
        self.check_prompts(prompts)
        if self.prompt_filter is None and self.output_checker is None and not self._warned_unfiltered:
            self._warned_unfiltered = True
            warnings.warn(
                "generating without a prompt filter or an output checker: pass prompt_filter= / "
                "output_checker= to FoundationPipeline to refuse or flag content", UserWarning, stacklevel=4,
            )
        return prompts, negatives, generators

    def encode_prompt(self, prompts: list[str], negatives: list[str], per_prompt: int = 1) -> tuple[TextCondition, TextCondition]:
        """The decoder's conditions for the prompts and their negatives, each repeated ``per_prompt`` times."""
        repeat = lambda items: [x for x in items for _ in range(per_prompt)]  # noqa: E731
        return self.model.text_condition(repeat(prompts)), self.model.text_condition(repeat(negatives))

    def postprocess(self, images: torch.Tensor, output_type: str) -> GenerationOutput:
        """Images [N, C, S, S] in [-1, 1] -> [0, 1], the output checker's verdicts, ``output_type``.
        Non-finite samples are an error, never a silent black image."""
        if not bool(torch.isfinite(images).all()):
            raise FloatingPointError(
                "sampling produced NaN/inf values (scheduler, steps and guidance together are unstable for this model, "
                "or its weights are damaged): try fewer steps, another scheduler or a lower guidance scale")
        images = (images.float() + 1) / 2  # [N, C, S, S] in [0, 1]
        flagged = None
        if self.output_checker is not None:
            flagged = [bool(f) for f in self.output_checker(images.clamp(0, 1))]
            if len(flagged) != len(images):
                raise ValueError(f"output_checker returned {len(flagged)} verdicts for {len(images)} images")
            if any(flagged):
                warnings.warn(f"output checker flagged {sum(flagged)} of {len(flagged)} image(s); they are blacked out", UserWarning, stacklevel=3)
                images[torch.tensor(flagged)] = 0
        if output_type == "pt":
            return GenerationOutput(images.cpu(), flagged)
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return GenerationOutput(array, flagged)
        return GenerationOutput([Image.fromarray((a * 255).round().astype(np.uint8)) for a in array], flagged)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", scheduler: str | None = None,
        dtype: torch.dtype | None = None, adapter: str | Path | None = None, allow_untrained: bool = False,
        components: Sequence[str] | None = None,
    ) -> "FoundationPipeline":
        """Load a ``save_pretrained`` folder (safetensors only: pickle files are refused) onto
        ``device``, optionally in ``dtype`` (e.g. ``torch.bfloat16`` on GPUs). ``directory`` may
        also be a LoRA adapter folder (its recorded base model is loaded under it), and
        ``adapter`` a LoRA adapter folder to load onto the model ``directory``. ``components``:
        the optional heads to load (``decoder``, ``language``; None: all; an adapter's own
        components are always added): classification needs neither and starts in a second."""
        from . import lora

        if lora.is_adapter_folder(directory) and adapter is None:
            directory, adapter = lora.resolve_base(directory), directory
        elif adapter is not None:
            lora.resolve_base(adapter, base=directory)  # the adapter must have been trained on this base
        if adapter is not None and components is not None:
            components = {*components, *(c for c in lora.read_adapter_config(adapter).components if c in OPTIONAL_HEADS)}
        model = FoundationModel.from_pretrained(directory, components=components)
        if adapter is not None:
            model.load_adapter(adapter)
        return cls(model, scheduler, allow_untrained=allow_untrained).to(device, dtype)

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ the decoder in diffusers' format);
        a non-empty ``directory`` is replaced (atomically) only with ``overwrite=True``."""
        return self.model.save_pretrained(directory, overwrite=overwrite)

    def load_adapter(self, directory: str | Path) -> "FoundationPipeline":
        """Put a LoRA adapter (a ``save_adapter`` folder, trained on this base) on the model."""
        self.model.load_adapter(directory)
        self.model.to(self.device, self.dtype).eval()
        return self

    def unload_adapter(self) -> "FoundationPipeline":
        """Take the adapter off: the base model again, bit for bit."""
        self.model.unload_adapter()
        return self

    def merge_adapter(self) -> "FoundationPipeline":
        """Fold the adapter into the weights (base speed; ``save_pretrained`` then writes it whole)."""
        self.model.merge_adapter()
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "FoundationPipeline":
        """Move the model to ``device`` and/or cast its weights to ``dtype``; inputs follow."""
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype) if isinstance(dtype, str) else dtype  # "bfloat16"
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch dtype (e.g. torch.bfloat16), got {dtype!r}")
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pixel_mean.dtype

    def _pixels(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Any supported image input(s) -> float [B, 3, S, S] in [0, 1] at the model's size,
        through the same preprocessing as training (``multimodal.preprocess``)."""
        size = self.model.config.image.image_size
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] and tuple(images.shape[1:]) == (3, size, size):
            if not images.is_floating_point() or not bool(((images >= 0) & (images <= 1)).all()):  # also NaN
                raise ValueError(f"images: a tensor batch must be float in [0, 1], got {images.dtype}")
            return images.detach().to(self.device, self.dtype)  # already a batch at the model's size
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("images must not be empty")
        return torch.stack([preprocess(as_pil(item), size) for item in items]).to(self.device, self.dtype)

    @torch.no_grad()
    def embed_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings [B, E] in the shared space."""
        texts = texts_arg(texts)
        self._require("text")
        return check_finite(self.model.encode_text(texts).float(), "text embeddings")

    @torch.no_grad()
    def embed_image(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalized image embeddings [B, E] in the shared space."""
        self._require("image")
        return check_finite(self.model.encode_image(self._pixels(images)).float(), "image embeddings")

    @torch.no_grad()
    def classify(
        self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str], templates: Sequence[str] = ("{}",)
    ) -> torch.Tensor:
        """Zero-shot class probabilities [B, len(labels)]; each label's embedding is the mean
        over ``templates`` (a prompt ensemble, e.g. ``("a {}", "a picture of a {}")``)."""
        if isinstance(labels, str) or not labels or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"labels must be a non-empty list of strings, got {labels!r}")
        if twice := sorted({x for x in labels if list(labels).count(x) > 1}):
            raise ValueError(f"labels: {', '.join(map(repr, twice))} given more than once (the probability would be split between copies)")
        templates = check_templates(templates)
        self._require("text", "image")
        if unseen := self.unseen_words([t.format(label) for t in templates for label in labels]):
            warnings.warn(unseen_message(unseen), UnseenWordsWarning, stacklevel=2)
        classes = zero_shot_weights(self.model, class_prompts(labels, templates))
        logits = self.model.encoders.logit_scale.exp() * self.embed_image(images) @ classes.T
        return check_finite(logits.softmax(dim=-1), "class probabilities")

    def classify_few_shot(
        self, images: ImageInput | Sequence[ImageInput], support: Sequence[ImageInput], support_labels: Sequence[int],
    ) -> torch.Tensor:
        """Few-shot class scores [B, C]: cosine similarity to each class's prototype (the mean
        embedding of its labeled ``support`` images; labels are 0..C-1), no training."""
        if len(support) != len(support_labels) or not len(support):
            raise ValueError(f"support and support_labels must be non-empty and as long as each other, got {len(support)} and {len(support_labels)}")
        labels = torch.tensor(list(support_labels))
        protos = prototypes(self.embed_image(list(support)).float().cpu(), labels, int(labels.max()) + 1)
        return self.embed_image(images).float().cpu() @ protos.T

    # ---- language head ---------------------------------------------------------------------
    def _language(self, *inputs: str) -> FoundationModel:
        self.model.require("language")
        self._require(*inputs, "language")
        return self.model

    def _generate(
        self, prompts: list[list[int]], image_states: torch.Tensor | None, args: GenerationArgs,
        generator: torch.Generator | None,
    ) -> list[str]:
        model, tok = self._language(), self.model.tokenizer

        def step_logits(tokens, start, cache, rows):
            context = image_states[rows] if image_states is not None else None
            return model.language_logits(tokens, context, cache, start, last_only=True)

        new = generate_tokens(
            step_logits, prompts, args, tok.eot_token_id, self.model.config.text.context_length, generator, self.device
        )
        return [tok.decode(t) for t in new]

    @torch.no_grad()
    def caption(
        self, images: ImageInput | Sequence[ImageInput], generator: torch.Generator | None = None, **options: Any
    ) -> list[str]:
        """One caption per image. ``options`` are ``GenerationArgs`` fields: greedy by default
        (``max_new_tokens=16``), beam search with ``num_beams > 1``, sampling with
        ``do_sample=True`` and ``temperature`` / ``top_k`` / ``top_p`` (seeded by ``generator``),
        ``min_new_tokens``, ``use_cache=False`` for the reference path without the KV cache."""
        args = GenerationArgs.from_options(options)
        self._language("text", "image")  # the head reads the text tower's states too
        states = self.model.image_tokens(self._pixels(images))  # [B, 1 + N, Wi]
        return self._generate([[self.model.tokenizer.sot_token_id]] * states.shape[0], states, args, generator)

    @torch.no_grad()
    def complete(
        self,
        texts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | None = None,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> list[str]:
        """Each text continued (returned whole: prompt + continuation); text-only, or about
        ``images`` (one per text) when given. ``options`` as for ``caption``."""
        args = GenerationArgs.from_options(options)
        texts = texts_arg(texts)  # (images alone: caption())
        self._language("text", *(["image"] if images is not None else []))
        states = None
        if images is not None:
            states = self.model.image_tokens(self._pixels(images))
            if states.shape[0] != len(texts):
                raise ValueError(f"images: need one image per text ({len(texts)}), got {states.shape[0]}")
        self.check_prompts(texts)
        room = self.model.config.text.context_length - 2
        too_long = [t for t, over in zip(texts, self.model.tokenizer.overflows(texts)) if over]
        if too_long:
            raise ValueError(f"texts: {too_long[0][:60]!r} is longer than the model's context ({room} tokens): shorten it")
        prompts = [self._prompt_ids(t) for t in texts]
        new = self._generate(prompts, states, args, generator)
        out = Completions(f"{t} {n}".strip() if n else t for t, n in zip(texts, new))
        out.unseen_words = self.unseen_words(texts)
        return out

    def _prompt_ids(self, text: str) -> list[int]:
        """Start-of-text + the text's tokens, without end-of-text (so it can go on)."""
        ids = self.model.tokenizer([text])[0].tolist()
        return ids[: ids.index(self.model.tokenizer.eot_token_id)]

    @torch.no_grad()
    def score(self, image: ImageInput | None, texts: str | Sequence[str]) -> torch.Tensor:
        """Log-likelihood [T] of each text (its tokens and end-of-text) given ``image``, or
        text-only with ``image=None``. argmax over class prompts is a second zero-shot
        classifier, next to ``classify``."""
        texts = texts_arg(texts)
        model = self._language("text", *(["image"] if image is not None else []))
        tokens = model.tokenize(texts)  # [T, L]
        states = None
        if image is not None:
            states = model.image_tokens(self._pixels(image))
            if states.shape[0] != 1:
                raise ValueError(f"image: score takes one image, got {states.shape[0]}")
            states = states.expand(len(texts), -1, -1)
        return check_finite(token_log_likelihood(model.language_logits(tokens[:, :-1], states), tokens), "text scores")  # [T]

    @torch.no_grad()
    def retrieve(self, query: str, images: Sequence[ImageInput], top_k: int = 5) -> list[tuple[int, float]]:
        """Indices and cosine similarities of the ``top_k`` images closest to ``query``."""
        if not is_int(top_k) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        sims = (self.embed_image(images) @ self.embed_text(query).T).squeeze(1)
        values, indices = sims.topk(min(top_k, sims.numel()))
        return [(int(i), float(v)) for i, v in zip(indices, values)]
