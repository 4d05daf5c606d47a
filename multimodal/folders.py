"""Model folders: reading their weights safely (``load_weights``) and writing folders a user
keeps (models, adapters, reports, data sets) without ever losing one.

``write_folder`` is the one way the project writes such a folder: a non-empty folder is replaced
only with ``overwrite=True``, and then as a whole and atomically. The new folder is written
beside the target under a hidden name (``.NAME.partial-HOST-PID-XXXX``) and swapped in with one
``renameat2(RENAME_EXCHANGE)``, so a process killed at any moment leaves the target either as
it was or complete, never half-written and never mixed (no stale shard of an old diffusers
folder beside a new index). Where there is no exchange (macOS, Windows, some file systems) two
renames do it, and a kill between them leaves the old folder aside under a hidden name: the next
write puts it back first. What a killed write leaves behind is only such a hidden folder of a
process that no longer runs; the next write into the same target removes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import secrets
import socket
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

_PARTIAL, _OLD = "partial", "old"


def load_weights(path: str | Path, device: str = "cpu") -> dict:
    """The tensors of a safetensors file, or a ``ValueError`` naming the file: damaged or
    foreign bytes, or NaN/inf values (a bad copy, a run that diverged) that would make every
    answer NaN."""
    import torch
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=device)
    except Exception as err:  # noqa: BLE001 - safetensors' own error type: a damaged or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    damaged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:
        raise ValueError(f"{path} holds NaN/inf values in {len(damaged)} tensor(s) (first: {damaged[0]}): the file is "
                         "damaged, or was saved from a run that diverged")
    return state


VAE_CLASSES = ("AutoencoderKL", "AutoencoderDC")


def load_vae(path: str | Path):
    """A frozen diffusers VAE (``AutoencoderKL`` / ``AutoencoderDC``) from a local folder in
    diffusers' format; only safetensors weights are read, never from the network, and NaN/inf
    weights are refused."""
    import diffusers
    import torch

    from .files import read_json

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"decoder.vae: {folder} is not a diffusers VAE folder (no config.json)")
    config = read_json(folder / "config.json")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in VAE_CLASSES:
        raise ValueError(f"decoder.vae: {folder}/config.json is a {name!r}, not one of {', '.join(VAE_CLASSES)}")
    import math

    scale, shift = config.get("scaling_factor", 0.18215), config.get("shift_factor")
    widths = config.get("block_out_channels", config.get("encoder_block_out_channels"))
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
            and (shift is None or (isinstance(shift, (int, float)) and math.isfinite(shift)))):
        raise ValueError(f"decoder.vae: {folder}/config.json needs a finite scaling_factor > 0 and a finite shift_factor (or null)")
    if not (isinstance(widths, list) and 1 <= len(widths) <= 8 and all(isinstance(w, int) and 1 <= w <= 4096 for w in widths)
            and isinstance(config.get("latent_channels", 4), int) and 1 <= config.get("latent_channels", 4) <= 256):
        raise ValueError(f"decoder.vae: {folder}/config.json sizes out of range: 1-8 block widths in [1, 4096], latent_channels in [1, 256]")
    if config.get("latents_mean") is not None:
        raise ValueError(f"decoder.vae: {folder} normalizes latents per channel (latents_mean / latents_std): not supported; "
                         "use a VAE with scaling_factor / shift_factor (SD, SDXL, SD3, Flux, DC-AE)")
    try:  # diffusers' loader: key renames of older VAEs, sharded weights; safetensors only, never the network
        vae = getattr(diffusers, name).from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"decoder.vae: {folder} could not be loaded (safetensors weights only; pickle files are never "
                         f"loaded): {first}") from None
    missing = [n for n, p in vae.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"decoder.vae: {folder} is missing weights (first: {missing[0]})")
    damaged = [n for n, p in vae.named_parameters() if not bool(torch.isfinite(p).all())]
    if damaged:
        raise ValueError(f"decoder.vae: {folder} holds NaN/inf values (first: {damaged[0]})")
    if hasattr(vae, "enable_slicing"):  # decode large batches one image at a time (memory at 256 px and up)
        vae.enable_slicing()
    return vae.eval().requires_grad_(False)


def write_folder(target: str | Path, write: Callable[[Path], object], overwrite: bool = False, what: str = "out",
                 inputs: Iterable[str | Path] = ()) -> Path:
    """Run ``write(folder)`` on a fresh hidden folder beside ``target``, then put it in
    ``target``'s place. ``what`` names the argument in errors (``--out``, ``directory``);
    ``inputs`` are files or folders the write reads, which the target must not hold."""
    target = check_target(target, overwrite, what, inputs)
    remove_leftovers(target)
    target = check_target(target, overwrite, what, inputs)  # again: a folder moved aside by a killed write may be back
    partial = _sibling(target, _PARTIAL)
    partial.mkdir()
    try:
        write(partial)
        _readable(partial)
        _put_in_place(partial, target, overwrite, what)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _readable(folder: Path) -> None:
    """Files as readable as any the user writes: the umask decides (safetensors, and so diffusers'
    weights, create theirs owner-only, 0600, beside a 0644 config)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def check_target(target: str | Path, overwrite: bool, what: str = "out", inputs: Iterable[str | Path] = ()) -> Path:
    """The absolute target path, or an error when writing there would overwrite something
    without ``overwrite``, would replace the working folder (or one holding it), a folder
    behind a link, or a folder holding one of ``inputs``, or cannot work. Call it before long
    work, so that nothing is computed for a write that will be refused."""
    given = str(target)
    if not given.strip():
        raise ValueError(f"{what} is empty: give a folder path")
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        raise FileExistsError(f"{what}: {given} is a link (to {os.readlink(target)}): write to a new folder, or to the "
                              "linked folder itself")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{what}: {given} is a file, not a folder: give a folder path")
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise ValueError(f"{what}: {given} is the working folder or holds it: give a new folder for the output")
    for item in inputs:
        source = Path(item).resolve()
        if source == target.resolve() or target.resolve() in source.parents:
            raise ValueError(f"{what}: {given} holds {item}, which this command reads: write to another folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise _not_empty(target, given, what)
    check_writable(target.parent, what)
    return target


def check_writable(folder: Path, what: str = "out") -> None:
    """Make ``folder`` (and its parents) and prove a file can be written there (a nameless
    temporary file: nothing stays behind), or raise ``PermissionError`` naming ``what``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"{what}: cannot write in {folder} ({err.strerror or err})") from None


def remove_leftovers(target: Path) -> list[Path]:
    """Clear what killed writes into ``target`` left behind: the hidden folders of this
    machine's processes that no longer run. An old folder moved aside by the two-rename
    fallback is put back first when the kill left no ``target`` (it is the user's data)."""
    if os.name == "nt":  # no safe way to tell a dead process here: leave everything
        return []
    removed = []
    mine = re.compile(rf"\.{re.escape(target.name)}\.({_PARTIAL}|{_OLD})-{re.escape(_HOST)}-(\d+)-[0-9a-f]{{8}}")
    for path in sorted(target.parent.iterdir()):
        match = mine.fullmatch(path.name)
        if match is None or _running(int(match.group(2))):
            continue
        if match.group(1) == _OLD and not target.exists():
            os.rename(path, target)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"  # a shared disk has other machines' writers


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _not_empty(target: Path, given: str, what: str) -> FileExistsError:
    names = sorted(p.name for p in target.iterdir())
    shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    how = "--overwrite" if what.startswith("--") else "overwrite=True (--overwrite)"
    return FileExistsError(f"{what}: {given} is not empty ({shown}); pass {how} to replace it as a whole (everything in "
                           "it goes), or choose a new folder")


def _put_in_place(partial: Path, target: Path, overwrite: bool, what: str) -> None:
    if not overwrite or not target.exists():
        try:  # atomic; refuses a target that is (or has meanwhile become) a non-empty folder
            os.rename(partial, target)
        except OSError:
            if target.is_dir() and any(target.iterdir()):
                raise _not_empty(target, str(target), what) from None
            raise
        return
    if _exchange(partial, target):  # partial now holds the old folder
        shutil.rmtree(partial, ignore_errors=True)
        return
    old = _sibling(target, _OLD)  # no atomic exchange here: a short window without the target
    os.rename(target, old)  # (a kill inside it: the next write puts the old folder back)
    try:
        os.rename(partial, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
