"""``FoundationPipeline``: the Python API (generation, embedding, zero-shot classification, retrieval)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import re
import warnings

import numpy as np
import torch
from PIL import Image

from diffusion.sampling import sample
from diffusion.schedule import sampling_scheduler

from .language import GenerationArgs, generate_tokens
from .model import FoundationModel

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, Path]


@dataclass
class GenerationOutput:
    """``images``: list of PIL images, a numpy array [N, S, S, C] in [0, 1], or a tensor
    [N, C, S, S] in [0, 1], by ``output_type``; ``flagged``: per image, whether the output
    checker flagged it (flagged images are blacked out); None without a checker."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    flagged: list[bool] | None = None


OUTPUT_TYPES = ("pil", "np", "pt")
PromptFilter = Union[Sequence[str], Callable[[str], Union[bool, str]]]
OutputChecker = Callable[[torch.Tensor], Sequence[bool]]


class PromptBlocked(ValueError):
    """A prompt refused by the pipeline's prompt filter."""


class FoundationPipeline:
    """Args:
        model: a ``FoundationModel``.
        scheduler: default sampling scheduler (``ddim``, ``dpm++``, ``euler``, ...).
        prompt_filter: refuses prompts (generation and completion): a word list (whole words,
            any case) or a callable returning True or a reason (str) for a prompt to refuse.
        output_checker: a callable over generated images [N, C, S, S] in [0, 1] returning one
            bool per image; flagged images are blacked out and reported in ``flagged``.
    Generating with neither warns once per pipeline.
    """

    def __init__(
        self, model: FoundationModel, scheduler: str = "ddim",
        prompt_filter: PromptFilter | None = None, output_checker: OutputChecker | None = None,
    ):
        self.model = model.eval()
        self.scheduler = scheduler
        if prompt_filter is not None and not callable(prompt_filter):
            words = [w.strip().lower() for w in prompt_filter if w.strip()]
            if not words:
                raise ValueError("prompt_filter: the word list is empty")
            pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
            prompt_filter = lambda text: (m := pattern.search(text)) is not None and f"word list: {m.group(0)!r}"  # noqa: E731
        self.prompt_filter, self.output_checker = prompt_filter, output_checker
        self._warned_unfiltered = False

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``PromptBlocked`` naming the filter (and its reason) for a refused prompt."""
        if self.prompt_filter is None:
            return
        for prompt in prompts:
            verdict = self.prompt_filter(prompt)
            if verdict:
                reason = verdict if isinstance(verdict, str) else getattr(self.prompt_filter, "__name__", "callable")
                raise PromptBlocked(f"prompt refused by the prompt filter ({reason}): {prompt!r}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
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

        ``generator``: one generator (images draw their starting noise from it in order) or one
        per image; with one per image, a batch gives the same images as one call per image.
        ``negative_prompt`` replaces the empty prompt as the unconditional branch.
        """
        decoder = self.model.decoder
        if decoder is None:
            raise ValueError("this model has no diffusion decoder (config.decoder is None)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a non-empty string or list of strings")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        size = decoder.config.image_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != size:
                raise ValueError(f"{name} must be {size} (the decoder's image_size), got {value}")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)  # default: the empty prompt
        else:
            negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt must be a string or a list as long as prompt ({len(prompts)}), got {len(negatives)}")
        n = len(prompts) * num_images_per_prompt
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"generator list must have one generator per image ({n}), got {len(generator)}")
            generators = list(generator)
        else:
            generators = [generator] * n
        self.check_prompts(prompts)
        if self.prompt_filter is None and self.output_checker is None and not self._warned_unfiltered:
            self._warned_unfiltered = True
            warnings.warn(
                "generating without a prompt filter or an output checker: pass prompt_filter= / "
                "output_checker= to FoundationPipeline to refuse or flag content", UserWarning, stacklevel=2,
            )
        repeat = lambda items: [x for x in items for _ in range(num_images_per_prompt)]  # noqa: E731
        cond = self.model.text_condition(repeat(prompts))
        uncond = self.model.text_condition(repeat(negatives))
        images = sample(
            decoder, sampling_scheduler(scheduler or self.scheduler, decoder.config), cond, uncond, generators,
            num_inference_steps, guidance_scale, show_progress, callback_on_step_end,
        )
        images = (images.float() + 1) / 2  # [N, C, S, S] in [0, 1]
        flagged = None
        if self.output_checker is not None:
            flagged = [bool(f) for f in self.output_checker(images.clamp(0, 1))]
            if len(flagged) != len(images):
                raise ValueError(f"output_checker returned {len(flagged)} verdicts for {len(images)} images")
            if any(flagged):
                warnings.warn(f"output checker flagged {sum(flagged)} of {len(flagged)} image(s); they are blacked out", UserWarning, stacklevel=2)
                images[torch.tensor(flagged)] = 0
        if output_type == "pt":
            return GenerationOutput(images.cpu(), flagged)
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return GenerationOutput(array, flagged)
        return GenerationOutput([Image.fromarray((a * 255).round().astype(np.uint8)) for a in array], flagged)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", scheduler: str = "ddim",
        dtype: torch.dtype | None = None, adapter: str | Path | None = None,
    ) -> "FoundationPipeline":
        """Load a ``save_pretrained`` folder (safetensors only: pickle files are refused) onto
        ``device``, optionally in ``dtype`` (e.g. ``torch.bfloat16`` on GPUs). ``directory`` may
        also be a LoRA adapter folder (its recorded base model is loaded under it), and
        ``adapter`` a LoRA adapter folder to load onto the model ``directory``."""
        from . import lora

        if lora.is_adapter_folder(directory) and adapter is None:
            directory, adapter = lora.resolve_base(directory), directory
        elif adapter is not None:
            lora.resolve_base(adapter, base=directory)  # the adapter must have been trained on this base
        model = FoundationModel.from_pretrained(directory)
        if adapter is not None:
            model.load_adapter(adapter)
        return cls(model, scheduler).to(device, dtype)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ the decoder in diffusers' format)."""
        return self.model.save_pretrained(directory)

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
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pixel_mean.dtype

    def _pixels(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Any supported image input(s) -> float [B, 3, S, S] in [0, 1] at the model's size."""
        size = self.model.config.image.image_size
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] and tuple(images.shape[1:]) == (3, size, size):
            return images.detach().float().clamp(0, 1).to(self.device, self.dtype)  # already a batch at the model's size
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("images must not be empty")
        out = []
        for item in items:
            if isinstance(item, (str, Path)):
                if not Path(item).is_file():
                    raise ValueError(f"images: file not found: {item}")
                item = Image.open(item)
            if isinstance(item, torch.Tensor):
                if item.dim() != 3 or item.shape[0] != 3:
                    raise ValueError(f"images: a tensor image must be [3, H, W] in [0, 1], got {tuple(item.shape)}")
                item = Image.fromarray((item.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
            elif isinstance(item, np.ndarray):
                if item.dtype != np.uint8:
                    item = (np.clip(item, 0, 1) * 255).round().astype(np.uint8)
                item = Image.fromarray(item)
            if not isinstance(item, Image.Image):
                raise ValueError(f"images: unsupported type {type(item).__name__} (PIL image, numpy array, tensor or path)")
            item = item.convert("RGB")
            if item.size != (size, size):
                item = item.resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(item).copy()).permute(2, 0, 1))
        return torch.stack(out).float().div(255).to(self.device, self.dtype)

    @torch.no_grad()
    def embed_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings [B, E] in the shared space."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts must not be empty")
        return self.model.encode_text(texts).float()

    @torch.no_grad()
    def embed_image(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalized image embeddings [B, E] in the shared space."""
        return self.model.encode_image(self._pixels(images)).float()

    @torch.no_grad()
    def classify(
        self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str], templates: Sequence[str] = ("{}",)
    ) -> torch.Tensor:
        """Zero-shot class probabilities [B, len(labels)]; each label's embedding is the mean
        over ``templates`` (a prompt ensemble, e.g. ``("a {}", "a picture of a {}")``)."""
        if not labels:
            raise ValueError("labels must not be empty")
        if not templates or not all("{}" in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings containing '{}'")
        classes = zero_shot_weights(self.model, [[t.format(label) for t in templates] for label in labels])
        logits = self.model.encoders.logit_scale.exp() * self.embed_image(images) @ classes.T
        return logits.softmax(dim=-1)

    def classify_few_shot(
        self, images: ImageInput | Sequence[ImageInput], support: Sequence[ImageInput], support_labels: Sequence[int],
    ) -> torch.Tensor:
        """Few-shot class scores [B, C]: cosine similarity to each class's prototype (the mean
        embedding of its labeled ``support`` images; labels are 0..C-1), no training."""
        from .adapt import prototypes

        if len(support) != len(support_labels) or not len(support):
            raise ValueError(f"support and support_labels must be non-empty and as long as each other, got {len(support)} and {len(support_labels)}")
        labels = torch.tensor(list(support_labels))
        protos = prototypes(self.embed_image(list(support)).float().cpu(), labels, int(labels.max()) + 1)
        return self.embed_image(images).float().cpu() @ protos.T

    # ---- language head ---------------------------------------------------------------------
    def _language(self) -> FoundationModel:
        if self.model.language is None:
            raise ValueError("this model has no language head (config.language is None)")
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
        args = GenerationArgs(**options)
        self._language()
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
        args = GenerationArgs(**options)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts must not be empty (pass images to caption() for image-only input)")
        self._language()
        states = None
        if images is not None:
            states = self.model.image_tokens(self._pixels(images))
            if states.shape[0] != len(texts):
                raise ValueError(f"images: need one image per text ({len(texts)}), got {states.shape[0]}")
        self.check_prompts(texts)
        prompts = [self._prompt_ids(t) for t in texts]
        new = self._generate(prompts, states, args, generator)
        return [f"{t} {n}".strip() if n else t for t, n in zip(texts, new)]

    def _prompt_ids(self, text: str) -> list[int]:
        """Start-of-text + the text's tokens, without end-of-text (so it can go on)."""
        ids = self.model.tokenizer([text])[0].tolist()
        return ids[: ids.index(self.model.tokenizer.eot_token_id)]

    @torch.no_grad()
    def score(self, image: ImageInput | None, texts: str | Sequence[str]) -> torch.Tensor:
        """Log-likelihood [T] of each text (its tokens and end-of-text) given ``image``, or
        text-only with ``image=None``. argmax over class prompts is a second zero-shot
        classifier, next to ``classify``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts must not be empty")
        model = self._language()
        tokens = model.tokenize(texts)  # [T, L]
        states = None
        if image is not None:
            states = model.image_tokens(self._pixels(image))
            if states.shape[0] != 1:
                raise ValueError(f"image: score takes one image, got {states.shape[0]}")
            states = states.expand(len(texts), -1, -1)
        logp = model.language_logits(tokens[:, :-1], states).float().log_softmax(-1)  # [T, L-1, V]
        target = tokens[:, 1:]
        token_logp = logp.gather(-1, target[..., None]).squeeze(-1)  # [T, L-1]
        return (token_logp * (target != 0)).sum(-1)

    @torch.no_grad()
    def retrieve(self, query: str, images: Sequence[ImageInput], top_k: int = 5) -> list[tuple[int, float]]:
        """Indices and cosine similarities of the ``top_k`` images closest to ``query``."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        sims = (self.embed_image(images) @ self.embed_text(query).T).squeeze(1)
        values, indices = sims.topk(min(top_k, sims.numel()))
        return [(int(i), float(v)) for i, v in zip(indices, values)]


@torch.no_grad()
def zero_shot_weights(model: FoundationModel, prompts: list[list[str]]) -> torch.Tensor:
    """Class embeddings [C, E] from a prompt ensemble per class (same count for every class):
    the normalized mean of the normalized prompt embeddings."""
    texts = [p for class_prompts in prompts for p in class_prompts]
    emb = model.encode_text(texts).float().view(len(prompts), len(prompts[0]), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)
