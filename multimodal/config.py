"""Every configuration of the project in one module: the model's component dataclasses, its
recommended sampling settings, the training stages, LoRA adapters, token generation and the
demo's limits (the named presets, plain dicts, are in ``multimodal.presets``).

One style throughout: typed dataclasses that check themselves in ``__post_init__`` (an error
names the field and the allowed range), composed (``FoundationConfig`` holds its parts, it does
not inherit them), built from nested dicts by ``from_dict`` which names unknown keys. This
module imports only the standard library (and its stdlib-only helpers), so every package can
read it without cycles.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_dicts import config_from_dict, merge_dicts
from .files import read_json
from .presets import LORA_TARGETS, PRESETS, STAGE_PRESETS

__all__ = ["config_from_dict", "merge_dicts", "read_json"]  # with every class below

ACTIVATIONS = ("gelu", "quick_gelu")
ATTENTION_BACKENDS = ("auto", "sdpa", "math", "xformers")
SCHEDULER_NAMES = ("ddim", "dpm++", "euler", "euler_a", "unipc", "ddpm")
FLOW_SCHEDULERS = ("euler", "dpm++", "unipc")  # with flow sigmas
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")  # diffusers' SD3 training names
COMPONENTS = ("text", "image", "decoder", "language")
LOSSES = ("contrastive", "diffusion", "caption")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

def _choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# Upper bounds on sizes: far above any real model, low enough that a typo (or a hostile
# config.json) is an error, not an attempt to allocate hundreds of gigabytes.
MAX_WIDTH, MAX_LAYERS, MAX_CONTEXT, MAX_VOCAB, MAX_IMAGE, MAX_BEAMS = 16384, 256, 4096, 1_000_000, 4096, 16
MAX_IMAGES = 64  # generated per prompt, and per command (each image costs memory at every sampling step)
MAX_BATCH = 256  # generated in one call: more go in several calls


def _sizes(prefix: str, **values: tuple[float, float, float]) -> None:
    """Each ``name=(value, low, high)`` must lie in [low, high] (NaN never does); errors name the field."""
    for name, (value, low, high) in values.items():
        _check(low <= value <= high, f"{prefix + '.' if prefix else ''}{name} must be in [{low:g}, {high:g}], got {value}")


@dataclass
class TextEncoderConfig:
    """Causal transformer over open_clip's BPE tokens (open_clip ``CLIPTextCfg`` subset)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    activation: str = "gelu"  # "gelu" | "quick_gelu" (OpenAI weights)
    trim_padding: bool = True  # skip positions after the batch's longest text (same embeddings)

    def __post_init__(self) -> None:
        _sizes("text", vocab_size=(self.vocab_size, 1, MAX_VOCAB), context_length=(self.context_length, 3, MAX_CONTEXT),
               width=(self.width, 1, MAX_WIDTH), layers=(self.layers, 1, MAX_LAYERS), heads=(self.heads, 1, MAX_WIDTH),
               mlp_ratio=(self.mlp_ratio, 0.01, 64))
        _check(self.width % self.heads == 0, f"text.width ({self.width}) must be a multiple of text.heads ({self.heads})")
        _choice(self.activation, "text.activation", ACTIVATIONS)


@dataclass
class ImageEncoderConfig:
    """ViT with a class token (open_clip ``CLIPVisionCfg`` subset)."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    # Normalization applied by the model to pixel values in [0, 1].
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        _sizes("image", image_size=(self.image_size, 1, MAX_IMAGE), patch_size=(self.patch_size, 1, MAX_IMAGE),
               channels=(self.channels, 1, 4), width=(self.width, 1, MAX_WIDTH), layers=(self.layers, 1, MAX_LAYERS),
               heads=(self.heads, 1, MAX_WIDTH), mlp_ratio=(self.mlp_ratio, 0.01, 64))
        _check(self.image_size % self.patch_size == 0,
               f"image.image_size ({self.image_size}) must be a positive multiple of image.patch_size ({self.patch_size})")
        _check(self.width % self.heads == 0, f"image.width ({self.width}) must be a multiple of image.heads ({self.heads})")
        _choice(self.activation, "image.activation", ACTIVATIONS)
        _check(len(self.mean) == self.channels and len(self.std) == self.channels and min(self.std) > 0,
               f"image.mean / image.std need {self.channels} values (std > 0), got {self.mean}, {self.std}")


@dataclass
class DecoderConfig:
    """The image decoder: a diffusers denoiser (``backbone``: ``unet`` = ``UNet2DConditionModel`` cross-attending to
    the shared text encoder's token states, ``mmdit`` = SD3's ``SD3Transformer2DModel`` attending jointly over image
    patches and those states), trained with ``objective`` ``ddpm`` (noise / v) or ``flow`` (rectified flow, as SD3),
    in pixel space or in the latent space of a frozen diffusers VAE (``vae``: a local folder)."""

    image_size: int = 32  # of the generated images, in pixels
    channels: int = 3
    backbone: str = "unet"
    objective: str = "ddpm"
    vae: str | None = None  # AutoencoderKL / AutoencoderDC folder; None: pixel space (image_size <= 64)
    block_out_channels: tuple[int, ...] = (64, 128)  # unet, and the next four
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    attention_head_dim: int = 32  # channels per head (both backbones)
    norm_num_groups: int = 32
    width: int = 256  # mmdit: channels of the image and text streams (heads = width / attention_head_dim)
    num_layers: int = 4  # mmdit: joint blocks
    patch_size: int = 2  # mmdit: pixels (or latents) per patch side
    # Also the text's unit embedding, added to the timestep embedding (unet: class_embed_type "projection", as unCLIP;
    # mmdit: pooled_projections): a global signal; small decoders learn much faster.
    text_embed_conditioning: bool = True
    channels_last: bool = False  # NHWC: often faster on GPUs; ~8% slower per CPU training step
    num_train_timesteps: int = 1000
    # ddpm: "linear" keeps epsilon well conditioned (the cosine schedule's sqrt(alpha_bar(T)) = 5e-5 amplifies noise errors 20000x)
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"  # ddpm: "epsilon" | "v_prediction"
    min_snr_gamma: float | None = None  # ddpm: min-SNR-gamma loss weighting (e.g. 5.0); None = off
    # flow: noise levels drawn by diffusers' compute_density_for_timestep_sampling and weighted by
    # compute_loss_weighting_for_sd3 (``weighting_scheme``), shifted by ``flow_shift`` (SD3: 3.0)
    flow_target: str = "velocity"  # or "sample": the denoiser outputs the clean x', used as velocity (x_s - x') / max(s, flow_min_sigma) (JiT)
    flow_min_sigma: float = 0.05
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float = 1.0
    cfg_dropout: float = 0.1  # probability that a caption is replaced by the empty prompt
    ema_decay: float = 0.999  # 0 turns the EMA off (validation and export use the raw weights)

    def __post_init__(self) -> None:
        for name, value, choices in (("backbone", self.backbone, ("unet", "mmdit")), ("objective", self.objective, ("ddpm", "flow")),
                                     ("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES), ("prediction_type", self.prediction_type, ("epsilon", "v_prediction")),
                                     ("flow_target", self.flow_target, ("velocity", "sample"))):
            _choice(value, f"decoder.{name}", choices)
        n = len(self.block_out_channels)
        _check(all(1 <= c <= MAX_WIDTH for c in self.block_out_channels) and 1 <= self.layers_per_block <= MAX_LAYERS
               and self.attention_head_dim >= 1 and self.norm_num_groups >= 1 and 2 <= self.num_train_timesteps <= 100_000,
               f"decoder sizes out of range: block_out_channels in [1, {MAX_WIDTH}], layers_per_block in [1, {MAX_LAYERS}], "
               "attention_head_dim and norm_num_groups >= 1, num_train_timesteps in [2, 100000]")
        _sizes("decoder", width=(self.width, 1, MAX_WIDTH), num_layers=(self.num_layers, 1, MAX_LAYERS), patch_size=(self.patch_size, 1, 64),
               logit_std=(self.logit_std, 1e-3, 100), logit_mean=(self.logit_mean, -100, 100), flow_shift=(self.flow_shift, 1e-3, 1000),
               mode_scale=(self.mode_scale, 0, 1.75), flow_min_sigma=(self.flow_min_sigma, 1e-4, 1), image_size=(self.image_size, 1, MAX_IMAGE), channels=(self.channels, 1, 4))
        _check(self.vae is not None or 1 <= self.image_size <= 64, f"decoder.image_size must be in [1, 64] in pixel space "
               f"(above: set decoder.vae to a latent space), got {self.image_size}")
        if self.backbone == "unet":
            _check(n >= 1 and self.image_size % 2 ** (n - 1) == 0,
                   f"decoder.image_size must be divisible by the UNet's downsampling ({2 ** max(n - 1, 0)}), got {self.image_size}")
            _check(len(self.down_block_types) == n and len(self.up_block_types) == n,
                   "decoder.down_block_types / up_block_types need one entry per block_out_channels")
            _check(all(c % self.attention_head_dim == 0 and c % self.norm_num_groups == 0 for c in self.block_out_channels),
                   "decoder.block_out_channels must be multiples of attention_head_dim and norm_num_groups")
        else:
            _check(self.width % self.attention_head_dim == 0, f"decoder.width must be a multiple of attention_head_dim, got {self.width}")
            _check(self.vae is not None or self.image_size % self.patch_size == 0,
                   f"decoder.image_size must be a multiple of decoder.patch_size ({self.patch_size}), got {self.image_size}")
        for name, value in (("ema_decay", self.ema_decay), ("cfg_dropout", self.cfg_dropout)):
            _check(0.0 <= value < 1.0, f"decoder.{name} must be in [0, 1), got {value}")
        _check(self.min_snr_gamma is None or self.min_snr_gamma > 0, f"decoder.min_snr_gamma must be > 0 or null, got {self.min_snr_gamma}")
        _check(self.objective == "flow" or self.flow_target == "velocity", f"decoder.flow_target 'sample' needs decoder.objective 'flow', got {self.objective!r}")


@dataclass
class LanguageHeadConfig:
    """CoCa's multimodal text decoder: ``layers`` causal blocks over the text encoder's states."""

    layers: int = 2
    heads: int = 8
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    text_only_prob: float = 0.1  # captions seen without their image: text-only completion in distribution
    vocabulary: str = "full"  # compact: softmax over the training captions' token ids only (vocabulary.json)

    def __post_init__(self) -> None:
        _sizes("language", layers=(self.layers, 1, MAX_LAYERS), heads=(self.heads, 1, MAX_WIDTH), mlp_ratio=(self.mlp_ratio, 0.01, 64))
        _check(0.0 <= self.text_only_prob < 1.0, f"language.text_only_prob must be in [0, 1), got {self.text_only_prob}")
        _choice(self.activation, "language.activation", ACTIVATIONS)
        _choice(self.vocabulary, "language.vocabulary", ("full", "compact"))


@dataclass
class SamplingConfig:
    """The recommended image sampling settings of a model: every door (API, CLI, demo,
    validation, sample grids) uses them unless told otherwise, so one prompt and seed give one
    image whichever door it comes through."""

    scheduler: str = "dpm++"
    steps: int = 25
    guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        _choice(self.scheduler, "sampling.scheduler", SCHEDULER_NAMES)
        _check(isinstance(self.steps, int) and not isinstance(self.steps, bool) and 1 <= self.steps <= 999, f"sampling.steps must be an integer in [1, 999], got {self.steps}")
        _check(0.0 <= self.guidance_scale <= 100.0, f"sampling.guidance_scale must be in [0, 100], got {self.guidance_scale}")


@dataclass
class TrainingRecord:
    """What a model was trained on, kept in its ``config.json``: per component the optimizer
    steps that trained it (0: never trained, so inference refuses it) and one entry per
    ``fit`` run (stage, steps, data, where it started). A config without a record (built by
    hand, or saved before records existed) is of unknown history: nothing is refused."""

    steps: dict[str, int] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    pretrained: list[str] = field(default_factory=list)  # components with weights trained elsewhere (open_clip)

    def __post_init__(self) -> None:
        _check(isinstance(self.steps, dict) and set(self.steps) <= set(COMPONENTS), f"training.steps keys must be among {COMPONENTS}, got {self.steps}")
        _check(all(isinstance(v, int) and v >= 0 for v in self.steps.values()), f"training.steps values must be integers >= 0, got {self.steps}")
        self.steps = {c: int(self.steps.get(c, 0)) for c in COMPONENTS}
        _check(isinstance(self.runs, list) and all(isinstance(r, dict) for r in self.runs), "training.runs must be a list of mappings")
        _check(set(self.pretrained) <= set(COMPONENTS), f"training.pretrained entries must be among {COMPONENTS}, got {self.pretrained}")

    def trained(self, component: str) -> bool:
        return self.steps.get(component, 0) > 0 or component in self.pretrained


@dataclass
class FoundationConfig:
    """The whole model, composed of its parts: both encoders project into one ``embed_dim``
    space; ``decoder: None`` is a model without a diffusion decoder, ``language: None`` one
    without a language head."""

    embed_dim: int = 512
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    logit_scale_init: float = 2.6592600369644043  # log(1 / 0.07), as CLIP
    attention_backend: str = "auto"  # see encoders.attention
    grad_checkpointing: bool = False  # every transformer block of every component, and the UNet
    decoder: DecoderConfig | None = None
    language: LanguageHeadConfig | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: TrainingRecord | None = None  # what each component was trained on (filled in by fit)

    def __post_init__(self) -> None:
        _sizes("config", embed_dim=(self.embed_dim, 1, MAX_WIDTH))
        _choice(self.attention_backend, "attention_backend", ATTENTION_BACKENDS)
        if self.decoder is not None:  # multistep solvers (dpm++, unipc) give NaN at the schedule's length
            _check(self.decoder.objective != "flow" or self.sampling.scheduler in FLOW_SCHEDULERS, "sampling.scheduler must be one of "
                   f"{', '.join(map(repr, FLOW_SCHEDULERS))} for decoder.objective 'flow', got {self.sampling.scheduler!r}")
            _check(self.sampling.steps < self.decoder.num_train_timesteps,
                   f"sampling.steps must be below decoder.num_train_timesteps ({self.decoder.num_train_timesteps}), got {self.sampling.steps}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FoundationConfig":
        return config_from_dict(cls, data)

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | None = None) -> "FoundationConfig":
        """A named preset with optional nested overrides, e.g. ``{"text": {"layers": 2}}``."""
        _choice(name, "preset", tuple(sorted(PRESETS)))
        _check(overrides is None or isinstance(overrides, dict), f"overrides must be a mapping of config fields, got {overrides!r}")
        return cls.from_dict(merge_dicts(PRESETS[name], overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FoundationConfig":
        try:
            return cls.from_dict(read_json(path))
        except ValueError as err:
            raise ValueError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None


@dataclass
class StageConfig:
    """Which losses train (their weights) and which components stay frozen."""

    loss_weights: dict[str, float]
    freeze: list[str]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.loss_weights) - set(LOSSES))
        _check(not unknown, f"model.loss_weights has unknown loss(es) {unknown}; known: {', '.join(LOSSES)}")
        _check(all(w >= 0 for w in self.loss_weights.values()), f"model.loss_weights must be >= 0, got {self.loss_weights}")
        self.loss_weights = {k: float(self.loss_weights.get(k, 0.0)) for k in LOSSES}
        bad = sorted(set(self.freeze) - set(COMPONENTS))
        _check(not bad, f"model.freeze entries must be among {COMPONENTS}, got {self.freeze}")

    def uses(self, loss: str) -> bool:
        return self.loss_weights[loss] > 0


STAGES: dict[str, StageConfig] = {name: StageConfig(dict(w), list(f)) for name, (w, f) in STAGE_PRESETS.items()}


def stage_config(stage: str, loss_weights: dict[str, float] | None = None, freeze: list[str] | None = None) -> StageConfig:
    """A stage preset with the user's loss weights / frozen components laid over it."""
    _choice(stage, "model.stage", tuple(STAGES))
    return StageConfig({**STAGES[stage].loss_weights, **(loss_weights or {})}, list(STAGES[stage].freeze if freeze is None else freeze))


@dataclass
class AdapterConfig:
    """Which components get LoRA and how big it is.

    components: among ``text``, ``image``, ``decoder``, ``language``.
    r / alpha / dropout: LoRA rank, scale (the update is ``B @ A * alpha / r``) and input dropout.
    targets: per component, module-name suffixes to adapt (default: ``LORA_TARGETS``).
    base_model / base_sha256: the base folder and its weights' hash (filled in when saved).
    """

    components: list[str] = field(default_factory=lambda: ["text", "image"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: dict[str, list[str]] | None = None
    base_model: str | None = None
    base_sha256: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.components) - set(LORA_TARGETS))
        _check(bool(self.components) and not unknown and len(set(self.components)) == len(self.components),
               f"lora components must be a non-empty subset of {sorted(LORA_TARGETS)} without repeats, got {self.components}")
        _check(self.r >= 1, f"lora r must be at least 1, got {self.r}")
        _check(self.alpha > 0, f"lora alpha must be positive, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"lora dropout must be in [0, 1), got {self.dropout}")
        extra = sorted(set(self.targets or {}) - set(self.components))
        _check(not extra, f"lora targets given for component(s) {extra} that are not in components {self.components}")

    def target_modules(self, component: str) -> list[str]:
        return list((self.targets or {}).get(component) or LORA_TARGETS[component])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "AdapterConfig":
        try:
            return config_from_dict(cls, read_json(path))
        except ValueError as err:
            raise ValueError(f"{path}: not a valid adapter config ({err})") from None


@dataclass
class GenerationArgs:
    """How tokens are chosen: ``num_beams > 1`` beam search, ``do_sample`` sampling (temperature / top_k / top_p), else greedy."""

    max_new_tokens: int = 16
    min_new_tokens: int = 0  # end-of-text is not allowed before this many new tokens
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    length_penalty: float = 1.0
    use_cache: bool = True

    def __post_init__(self) -> None:  # checked once, where the options are given
        _sizes("", max_new_tokens=(self.max_new_tokens, 1, MAX_CONTEXT), num_beams=(self.num_beams, 1, MAX_BEAMS),
               temperature=(self.temperature, 1e-6, 100), length_penalty=(self.length_penalty, -100, 100))
        _check(0 <= self.min_new_tokens <= self.max_new_tokens, f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        _check(not (self.num_beams > 1 and self.do_sample), "num_beams > 1 and do_sample=True cannot be combined; pick beam search or sampling")
        _check(self.top_k is None or 1 <= self.top_k <= MAX_VOCAB, f"top_k must be in [1, {MAX_VOCAB}] (or None), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "GenerationArgs":
        """From keyword arguments: unknown names and values of the wrong kind are errors naming them."""
        return config_from_dict(cls, options, root="")


@dataclass(frozen=True)
class DemoLimits:
    """Bounds on what one demo request may ask for."""

    max_steps: int = 50
    max_images: int = 8
    max_text_chars: int = 200
    max_labels: int = 32
    max_uploads: int = 16
    max_guidance: float = 20.0
    max_new_tokens: int = 32
    max_file_size: str = "2mb"
    max_pixels: int = 4096 * 4096  # per uploaded image, checked from its header before decoding
    upload_max_age_s: int = 600  # uploads (and generated files) older than this are deleted ...
    upload_check_s: int = 60  # ... checked this often
    queue_size: int = 64
    concurrency: int = 2
