"""``FoundationModel``: the shared encoders (and, as they land, the decoder and language head),
with safetensors persistence and open_clip import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion.decoder import Decoder, TextCondition
from encoders.blocks import KVCache
from encoders.dual import DualEncoder
from encoders.tokenizer import Tokenizer

from .config import FoundationConfig
from .language import LanguageHead
from . import lora
from .lora import AdapterConfig

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, DECODER_DIR = "config.json", "model.safetensors", "README.md", "decoder"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class FoundationModel(nn.Module):
    def __init__(self, config: FoundationConfig):
        super().__init__()
        self.config = config
        self.encoders = DualEncoder(config)
        self.decoder = (
            Decoder(config.decoder, config.text.width, config.embed_dim, config.attention_backend) if config.decoder is not None else None
        )
        self.language = (
            LanguageHead(config.language, config.text.width, config.image.width, config.attention_backend)
            if config.language is not None
            else None
        )
        self.tokenizer = Tokenizer(config.text.context_length)
        self.adapter: AdapterConfig | None = None  # set while a LoRA adapter is injected (multimodal.lora)
        self.register_buffer("pixel_mean", torch.tensor(config.image.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.image.std).view(1, -1, 1, 1), persistent=False)

    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], [B, C, S, S] -> the normalized input the image encoder expects."""
        return (images - self.pixel_mean) / self.pixel_std

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.pixel_mean.device)

    def encode_text(self, texts: str | list[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Texts (or token ids [B, L]) -> embeddings [B, E] in the shared space."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.encoders.encode_text(tokens, normalize=normalize)

    def text_condition(self, texts: str | list[str] | torch.Tensor) -> TextCondition:
        """What the decoder is conditioned on: full-length token states [B, context_length, W]
        (full length, so conditional and empty-prompt states always line up) and unit text
        embeddings [B, E] — from one pass of the shared text encoder."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        states, pooled = self.encoders.text(tokens, trim=False)
        return TextCondition(states, torch.nn.functional.normalize(pooled, dim=-1))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], [B, C, S, S] -> the image encoder's token states [B, 1 + N, Wi]
        (what the language head cross-attends to)."""
        self.encoders.image.check_images(images)
        return self.encoders.image(self.normalize_pixels(images))[0]

    def language_logits(
        self,
        tokens: torch.Tensor,
        image_states: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Next-token logits [B, N, V] (``last_only``: [B, V]) for tokens [B, N] at positions
        start .. start + N - 1: shared text encoder, then the language head (cross-attending to
        ``image_states`` when given), then the tied token embedding."""
        if self.language is None:
            raise ValueError("this model has no language head (config.language is None)")
        hidden = self.language(self.encoders.text.token_states(tokens, cache, start), image_states, cache)  # [B, N, W]
        return self.lm_logits(hidden[:, -1] if last_only else hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Language-head states [..., W] -> logits [..., V] through the tied token embedding."""
        return hidden @ self.encoders.text.token_embedding.weight.to(hidden.dtype).t()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pixels in [0, 1], [B, C, S, S] -> embeddings [B, E] in the shared space."""
        self.encoders.image.check_images(images)
        return self.encoders.encode_image(self.normalize_pixels(images), normalize=normalize)

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, model_card: str | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``README.md`` (a model card: the one
        given, else a default one in Hugging Face's format); ``dtype``
        (e.g. ``torch.float16``) stores floating-point weights in that type (half the size);
        ``from_pretrained`` loads them back into the model's own dtype."""
        if self.adapter is not None:
            raise ValueError(
                "this model has a LoRA adapter: save_adapter() writes the adapter alone; merge_adapter() "
                "(fold it in) or unload_adapter() (drop it) before save_pretrained()"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
        state = {k: cast(v.detach()).contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if model_card is None:
            from .card import model_card as default_card

            model_card = default_card(self.config)
        (directory / CARD_NAME).write_text(model_card)
        if self.decoder is not None:  # also in diffusers' own format, for diffusers users
            self.decoder.save_diffusers(directory / DECODER_DIR, dtype=dtype)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "FoundationModel":
        """Load a ``save_pretrained`` folder. Only safetensors are read; pickle files are refused."""
        directory = Path(directory)
        if directory.is_file():
            kind = "pickle-based" if directory.suffix in _PICKLE_SUFFIXES else "a file"
            raise ValueError(
                f"from_pretrained expects a folder with {CONFIG_NAME} and {WEIGHTS_NAME}; {directory} is {kind}. "
                "Lightning .ckpt files are for resuming: turn one into a folder with `multimodal export`."
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"model folder not found: {directory}")
        if not (directory / WEIGHTS_NAME).is_file():
            found = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            extra = f" (found {found}; pickle files are never loaded)" if found else ""
            raise ValueError(f"{directory} has no {WEIGHTS_NAME}{extra}")
        model = cls(FoundationConfig.load(directory / CONFIG_NAME))
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            show = lambda names: ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")  # noqa: E731
            raise ValueError(
                f"{directory}: {WEIGHTS_NAME} does not match {CONFIG_NAME} (missing: {show(missing) or 'none'}; "
                f"unexpected: {show(unexpected) or 'none'})"
            )
        model.load_state_dict(state, strict=True)
        return model.eval()

    # ---- LoRA adapters (multimodal.lora) ---------------------------------------------------------
    def add_adapter(self, config: AdapterConfig) -> "FoundationModel":
        """Inject fresh LoRA layers into ``config.components`` (outputs unchanged until trained)."""
        lora.add_adapter(self, config)
        return self

    def load_adapter(self, directory: str | Path) -> "FoundationModel":
        """Inject a saved adapter (``save_adapter`` folder) into this model."""
        lora.load_adapter(self, directory)
        return self

    def save_adapter(self, directory: str | Path, base_model: str | Path | None = None, card: str | None = None) -> Path:
        """Write the adapter weights alone, with a reference to ``base_model`` (a folder)."""
        return lora.save_adapter(self, directory, base_model, card)

    def merge_adapter(self) -> "FoundationModel":
        """Fold the adapter into the weights: a plain model again (``save_pretrained`` works)."""
        lora.merge_adapter(self)
        return self

    def unload_adapter(self) -> "FoundationModel":
        """Remove the adapter without merging: the base weights, bit for bit."""
        lora.unload_adapter(self)
        return self

    @classmethod
    def from_open_clip(
        cls, model_name: str | dict[str, Any], pretrained: str | None = None, **config_overrides: Any
    ) -> "FoundationModel":
        """Shared encoders from an open_clip ViT CLIP: a model name or config dict, and weights
        from a local ``.safetensors``/``.pt`` file or an open_clip pretrained tag (needs internet)."""
        from encoders.open_clip_import import dual_encoder_from_open_clip

        encoders = dual_encoder_from_open_clip(model_name, pretrained)
        fields = {**encoders.config.__dict__, **config_overrides}
        model = cls(FoundationConfig(**fields))
        model.encoders.load_state_dict(encoders.state_dict())
        return model
