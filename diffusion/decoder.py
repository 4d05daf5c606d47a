"""The image decoder: a diffusers denoiser (``UNet2DConditionModel`` or SD3's
``SD3Transformer2DModel``) whose every attention runs through the project's core, optionally in
the latent space of a frozen diffusers VAE, plus its diffusers-format export."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .latent_cache import LatentCache
from .processor import CoreAttnProcessor

if TYPE_CHECKING:  # the config module imports nothing of ours: no cycle
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from multimodal.config import DecoderConfig


class TextCondition(NamedTuple):
    """What the decoder is conditioned on, for a batch of texts: the text encoder's full-length
    token states ``states`` [B, L, W] (cross- or joint attention) and the texts' unit embeddings
    in the shared space ``embeds`` [B, E] (added to the timestep embedding)."""

    states: torch.Tensor
    embeds: torch.Tensor

    def cat(self, other: "TextCondition") -> "TextCondition":
        return TextCondition(torch.cat([self.states, other.states]), torch.cat([self.embeds, other.embeds]))

    def where(self, mask: torch.Tensor, other: "TextCondition") -> "TextCondition":
        """Per sample: ``other`` where ``mask`` [B] is true (``other`` may have batch 1)."""
        return TextCondition(
            torch.where(mask[:, None, None], other.states.to(self.states.dtype), self.states),
            torch.where(mask[:, None], other.embeds.to(self.embeds.dtype), self.embeds),
        )


def build_unet(config: "DecoderConfig", cross_attention_dim: int, text_embed_dim: int | None, channels: int, size: int) -> UNet2DConditionModel:
    """The UNet denoiser over [B, channels, size, size] (pixels or latents)."""
    from diffusers import UNet2DConditionModel  # imported here: diffusers takes seconds to import

    widths = tuple(config.block_out_channels)
    if size % 2 ** (len(widths) - 1):
        raise ValueError(f"the denoiser's input size ({size}) must be divisible by the UNet's downsampling ({2 ** (len(widths) - 1)})")
    mid = "UNetMidBlock2DCrossAttn" if any("CrossAttn" in b for b in config.down_block_types) else None
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        mid_block_type=mid,
        block_out_channels=widths,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(c // config.attention_head_dim for c in widths),  # diffusers: heads per block
        norm_num_groups=config.norm_num_groups,
        class_embed_type="projection" if config.text_embed_conditioning else None,
        projection_class_embeddings_input_dim=text_embed_dim if config.text_embed_conditioning else None,
    )


def build_mmdit(config: "DecoderConfig", cross_attention_dim: int, text_embed_dim: int | None, channels: int, size: int) -> SD3Transformer2DModel:
    """SD3's MMDiT over [B, channels, size, size]: (size / patch_size)² image tokens and the text
    tokens attend jointly in every block. Initialized as DiT's adaLN-Zero (every block's
    modulation and the output projection start at zero: each block starts as the identity and
    the first prediction is zero), which trains faster than the default init at every size."""
    if size % config.patch_size:
        raise ValueError(f"decoder.patch_size ({config.patch_size}) must divide the denoiser's input size ({size})")
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=size,
        patch_size=config.patch_size,
        in_channels=channels,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.width // config.attention_head_dim,
        joint_attention_dim=cross_attention_dim,
        caption_projection_dim=config.width,
        pooled_projection_dim=text_embed_dim if config.text_embed_conditioning and text_embed_dim else 1,
        out_channels=channels,
        pos_embed_max_size=size // config.patch_size,
    )
    for name, module in model.named_modules():
        if name.endswith(("norm1", "norm1_context", "norm_out")) and isinstance(getattr(module, "linear", None), nn.Linear):
            nn.init.zeros_(module.linear.weight)
            nn.init.zeros_(module.linear.bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model


def latent_shape(config: "DecoderConfig", vae: nn.Module | None) -> tuple[int, int]:
    """(channels, size) of what the denoiser sees: the pixels, or the VAE's latents."""
    if vae is None:
        return config.channels, config.image_size
    vc = vae.config
    factor = 2 ** (len(vc.block_out_channels if "block_out_channels" in vc else vc.encoder_block_out_channels) - 1)
    if config.image_size % factor:
        raise ValueError(f"decoder.image_size ({config.image_size}) must be a multiple of the VAE's downsampling ({factor})")
    if vc.in_channels != config.channels:
        raise ValueError(f"decoder.channels ({config.channels}) must be the VAE's in_channels ({vc.in_channels})")
    return vc.latent_channels, config.image_size // factor


class Decoder(nn.Module):
    """Predicts the objective's target (noise, v, or flow velocity) for noisy samples [B, C, S, S]
    given timesteps and a ``TextCondition``; with a VAE the samples are its scaled latents.

    The unit text embedding enters times sqrt(E) (entries of unit variance, like the timestep
    features it joins): the UNet's ``class_labels`` or the MMDiT's ``pooled_projections``; a
    diffusers user of the exported ``decoder/`` passes the same. The VAE is frozen and held
    outside the module tree: never trained, never in a checkpoint or ``model.safetensors``
    (its own folder is referenced), but moved with ``.to()``."""

    def __init__(self, config: "DecoderConfig", cross_attention_dim: int, text_embed_dim: int | None = None,
                 attention_backend: str | None = None, vae: nn.Module | None = None):
        super().__init__()
        if config.text_embed_conditioning and text_embed_dim is None:
            raise ValueError("text_embed_dim is required when decoder.text_embed_conditioning is on")
        if (config.vae is None) != (vae is None):
            raise ValueError("decoder.vae names a VAE folder: pass the loaded VAE (FoundationModel loads it)" if vae is None
                             else "a VAE was given but decoder.vae is not set")
        self.config = config
        self._vae = [vae.eval().requires_grad_(False)] if vae is not None else []
        self.latent_cache: LatentCache | None = None  # set for training (train.module: model.latent_cache_gb)
        channels, size = latent_shape(config, vae)
        self.sample_shape = (channels, size, size)  # what the denoiser sees and sampling starts from
        if config.backbone == "mmdit":
            self.transformer = build_mmdit(config, cross_attention_dim, text_embed_dim, channels, size)
        else:
            self.unet = build_unet(config, cross_attention_dim, text_embed_dim, channels, size)
        self.memory_format = torch.channels_last if config.channels_last and config.backbone == "unet" else torch.contiguous_format
        self.denoiser.to(memory_format=self.memory_format)
        self.set_attention_backend(attention_backend)

    @property
    def denoiser(self) -> UNet2DConditionModel | SD3Transformer2DModel:
        return self.transformer if self.config.backbone == "mmdit" else self.unet

    @property
    def vae(self) -> nn.Module | None:
        return self._vae[0] if self._vae else None

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .half() move the frozen VAE too
        super()._apply(fn, recurse)
        if self._vae:
            self._vae[0]._apply(fn, recurse)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the denoiser's activations in the backward pass (diffusers' own switch)."""
        if enable:
            self.denoiser.enable_gradient_checkpointing()
        else:
            self.denoiser.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: str | None) -> None:
        """Install the core processor on every attention module of the denoiser."""
        self.denoiser.set_attn_processor(CoreAttnProcessor(backend))

    @staticmethod
    def class_labels(embeds: torch.Tensor) -> torch.Tensor:
        """Unit text embeddings [B, E] -> the UNet's ``class_labels`` / the MMDiT's
        ``pooled_projections`` [B, E] (unit-variance entries)."""
        return embeds * math.sqrt(embeds.shape[-1])

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        # sample [B, C, S, S], timesteps [B], cond.states [B, L, W], cond.embeds [B, E] -> prediction [B, C, S, S]
        on = self.config.text_embed_conditioning
        if self.config.backbone == "mmdit":
            pooled = self.class_labels(cond.embeds) if on else cond.embeds.new_zeros(cond.embeds.shape[0], 1)  # [B, E | 1]
            out = self.transformer(hidden_states=sample, encoder_hidden_states=cond.states, pooled_projections=pooled.to(cond.states.dtype),
                                   timestep=timesteps).sample
        else:
            labels = self.class_labels(cond.embeds).to(cond.states.dtype) if on else None
            out = self.unet(sample.contiguous(memory_format=self.memory_format), timesteps, encoder_hidden_states=cond.states,
                            class_labels=labels).sample
        if self.config.objective == "flow" and self.config.flow_target == "sample":
            out = self.velocity_from_sample(sample, timesteps, out)
        return out

    def velocity_from_sample(self, noisy: torch.Tensor, timesteps: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """A clean-sample prediction x' [B, C, S, S] at noise level s = timesteps / T as the velocity
        (x_s - x') / s that the flow loss and solvers use (x_s = (1 - s) x + s e: e - x = (x_s - x) / s).
        s is held at least ``flow_min_sigma`` (as JiT): near s = 0 the division would blow up the clean
        prediction's errors."""
        s = (timesteps.float() / self.config.num_train_timesteps).clamp(min=self.config.flow_min_sigma)
        s = s.view(-1, *([1] * (noisy.ndim - 1)))  # [B, 1, 1, 1]
        return (noisy.float() - clean.float()) / s  # fp32: the division amplifies a bf16 output's rounding

    # ---- the latent space ---------------------------------------------------------------------
    def _ready_vae(self, x: torch.Tensor) -> nn.Module:
        """The VAE on ``x``'s device (FSDP moves parameters without ``.to()``), in fp32 where its
        config asks for it (SD / SDXL VAEs overflow in fp16)."""
        vae = self.vae
        p = next(vae.parameters())
        if p.device != x.device or (p.dtype == torch.float16 and vae.config.get("force_upcast", False)):
            vae.to(device=x.device, dtype=torch.float32 if p.dtype == torch.float16 else p.dtype)
        return vae

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> what the denoiser works on [B, C', S, S]: the VAE's
        latents z as (z - shift_factor) * scaling_factor (diffusers' SD3 / Sana convention),
        in the images' dtype; the images themselves without a VAE. The VAE runs outside
        autocast, in its own dtype."""
        if self.vae is None:
            return images
        vae = self._ready_vae(images)

        def encode(x: torch.Tensor) -> torch.Tensor:  # [n, 2C', S, S] mean and log-variance (KL), or [n, C', S, S] (DC)
            with torch.autocast(x.device.type, enabled=False):
                out = vae.encode(x.to(next(vae.parameters()).dtype))
            return out.latent_dist.parameters if hasattr(out, "latent_dist") else out.latent

        encoded = encode(images) if self.latent_cache is None else self.latent_cache.lookup(images, encode)
        if encoded.shape[1] == 2 * self.sample_shape[0]:  # a KL VAE's distribution: draw as latent_dist.sample() does
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            latents = DiagonalGaussianDistribution(encoded).sample()
        else:
            latents = encoded
        return ((latents.float() - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_latents``: [B, C', S, S] -> images [B, C, H, W] (about [-1, 1], fp32)."""
        if self.vae is None:
            return latents
        vae = self._ready_vae(latents)
        z = latents.float() / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        with torch.autocast(latents.device.type, enabled=False):
            return vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()

    # ---- export --------------------------------------------------------------------------------
    def save_diffusers(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the denoiser in diffusers' own folder format (``UNet2DConditionModel`` /
        ``SD3Transformer2DModel.from_pretrained``), optionally with its weights stored in ``dtype``."""
        if dtype is not None:  # nn.Module.to: diffusers' own warns of fp32-only modules even when the list is empty
            nn.Module.to(copy.deepcopy(self.denoiser), dtype=dtype, memory_format=torch.contiguous_format).save_pretrained(
                str(directory), safe_serialization=True
            )
            return Path(directory)
        self.denoiser.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors
        try:
            self.denoiser.save_pretrained(str(directory), safe_serialization=True)
        finally:
            self.denoiser.to(memory_format=self.memory_format)
        return Path(directory)
