"""The command line explains itself: every option of every subcommand has a line of meaning, its
default and its choices in ``--help``; ``--device`` works on every inference command; the
README's commands parse."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal.cli import main
from multimodal.cli_parser import parser

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("export", "merge", "generate", "caption", "classify", "complete", "probe", "evaluate", "prepare", "demo")
INFERENCE = ("generate", "caption", "classify", "complete", "probe", "demo")


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> dict[str, str]:
    """Each ``--option`` entry of an argparse help text: its whole text (first line and the
    wrapped lines under it)."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"  (-\w, )?(--[\w.+-]+)", line)
        if match:
            current = match.group(2)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
    entries.pop("--help", None)
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_default_and_choices(capsys, command):
    text = _help(capsys, command)
    entries = _options(text)
    assert entries, text
    actions = {a.option_strings[-1]: a for a in parser()._subparsers._group_actions[0].choices[command]._actions if a.option_strings}
    for name, entry in entries.items():
        action = actions[name]
        flag = action.nargs == 0
        words = entry.split(None, 2 if flag else 3)
        assert len(words) > (1 if flag else 2), f"{command} {name}: no help text: {entry!r}"
        if not flag:
            assert "default" in entry or "required" in entry, f"{command} {name}: no default: {entry!r}"
        if action.choices:
            assert "{" + ",".join(action.choices) + "}" in entry, f"{command} {name}: choices not shown: {entry!r}"
    for name in ("prompt", "images", "text", "dataset", "out"):  # positionals say what they are, too
        match = re.search(rf"^  {name}\s+(\S.*)$", text.split("options:")[0], re.M)
        if re.search(rf"^  {name}\b", text.split("options:")[0], re.M):
            assert match, f"{command} {name}: no help text"


@pytest.mark.parametrize("command", INFERENCE)
def test_inference_commands_take_device(capsys, command):
    assert "--device" in _options(_help(capsys, command))


def test_device_is_checked_before_any_work(capsys):
    image = str(ROOT / "assets" / "demo" / "small_red_circle.png")
    assert main(["classify", image, "--labels", "red circle, blue square", "--device", "cpu"]) == 0
    assert "red circle" in capsys.readouterr().out.split("\t")[1]
    assert main(["classify", image, "--labels", "red circle, blue square", "--device", "tpu:3"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N, got 'tpu:3'" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["classify", image, "--labels", "red circle, blue square", "--device", "cuda"]) == 2
        assert "--device cuda: no such CUDA device here" in capsys.readouterr().err


def _readme_commands() -> list[list[str]]:
    """Every ``multimodal <command> ...`` line of the README's bash blocks, as arguments."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        for part in re.split(r"&&|;", line.split("  #")[0]):
            words = shlex.split(part.strip(), comments=True)
            if len(words) >= 2 and words[0] == "multimodal":
                commands.append(words[1:])
    return commands


def test_readme_commands_parse():
    commands = _readme_commands()
    assert len(commands) > 15
    plain = [c for c in commands if c[0] in COMMANDS]
    for args in plain:  # argparse accepts every flag (nothing runs: parse only)
        parser().parse_args([a for a in args if a != "[--merge]"])


@pytest.mark.slow
def test_readme_training_commands_parse(monkeypatch):
    """The README's fit / test / validate lines, each checked by LightningCLI (--print_config runs nothing)."""
    training = [c for c in _readme_commands() if c[0] in ("fit", "test", "validate")]
    assert training
    from train.cli import run_cli

    monkeypatch.chdir(ROOT)
    for args in training:  # in this process: one import for all
        args = [a for a in args if a not in ("--ckpt_path", "last")]
        with pytest.raises(SystemExit) as done:
            run_cli([*args, "--print_config"])
        assert done.value.code in (0, None), args


def test_fit_help_explains_model_and_data_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "Args::" not in text and "Base class for all optimizers" not in text and "--optimizer" not in text
    entries = _options(text)
    for name, words in {"--model.stage": ("align", "joint"), "--model.preset": ("tiny", "shapes", "base"),
                        "--data.source": ("shapes", "folder", "webdataset", "hf"), "--data.batch_size": ("samples",),
                        "--model.lr": ("learning rate",)}.items():
        assert all(w in entries[name] for w in words), (name, entries[name])
    bare = []
    for name, entry in entries.items():
        meaning = re.sub(r", --\S+ \S+", "", re.sub(r"\(type:.*", "", entry)).split(None, 2)
        if name.startswith(("--model.", "--data.")) and not name.endswith(".help") and len(meaning) < 3:
            bare.append(name)
    assert not bare, f"options with a type but no meaning: {bare}"


def _quiet_lines(output: str) -> list[str]:
    """Lines of a command's output other than progress-bar redraws."""
    lines = [line.strip() for chunk in output.split("\n") for line in chunk.split("\r")]
    return [line for line in lines if line and not re.match(r"^(sampling|Epoch|Validation|Testing)\b|^\d+%|^[━─ ]+$", line)]


@pytest.mark.slow
def test_generate_prints_only_progress_and_the_path(tmp_path):
    done = subprocess.run([sys.executable, "-m", "multimodal.cli", "generate", "a red circle", "--out", str(tmp_path / "x.png"),
                           "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {tmp_path / 'x.png'}\n"
    assert _quiet_lines(done.stderr) == [], done.stderr


@pytest.mark.slow
def test_fit_prints_no_warning_a_user_cannot_act_on(tmp_path):
    from conftest import ALIGN, scaled_config

    config = scaled_config(tmp_path, ALIGN, enable_progress_bar=True, enable_model_summary=True)
    done = subprocess.run([sys.executable, "-m", "multimodal.cli", "fit", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = (done.stdout + done.stderr).replace(str(tmp_path), "TMP")  # (the folder's name has "warning" in it)
    warnings_seen = [line for line in output.splitlines() if re.search(r"Warning|warning:|deprecat|💡|Tip:", line)]
    assert warnings_seen == [], warnings_seen
    assert "v_num" not in output and "/-2" not in output
    assert re.search(r"^step 4/4, train/loss \S+, [\d.]+ s/step$", output, re.M), output  # off a terminal: progress as lines
    assert "next: use the model in" in output


def test_pipeline_errors_name_the_command_line_options(capsys, tmp_path):
    image = str(ROOT / "assets" / "demo" / "small_red_circle.png")
    assert main(["caption", image, "--num-beams", "999"]) == 2
    assert "error: --num-beams must be in [1, 16], got 999" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--steps", "-1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "num_inference_steps" not in err, err


@pytest.mark.parametrize("seed", ["-1", "2147483648", "99999999999999999999"])
def test_seeds_outside_the_demos_range_are_refused(capsys, tmp_path, seed):
    assert main(["generate", "a red circle", "--seed", seed, "--out", str(tmp_path / "x.png")]) == 2
    assert f"--seed must be in [0, 2147483647], got {seed}" in capsys.readouterr().err
