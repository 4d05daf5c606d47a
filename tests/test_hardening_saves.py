"""Nothing a user saved is overwritten without ``overwrite=True`` / ``--overwrite``, and then it
is replaced as a whole and atomically: a SIGKILL at any moment leaves the old folder or the new
one, loadable, and what a killed save leaves behind is removed by the next save (issue 16, item 7)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from multimodal import FoundationConfig, FoundationModel
from multimodal.cli import main
from multimodal.config import AdapterConfig


def _model(value: float) -> FoundationModel:
    model = FoundationModel(FoundationConfig.from_preset("tiny"))
    with torch.no_grad():
        model.encoders.logit_scale.fill_(value)  # which model a folder holds
    return model


def _which(folder: Path) -> float:
    return round(float(FoundationModel.from_pretrained(folder).encoders.logit_scale), 3)


def test_saving_into_a_users_folder_needs_overwrite_and_then_replaces_it_whole(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"mine is not empty \(README.md, config.json\); pass overwrite=True"):
        _model(1.0).save_pretrained(folder)
    assert (folder / "README.md").read_text() == "my notes" and sorted(os.listdir(folder)) == ["README.md", "config.json"]
    _model(1.0).save_pretrained(folder, overwrite=True)
    # a stale diffusers shard of an earlier save would break diffusers' loading: the folder is replaced whole
    (folder / "decoder" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"stale")
    _model(2.0).save_pretrained(folder, overwrite=True)
    assert _which(folder) == 2.0 and not list(folder.rglob("*00001-of-00002*"))
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(folder / "decoder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        _model(1.0).save_pretrained(folder / "README.md")


def test_adapters_merge_and_export_refuse_to_overwrite(tmp_path, capsys):
    base = _model(1.0).save_pretrained(tmp_path / "base")
    model = FoundationModel.from_pretrained(base).add_adapter(AdapterConfig(components=("text",), r=2))
    adapter = model.save_adapter(tmp_path / "adapter", base_model=base)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        model.save_adapter(adapter, base_model=base)
    model.save_adapter(adapter, base_model=base, overwrite=True)
    weights = (base / "model.safetensors").read_bytes()
    for out, message in ((base, "is the adapter's base model"), (adapter, "which this command reads")):  # inputs are never the output
        assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    assert main(["merge", "--adapter", str(adapter), "--out", str(other)]) == 2
    assert "pass --overwrite to replace it as a whole" in capsys.readouterr().err and (other / "keep.txt").exists()
    assert main(["merge", "--adapter", str(adapter), "--out", str(other), "--overwrite"]) == 0
    assert not (other / "keep.txt").exists() and _which(other) == 1.0
    assert (base / "model.safetensors").read_bytes() == weights
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(base)]) == 2  # refused before the checkpoint is read
    assert "pass --overwrite to replace it as a whole" in capsys.readouterr().err
    assert (base / "model.safetensors").read_bytes() == weights


def test_overwrite_never_replaces_the_working_folder_a_link_or_a_folder_holding_the_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.txt").write_text("years of work")
    run = tmp_path / "run1"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    for out, message in (("", "--out is empty"), (".", "is the working folder or holds it"), (str(tmp_path.parent), "working folder"),
                         (str(run), "holds " + str(ckpt)), ("link", "is a link (to")):
        assert main(["export", "--ckpt", str(ckpt), "--out", out, "--overwrite"]) == 2, out
        assert message in capsys.readouterr().err, out
    assert main(["prepare", "digits", ".", "--overwrite"]) == 2
    assert "working folder" in capsys.readouterr().err
    assert (tmp_path / "thesis.txt").read_text() == "years of work" and ckpt.is_file() and (real / "keep.txt").is_file()


def test_leftovers_are_recognised_by_their_exact_names_and_an_old_folder_is_put_back(tmp_path, monkeypatch):
    import multimodal.folders as folders

    target = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    backup = tmp_path / ".model.old-2024-01-05"  # the user's own backup, not ours
    backup.mkdir()
    leftover = tmp_path / f".model.partial-{folders._HOST}-{dead}-0123abcd"
    leftover.mkdir()
    aside = tmp_path / f".model.old-{folders._HOST}-{dead}-89abcdef"  # a kill between the fallback's two renames
    _model(1.0).save_pretrained(aside)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):  # the old folder is back, and kept
        _model(2.0).save_pretrained(target)
    assert _which(target) == 1.0 and backup.is_dir() and not leftover.exists() and not aside.exists()
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)  # the two-rename fallback (macOS, Windows)
    _model(2.0).save_pretrained(target, overwrite=True)
    assert _which(target) == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == [".model.old-2024-01-05", "model"]


def test_a_folder_filled_during_a_write_is_not_replaced_without_overwrite(tmp_path):
    from multimodal.folders import write_folder

    target = tmp_path / "report"

    def write(folder):
        (folder / "new.txt").write_text("new")
        target.mkdir()
        (target / "users_file").write_text("mine")  # another process, meanwhile

    with pytest.raises(FileExistsError, match="not empty"):
        write_folder(target, write)
    assert [p.name for p in target.iterdir()] == ["users_file"] and [p.name for p in tmp_path.iterdir()] == ["report"]


POINTS = {"writing weights": 1.0, "before the swap": 1.0, "right after the swap": 2.0, "removing the old folder": 2.0}
CHILD = textwrap.dedent("""
    import os, pathlib, signal, sys
    import torch
    import multimodal.folders as folders
    import multimodal.model as model_module
    from multimodal import FoundationConfig, FoundationModel

    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    def kill_at(point):
        if point == "writing weights":  # half the file written, then killed
            def save_file(state, path, metadata=None):
                open(path, "wb").write(b"x" * 1000)
                die()
            model_module.save_file = save_file
        elif point == "before the swap":
            folders._put_in_place = lambda *args: die()
        elif point == "right after the swap":
            exchange = folders._exchange
            folders._exchange = lambda a, b: (exchange(a, b), die())
        elif point == "removing the old folder":
            def rmtree(path, ignore_errors=False):
                next(p for p in sorted(pathlib.Path(path).rglob("*")) if p.is_file()).unlink()
                die()
            folders.shutil.rmtree = rmtree

    model = FoundationModel(FoundationConfig.from_preset("tiny"))
    with torch.no_grad():
        model.encoders.logit_scale.fill_(2.0)
    for target, point in zip(sys.argv[1::2], sys.argv[2::2]):  # one forked process per point: one import
        pid = os.fork()
        if pid == 0:
            kill_at(point)
            model.save_pretrained(target, overwrite=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(point, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL)
""")


@pytest.mark.slow  # four killed processes (one import, forked): ~13 s
def test_a_save_killed_at_any_point_leaves_a_loadable_folder(tmp_path):
    targets = {point: tmp_path / str(i) / "model" for i, point in enumerate(POINTS)}
    for target in targets.values():
        _model(1.0).save_pretrained(target)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [str(x) for point, target in targets.items() for x in (target, point)]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count("True") == len(POINTS), result.stdout + result.stderr
    for point, target in targets.items():
        assert _which(target) == POINTS[point], point  # the old folder or the new one, whole
        left = [p.name for p in target.parent.iterdir() if p.name != "model"]
        assert all(n.startswith(".model.partial-") or n.startswith(".model.old-") for n in left), (point, left)
        _model(3.0).save_pretrained(target, overwrite=True)  # the next save clears what the killed one left
        assert _which(target) == 3.0 and [p.name for p in target.parent.iterdir()] == ["model"], point


def test_saved_files_are_as_readable_as_the_umask_says(tmp_path):
    """safetensors writes owner-only (0600) files; a saved folder's files follow the umask, as its config does."""
    mask = os.umask(0o022)
    try:
        _model(1.0).save_pretrained(tmp_path / "model")
    finally:
        os.umask(mask)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_an_output_image_that_is_a_link_is_refused_even_with_overwrite(tmp_path):
    """--overwrite replaces the image named, never a file a link points at."""
    from multimodal.checks import check_image_path

    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    link = tmp_path / "link.png"
    link.symlink_to(precious)
    with pytest.raises(ValueError, match="is a link"):
        check_image_path(link, overwrite=True)
    assert precious.read_text() == "mine"
