"""``DecoderConfig``: the pixel-space diffusion decoder and its training/noise settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecoderConfig:
    """A diffusers ``UNet2DConditionModel`` in pixel space (images up to 64x64), cross-attending
    to the shared text encoder's token states."""

    image_size: int = 32
    channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    attention_head_dim: int = 32  # channels per head
    norm_num_groups: int = 32
    # Also condition on the text's embedding in the shared space (pooled, projected, unit norm),
    # added to the timestep embedding of every ResNet block (diffusers class_embed_type
    # "projection", as in unCLIP): a global signal for what the image shows, next to the
    # per-token cross-attention that places it. Small decoders learn shape and layout much faster.
    text_embed_conditioning: bool = True
    # NHWC convolutions (often faster on GPUs with tensor cores; on the 2-core CPU here a
    # training step measured ~8% slower than NCHW, so off by default)
    channels_last: bool = False
    # training / noise schedule (diffusers' DDPMScheduler)
    num_train_timesteps: int = 1000
    # "linear" (DDPM) keeps epsilon prediction well conditioned: at t = T, sqrt(alpha_bar) is 6e-3,
    # where the cosine schedule's 5e-5 amplifies noise-prediction errors 20000x in the x0 estimate
    # (seen as random global color shifts). Pair "squaredcos_cap_v2" with "v_prediction".
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    cfg_dropout: float = 0.1  # probability that a caption is replaced by the empty prompt
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting (e.g. 5.0); None = off
    ema_decay: float = 0.999  # 0 turns the EMA off (validation and export use the raw weights)

    def validate(self) -> None:
        if self.image_size > 64 or self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"decoder.image_size must be <= 64 and divisible by the UNet's downsampling, got {self.image_size}")
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError("decoder.down_block_types / up_block_types need one entry per block_out_channels")
        if any(c % self.attention_head_dim or c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("decoder.block_out_channels must be multiples of attention_head_dim and norm_num_groups")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"decoder.prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"decoder.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"decoder.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
