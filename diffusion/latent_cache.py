"""Latents of the training images, kept so that a frozen VAE encodes each image once.

With a VAE the encoder runs on every training image at every step, though it never changes:
beyond the first epoch it repeats work (for a 256-pixel f8 VAE, as much as a small denoiser's
step). The cache keeps what the encoder said about each image: the latent distribution
(mean and log-variance) of an ``AutoencoderKL``, the latent of an ``AutoencoderDC``. A latent
is still drawn afresh from the stored distribution at every step, exactly as from the encoder.
Images are keyed by their content (the 8-bit pixels' hash), so any data source works and a
randomly cropped image is simply a new image.
"""

from __future__ import annotations

import hashlib

import torch


class LatentCache:
    """At most ``max_bytes`` of encoder outputs in host memory (per process: under DDP each rank
    keeps its own); when full, new images are encoded every time (nothing is evicted: a data set
    that fits is encoded once). ``hits`` / ``misses`` count images."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes, self.used, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self.store: dict[bytes, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> "LatentCache":
        return LatentCache(self.max_bytes)  # a copy of the model (EMA, export) does not duplicate gigabytes

    def __len__(self) -> int:
        return len(self.store)

    @staticmethod
    def keys(images: torch.Tensor) -> list[bytes]:
        """One key per image of ``images`` [B, C, H, W] in [-1, 1]: its pixels in 8 bits (as they
        were decoded), hashed on the host."""
        pixels = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        shape = repr(pixels.shape[1:]).encode()  # the same bytes at another size are another image
        return [hashlib.blake2b(shape + p.tobytes(), digest_size=16).digest() for p in pixels]

    def lookup(self, images: torch.Tensor, encode) -> torch.Tensor:
        """``encode(images[missing])`` -> [m, ...] for the images not stored yet; returns the
        stored and the new outputs for every image [B, ...], on ``images``' device (one copy
        each way between host and device per call)."""
        keys = self.keys(images)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        stored = [i for i, k in enumerate(keys) if k in self.store]
        self.hits, self.misses = self.hits + len(stored), self.misses + len(missing)
        fresh = encode(images[missing]) if missing else None
        out = None
        if stored:
            rows = torch.stack([self.store[keys[i]] for i in stored]).to(images.device, non_blocking=True)
            out = rows.new_empty(len(keys), *rows.shape[1:])
            out[stored] = rows
        if fresh is not None:
            out = fresh.new_empty(len(keys), *fresh.shape[1:]) if out is None else out
            out[missing] = fresh.to(out.dtype)
            for row, i in zip(fresh.detach().to("cpu"), missing):
                size = row.numel() * row.element_size()
                if keys[i] not in self.store and self.used + size <= self.max_bytes:
                    self.store[keys[i]] = row.clone()  # its own memory, not a view of the batch
                    self.used += size
        return out
