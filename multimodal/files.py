"""File names inside model and adapter folders, in one place (no module imports another for
them), and the one way user files are opened for reading: regular files only."""

from __future__ import annotations

import io  # noqa: F401 - named in annotations
import json
import os
import stat

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
DECODER_DIR = "decoder"  # the denoiser in diffusers' own folder format
SCHEDULER_DIR = "scheduler"  # its recommended sampling scheduler's config (diffusers)
VAE_DIR = "vae"  # a latent decoder's frozen VAE (diffusers)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files that hold pickles: never loaded, named in errors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def open_regular(path: str | os.PathLike[str]) -> io.BufferedReader:
    """Open a regular file for reading, or raise: a FIFO, socket or device would block the
    reader or never end (opened without blocking, then checked on the open descriptor, so the
    file cannot be swapped between the check and the read); a missing file is
    ``FileNotFoundError``, anything else not a regular file ``IsADirectoryError`` /
    ``NotARegularFileError``."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{os.fspath(path)} is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{os.fspath(path)} is not a regular file (a pipe, socket or device)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_files(paths: list[str], what: str) -> None:
    """Each path exists and is a regular file, or an error naming ``what`` (checked before a
    model loads; the file's content is checked where it is read)."""
    for path in paths:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{what}: file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"{what}: {path} is not a regular file (a folder, pipe or device)")


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of a regular file (``open_regular``), refusing files over ``limit`` bytes."""
    with open_regular(path) as f:
        data = f.read() if limit is None else f.read(limit + 1)  # a file that grows is bounded too
    if limit is not None and len(data) > limit:
        raise ValueError(f"{os.fspath(path)} is larger than {limit} bytes")
    return data


class NotARegularFileError(OSError):
    """A path that is a pipe, socket or device: reading it could block forever."""


def read_json(path: str | os.PathLike[str], limit: int = 1 << 24) -> object:
    """A small JSON file of a model folder (a regular file, at most ``limit`` bytes), or an
    error naming the file."""
    try:
        return json.loads(read_regular(path, limit))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None
