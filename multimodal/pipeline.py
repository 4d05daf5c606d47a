"""``FoundationPipeline``: the Python API (embedding, zero-shot classification, retrieval)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from .model import FoundationModel

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, Path]


class FoundationPipeline:
    def __init__(self, model: FoundationModel):
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "FoundationPipeline":
        return cls(FoundationModel.from_pretrained(directory)).to(device)

    def save_pretrained(self, directory: str | Path) -> Path:
        return self.model.save_pretrained(directory)

    def to(self, device: str | torch.device) -> "FoundationPipeline":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    def _pixels(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Any supported image input(s) -> float [B, 3, S, S] in [0, 1] at the model's size."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("images must not be empty")
        size = self.model.config.image.image_size
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
        return torch.stack(out).float().div(255).to(self.device)

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
