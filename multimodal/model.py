"""``FoundationModel``: the shared encoders, the diffusion decoder and the language head, with a
``forward`` that computes what every loss needs (``multimodal.losses``), the decoder's
conditioning (classifier-free-guidance dropout included), safetensors persistence and open_clip
import."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from diffusion.decoder import Decoder, TextCondition
from diffusion.schedule import make_objective
from encoders.blocks import KVCache
from encoders.dual import DualEncoder
from encoders.tokenizer import Tokenizer

from . import lora
from .config import AdapterConfig, FoundationConfig, merge_dicts
from .folders import load_vae, load_weights, write_folder
from .files import CARD_NAME, CONFIG_NAME, DECODER_DIR, PICKLE_SUFFIXES, SCHEDULER_DIR, VAE_DIR, WEIGHTS_NAME
from .knowledge import load_vocabulary, save_vocabulary
from .language import LanguageHead

# What ``forward`` can compute, by the loss that consumes it.
HEADS = ("contrastive", "caption", "diffusion")


# The heads a model may have besides its two encoders (``components`` of ``from_pretrained``).
OPTIONAL_HEADS = ("decoder", "language")
# the logit of a token outside a compact vocabulary: probability 0 in any dtype, yet finite (scores stay numbers)
OUTSIDE_VOCABULARY_LOGIT = -1e4


class FoundationModel(nn.Module):
    def __init__(self, config: FoundationConfig, components: Iterable[str] | None = None):
        """``components``: which of the config's optional heads to build (``decoder``,
        ``language``; None: all). A head left out is not built (nor diffusers imported for it):
        the model answers for what it has and refuses to save (``skipped`` names the rest)."""
        super().__init__()
        self.config = config
        if components is not None and (isinstance(components, (str, dict)) or not isinstance(components, Iterable)):
            raise ValueError(f"components must be a list of heads among {OPTIONAL_HEADS}, got {components!r}")
        wanted = set(OPTIONAL_HEADS if components is None else components)
        if not wanted <= set(OPTIONAL_HEADS):
            raise ValueError(f"components must be among {OPTIONAL_HEADS}, got {sorted(wanted - set(OPTIONAL_HEADS))}")
        self.skipped = tuple(h for h in OPTIONAL_HEADS if getattr(config, h) is not None and h not in wanted)
        self.encoders = DualEncoder(config)
        self.decoder = None
        if config.decoder is not None and "decoder" in wanted:  # a latent decoder loads its frozen VAE from the folder named
            vae = load_vae(config.decoder.vae) if config.decoder.vae is not None else None
            self.decoder = Decoder(config.decoder, config.text.width, config.embed_dim, config.attention_backend, vae)
        self.language = (
            LanguageHead(config.language, config.text.width, config.image.width, config.attention_backend)
            if config.language is not None and "language" in wanted
            else None
        )
        self.tokenizer = Tokenizer(config.text.context_length)
        self.adapter: AdapterConfig | None = None  # set while a LoRA adapter is injected (multimodal.lora)
        # token ids of the training captions (multimodal.knowledge); None: unknown
        self.vocabulary: frozenset[int] | None = None
        self.name_or_path: str | None = None
        self.register_buffer("pixel_mean", torch.tensor(config.image.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.image.std).view(1, -1, 1, 1), persistent=False)
        self.objective = make_objective(config.decoder) if self.decoder is not None else None
        self.set_grad_checkpointing(config.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass, in every component (memory for compute)."""
        self.encoders.set_grad_checkpointing(enable)
        for part in (self.decoder, self.language):
            if part is not None:
                part.set_grad_checkpointing(enable)

    def require(self, head: str) -> None:
        """Raise a ValueError saying why ``head`` (``decoder`` / ``language``) is not here."""
        if getattr(self, head) is None:
            what = {"decoder": "diffusion decoder", "language": "language head"}[head]
            raise ValueError(f"this model was loaded without its {what} (components=...): load it with {head!r} among the components"
                             if head in self.skipped else f"this model has no {what} (config.{head} is None)")

    # ---- training forward ----------------------------------------------------------------------
    def forward(
        self,
        batch: dict[str, Any],
        heads: tuple[str, ...] = ("contrastive",),
        denoise_batch: int | None = None,
        denoise_text_grad: bool = True,
    ) -> dict[str, torch.Tensor]:
        """What the losses of ``heads`` need, from one pass of the shared text encoder.

        ``batch``: ``image`` [B, C, S, S] in [0, 1] and ``caption`` (B texts, or token ids [B, L]).
        Returns ``image_features`` / ``text_features`` [B, E] (unit norm) and ``logit_scale``
        (contrastive); ``caption_logits`` [T, V] and ``caption_targets`` [T] over the captions'
        real next tokens (caption); ``denoise_pred`` / ``denoise_target`` [n, C, S', S'] and
        ``denoise_weight`` [n] for the first ``denoise_batch`` samples (diffusion), conditioned
        with classifier-free-guidance dropout. A component whose parameters are all frozen runs
        without building a graph; ``denoise_text_grad=False`` keeps the denoising loss off the
        text encoder. With ``language.vocabulary: compact`` the caption logits are [T, K] over the
        model's vocabulary ids and this batch's (``caption_logits``), the targets index them.
        """
        if isinstance(heads, str):
            heads = (heads,)
        unknown = sorted(set(heads) - set(HEADS))
        if unknown:
            raise ValueError(f"heads must be among {HEADS}, got {unknown}")
        images = batch["image"]  # [B, C, S, S]
        captions = batch["caption"]
        tokens = captions if isinstance(captions, torch.Tensor) else self.tokenize(captions)  # [B, L]
        out: dict[str, torch.Tensor] = {}
        text_grad = torch.is_grad_enabled() and _trains(self.encoders.text)
        with torch.set_grad_enabled(text_grad):
            # full length when the decoder needs states (conditional and empty prompts line up)
            text_states, text_pooled = self.encoders.text(tokens, trim=False if "diffusion" in heads else None)
        if "contrastive" in heads or "caption" in heads:
            with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(self.encoders.image)):
                image_states, image_pooled = self.encoders.image(self.normalize_pixels(images))  # [B, 1+N, Wi], [B, E]
        if "contrastive" in heads:
            out["image_features"] = F.normalize(image_pooled, dim=-1)
            out["text_features"] = F.normalize(text_pooled, dim=-1)
            out["logit_scale"] = self.encoders.logit_scale.exp()
        if "caption" in heads:
            out["caption_logits"], out["caption_targets"] = self.caption_logits(
                text_states, tokens[:, : text_states.shape[1]], image_states)
        if "diffusion" in heads:
            n = min(images.shape[0], denoise_batch or images.shape[0])
            states, pooled = text_states[:n], text_pooled[:n]
            grad = text_grad and denoise_text_grad
            if not grad:
                states, pooled = states.detach(), pooled.detach()
            cond = self.condition(states, pooled, drop_prob=self.config.decoder.cfg_dropout, grad=grad)
            out.update(self.denoise(images[:n], cond))
        return out

    def caption_logits(self, text_states: torch.Tensor, tokens: torch.Tensor, image_states: torch.Tensor,
                       caption_vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [T, V] and targets [T] at the captions' real tokens (no padding); a
        ``text_only_prob`` share of captions is read without its image. A compact vocabulary: logits
        [T, K] over ``caption_vocab`` (default: the batch's and the model's ids), targets index it."""
        # text_states [B, L, W], tokens [B, L], image_states [B, M, Wi]
        self.require("language")
        target, real = tokens[:, 1:], tokens[:, 1:] != 0  # [B, L-1]: token i+1 is predicted at position i; padding
        weight = self.encoders.text.token_embedding.weight  # [V, W], tied
        if self.config.language.vocabulary == "compact":
            ids = caption_vocab
            if ids is None:
                ids = torch.cat([tokens.flatten(), self._vocabulary_ids(tokens.device, default=tokens[:0, 0])]).unique()
            ok = (isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point() and len(ids) > 0
                  and 0 <= int(ids[0]) and int(ids[-1]) < weight.shape[0] and bool((ids[1:] > ids[:-1]).all()))
            position = torch.searchsorted(ids, target.contiguous()).clamp(max=len(ids) - 1) if ok else None
            if not ok or not torch.equal(ids[position[real]], target[real]):
                raise ValueError(f"caption_vocab must be sorted unique token ids in [0, {weight.shape[0]}) holding every caption token")
            weight, target = weight[ids], position  # [K, W], [B, L-1]
        with_image = torch.rand(tokens.shape[0], device=tokens.device) >= self.config.language.text_only_prob
        logits, targets = [], []
        for rows, context in ((with_image, image_states), (~with_image, None)):
            if rows.any():
                hidden = self.language(text_states[rows][:, :-1], context[rows] if context is not None else None)
                logits.append(hidden[real[rows]] @ weight.to(hidden.dtype).t())  # [T_rows, V or K]
                targets.append(target[rows][real[rows]])
        return torch.cat(logits), torch.cat(targets)

    def condition(self, states: torch.Tensor, pooled: torch.Tensor, drop_prob: float | None = None, grad: bool = False) -> TextCondition:
        """The decoder's condition from text states [B, L, W] and pooled embeddings [B, E];
        with ``drop_prob`` each sample is replaced by the empty prompt's condition with that
        probability (classifier-free-guidance dropout: the unconditional model is learned too)."""
        cond = TextCondition(states, F.normalize(pooled, dim=-1))
        if drop_prob is not None:  # training: drawn even at 0, so the random stream does not depend on it
            drop = torch.rand(states.shape[0], device=states.device) < drop_prob  # [B]
            if drop.any():
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                    empty = self.text_condition([""])  # batch 1
                cond = cond.where(drop, empty)
        return cond

    def denoise(self, images: torch.Tensor, cond: TextCondition) -> dict[str, torch.Tensor]:
        """One draw of the denoising objective on clean ``images`` [n, C, S, S] in [0, 1] (VAE latents if any)."""
        self.require("decoder")
        size = self.config.decoder.image_size
        if images.shape[-1] != size:  # e.g. a 224-pixel image tower beside a 64-pixel decoder
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(0, 1)
        task = self.objective.draw(self.decoder.to_latents(images * 2 - 1))  # [n, C', S', S']
        pred = self.decoder(task.noisy, task.timesteps, cond)  # [n, C', S', S']
        return {"denoise_pred": pred, "denoise_target": task.target, "denoise_weight": task.weight}

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
        return self.condition(states, pooled)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], [B, C, S, S] -> image token states [B, 1 + N, Wi] (the language head's context)."""
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
        self.require("language")
        hidden = self.language(self.encoders.text.token_states(tokens, cache, start), image_states, cache)  # [B, N, W]
        return self.lm_logits(hidden[:, -1] if last_only else hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """States [..., W] -> logits [..., V] (tied embedding); compact: only its ids' (the rest never trained: p = 0)."""
        weight = self.encoders.text.token_embedding.weight  # [V, W]
        if self.config.language.vocabulary != "compact":
            return hidden @ weight.to(hidden.dtype).t()
        if (ids := self._vocabulary_ids(hidden.device)) is None:
            raise ValueError("language.vocabulary is compact, but the model has no vocabulary.json naming its token ids")
        logits = hidden.new_full((*hidden.shape[:-1], weight.shape[0]), OUTSIDE_VOCABULARY_LOGIT)
        logits[..., ids] = hidden @ weight[ids].to(hidden.dtype).t()  # [..., K] into [..., V]
        return logits

    def _vocabulary_ids(self, device: torch.device, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """The model's vocabulary as sorted ids [K] on ``device`` (cached; ``default`` when unknown)."""
        if self.vocabulary is None:
            return default
        if getattr(self, "_ids_of", None) is not self.vocabulary or self._ids.device != torch.device(device):
            self._ids_of, self._ids = self.vocabulary, torch.tensor(sorted(self.vocabulary), dtype=torch.long, device=device)
        return self._ids

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pixels in [0, 1], [B, C, S, S] -> embeddings [B, E] in the shared space."""
        self.encoders.image.check_images(images)
        return self.encoders.encode_image(self.normalize_pixels(images), normalize=normalize)

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | Path, model_card: str | None = None, dtype: torch.dtype | None = None, overwrite: bool = False,
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``README.md`` (a model card: the one
        given, else a default one in Hugging Face's format); ``dtype``
        (e.g. ``torch.float16``) stores floating-point weights in that type (half the size);
        ``from_pretrained`` loads them back into the model's own dtype. A non-empty
        ``directory`` is replaced (as a whole, atomically) only with ``overwrite=True``."""
        if self.skipped:
            raise ValueError(f"this model was loaded without its {' and '.join(self.skipped)}: saving it would lose "
                             f"{'them' if len(self.skipped) > 1 else 'it'}; "
                             "load it whole (components=None) to save it")
        if self.adapter is not None:
            raise ValueError(
                "this model has a LoRA adapter: save_adapter() writes the adapter alone; merge_adapter() "
                "(fold it in) or unload_adapter() (drop it) before save_pretrained()"
            )
        if model_card is None:
            from .card import model_card as default_card

            model_card = default_card(self.config)

        def write(folder: Path) -> None:
            config = self.config
            if config.decoder is not None and config.decoder.vae is not None:  # the VAE travels with the model
                self.decoder.vae.save_pretrained(str(folder / VAE_DIR), safe_serialization=True)
                config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, vae=VAE_DIR))
            config.save(folder / CONFIG_NAME)
            cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
            state = {k: cast(v.detach()).contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
            (folder / CARD_NAME).write_text(model_card)
            if self.vocabulary is not None:
                save_vocabulary(folder, self.vocabulary)
            if self.decoder is not None:  # also in diffusers' own format, for diffusers users
                self.decoder.save_diffusers(folder / DECODER_DIR, dtype=dtype)
                from diffusion.schedule import sampling_scheduler

                sampling_scheduler(self.config.sampling.scheduler, self.config.decoder).save_pretrained(str(folder / SCHEDULER_DIR))

        return write_folder(directory, write, overwrite, what="directory")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        components: Iterable[str] | None = None) -> "FoundationModel":
        """Load a ``save_pretrained`` folder. Only safetensors are read; pickle files are refused.
        ``components``: the optional heads to load (``decoder``, ``language``; None: all), e.g.
        none for zero-shot classification: the others are not built (their weights are read with
        the file, and left)."""
        directory = Path(directory)
        if directory.is_file():
            kind = "pickle-based" if directory.suffix in PICKLE_SUFFIXES else "a file"
            raise ValueError(
                f"from_pretrained expects a folder with {CONFIG_NAME} and {WEIGHTS_NAME}; {directory} is {kind}. "
                "Lightning .ckpt files are for resuming: turn one into a folder with `multimodal export`."
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"model folder not found: {directory}")
        if not (directory / WEIGHTS_NAME).is_file():
            found = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            extra = f" (found {found}; pickle files are never loaded)" if found else ""
            raise ValueError(f"{directory} has no {WEIGHTS_NAME}{extra}")
        config = FoundationConfig.load(directory / CONFIG_NAME)
        if config.decoder is not None and config.decoder.vae is not None:  # only the copy saved beside the weights
            vae = (directory / config.decoder.vae).resolve()
            if Path(config.decoder.vae).is_absolute() or not vae.is_relative_to(directory.resolve()):
                raise ValueError(f"{directory / CONFIG_NAME}: decoder.vae must name a folder inside the model folder "
                                 f"(saved models use {VAE_DIR!r}), got {config.decoder.vae!r}")
            config.decoder.vae = str(vae)
        model = cls(config, components)
        state = load_weights(directory / WEIGHTS_NAME)
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in model.skipped}
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            show = lambda names: ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")  # noqa: E731
            raise ValueError(
                f"{directory}: {WEIGHTS_NAME} does not match {CONFIG_NAME} (missing: {show(missing) or 'none'}; "
                f"unexpected: {show(unexpected) or 'none'})"
            )
        model.load_state_dict(state, strict=True)
        model.vocabulary = load_vocabulary(directory, config.text.vocab_size)
        model.name_or_path = str(directory)  # where it came from (messages name it)
        return model.to(map_location).eval()

    # ---- LoRA adapters (multimodal.lora) ---------------------------------------------------------
    def add_adapter(self, config: AdapterConfig) -> "FoundationModel":
        """Inject fresh LoRA layers into ``config.components`` (outputs unchanged until trained)."""
        lora.add_adapter(self, config)
        return self

    def load_adapter(self, directory: str | Path) -> "FoundationModel":
        """Inject a saved adapter (``save_adapter`` folder) into this model; the words its
        training captions taught join the model's vocabulary until it is unloaded."""
        lora.load_adapter(self, directory)
        taught = load_vocabulary(directory)
        self._base_vocabulary = self.vocabulary
        if taught is not None and self.vocabulary is not None:
            self.vocabulary = self.vocabulary | taught
        return self

    def save_adapter(self, directory: str | Path, base_model: str | Path | None = None, card: str | None = None,
                     overwrite: bool = False) -> Path:
        """Write the adapter weights alone, with a reference to ``base_model`` (a folder), and
        the vocabulary (base + adapter training captions); a non-empty ``directory`` is
        replaced only with ``overwrite=True``."""
        vocabulary = self.vocabulary
        extra = (lambda folder: save_vocabulary(folder, vocabulary)) if vocabulary is not None else None
        return lora.save_adapter(self, directory, base_model, card, overwrite, extra)

    def merge_adapter(self) -> "FoundationModel":
        """Fold the adapter into the weights: a plain model again (``save_pretrained`` works)."""
        lora.merge_adapter(self)
        return self

    def unload_adapter(self) -> "FoundationModel":
        """Remove the adapter without merging: the base weights, bit for bit."""
        lora.unload_adapter(self)
        self.vocabulary = getattr(self, "_base_vocabulary", self.vocabulary)
        return self

    @classmethod
    def from_open_clip(
        cls, model_name: str | dict[str, Any], pretrained: str | None = None, **config_overrides: Any
    ) -> "FoundationModel":
        """Shared encoders from an open_clip ViT CLIP: a model name or config dict, and weights
        from a local ``.safetensors``/``.pt`` file or an open_clip pretrained tag (needs internet).
        ``config_overrides`` are nested ``FoundationConfig`` fields (``decoder={...}``,
        ``text={"trim_padding": False}``); unknown keys are an error naming them."""
        from encoders.open_clip_import import open_clip_encoder_source

        fields, state = open_clip_encoder_source(model_name, pretrained)
        model = cls(FoundationConfig.from_dict(merge_dicts(fields, config_overrides)))
        if state is not None:
            result = model.encoders.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"open_clip weights do not match the architecture: missing {result.missing_keys}, "
                                 f"unexpected {result.unexpected_keys}")
        return model


def _trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is trained (a frozen one needs no autograd graph)."""
    return any(p.requires_grad for p in module.parameters())
