"""End-to-end checks of the command line: fit, run folder, report, resume, bad input."""

import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from multimodal import FoundationModel, FoundationPipeline
from multimodal.cli import main
from train.module import FoundationModule

from conftest import ALIGN, JOINT, scaled_config


def tiny_config(tmp_path: Path, every_n: int = 2, **trainer) -> Path:
    return scaled_config(tmp_path, ALIGN, every_n=every_n, **trainer)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multimodal.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fit_writes_run_folder_report_and_model(tmp_path, capsys):
    assert main(["fit", "--config", str(tiny_config(tmp_path))]) == 0
    run = tmp_path / "runs" / "align" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["preset"] == "tiny" and saved["trainer"]["max_steps"] == 4
    assert saved["trainer"]["precision"] in ("32-true", "bf16-mixed")  # chosen by the model's step (or the matmul), recorded
    assert (run / "metrics.csv").read_text().count("val/zero_shot_acc") == 1
    assert (tmp_path / "runs/align/checkpoints/last.ckpt").is_file()
    out = capsys.readouterr().out
    assert "zero_shot_acc" in out and "t2i_R@1" in out and "val_predictions.png" in out
    from train.precision import cpu_bf16_could_pay
    assert ("precision: " in out) == cpu_bf16_could_pay()  # timed only where bf16 could pay
    assert (run / "val_predictions.png").stat().st_size > 1000
    pipe = FoundationPipeline.from_pretrained(run / "model")
    probs = pipe.classify(torch.rand(2, 3, 32, 32), ["red circle", "blue square"])
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))


@pytest.mark.parametrize("clip", [None, pytest.param("1.0", marks=pytest.mark.slow)])
def test_bf16_mixed_trains_on_cpu(tmp_path, clip):
    """bf16-mixed, also with gradient clipping (as the GPU configs do: no fused AdamW there)."""
    extra = ["--trainer.gradient_clip_val", clip] if clip else []
    assert main(["fit", "--config", str(tiny_config(tmp_path, max_steps=2)), "--trainer.precision", "bf16-mixed", *extra]) == 0
    lines = (tmp_path / "runs/align/version_0/metrics.csv").read_text().splitlines()
    losses = [float(v) for row in lines[1:] for k, v in zip(lines[0].split(","), row.split(",")) if k == "train/loss" and v]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def _ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


class KillAt(Callback):
    """SIGKILLs its own process when training step ``step`` is about to start (the checkpoint of
    the step before is on disk): a hard kill at a known point."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """Joint stage (every loss, EMA, random noise/timesteps/dropout), fp32: 10 steps straight
    vs. killed at step 5 (last checkpoint: step 4) and resumed with --ckpt_path last. Validation
    at steps 3, 6 and 9 sits on both sides of the kill."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    model = {}
    finals = {}
    for name in ("straight", "killed"):
        run = tmp_path / name
        run.mkdir()
        cfg = scaled_config(run, JOINT, every_n=2, model=model, max_steps=10, val_check_interval=3, precision="32-true")
        if name == "killed":
            data = yaml.safe_load(cfg.read_text())
            data["trainer"]["callbacks"].append({"class_path": "test_train.KillAt", "init_args": {"step": 5}})
            killing = run / "kill.yaml"
            killing.write_text(yaml.safe_dump(data))
            proc = subprocess.run([sys.executable, "-m", "multimodal.cli", "fit", "--config", str(killing)],
                                  cwd=run, capture_output=True, text=True, timeout=300, env=env)
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
            assert _ckpt_step(run / "runs/shapes/checkpoints/last.ckpt") == 4
            done = _cli("fit", "--config", str(cfg), "--ckpt_path", "last", cwd=run)
            assert "Restoring states from the checkpoint" in done.stderr + done.stdout
        else:
            done = _cli("fit", "--config", str(cfg), cwd=run)
        assert done.returncode == 0, done.stderr[-3000:]
        finals[name] = torch.load(run / "runs/shapes/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    a, b = finals["straight"], finals["killed"]
    assert a["global_step"] == b["global_step"] == 10
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diff = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])
    assert diff <= 1e-6, diff
    ema_a, ema_b = a["decoder_ema"]["shadow_params"], b["decoder_ema"]["shadow_params"]
    assert max((x - y).abs().max().item() for x, y in zip(ema_a, ema_b)) <= 1e-6
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert max((opt_a[i]["exp_avg"] - opt_b[i]["exp_avg"]).abs().max().item() for i in opt_a) <= 1e-6


def _main(capsys, *args: str) -> tuple[int, str]:
    """The command in this process (as the console script runs it): exit code and stderr."""
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argument errors exit from the parser
        code = exit_.code
    return code, capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["model"]["learning_rat"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    code, err = _main(capsys, "fit", "--config", str(bad))
    assert code != 0 and "learning_rat" in err
    code, err = _main(capsys, "fit", "--config", str(tiny_config(tmp_path)), "--model.overrides", '{"text": {"widht": 8}}')
    assert code == 2 and "widht" in err and "Traceback" not in err


def test_missing_data_path_is_named(tmp_path, capsys):
    code, err = _main(capsys, "fit", "--config", str(tiny_config(tmp_path)), "--data.source", "folder",
                      "--data.path", str(tmp_path / "nowhere"))
    assert code == 2 and "data.path" in err and "nowhere" in err


def test_wrong_image_size_is_named(tiny_model):
    with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\].*got \(2, 3, 64, 64\)"):
        tiny_model.encode_image(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="image_size"):
        tiny_model.encoders.encode_image(torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_stops_with_checkpoint_or_skips(tmp_path, monkeypatch, capsys, mode):
    from open_clip.loss import ClipLoss

    from multimodal.cli import main

    calls = {"n": 0}
    forward = ClipLoss.forward

    def nan_on_fourth_call(self, *args, **kwargs):
        calls["n"] += 1
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss  # the loss of step 3 (steps count from 0)

    monkeypatch.setattr(ClipLoss, "forward", nan_on_fourth_call)
    cfg = tiny_config(tmp_path, every_n=2, max_steps=6, val_check_interval=1000)
    code = main(["fit", "--config", str(cfg), "--model.on_nonfinite", mode])
    folder = tmp_path / "runs/align/checkpoints"
    if mode == "stop":
        err = capsys.readouterr().err
        assert code == 2 and "non-finite loss (nan) at step 3" in err
        saved = torch.load(folder / "nonfinite-step=3.ckpt", map_location="cpu", weights_only=True)
        last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
        assert saved["global_step"] == 3 and last["global_step"] == 2  # the last good checkpoint is intact
        for ckpt in (saved, last):
            assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    else:
        assert code == 0
        last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 6  # the run went on to max_steps
        assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
        assert "train/skipped_steps" in (tmp_path / "runs/align/version_0/metrics.csv").read_text()


@pytest.mark.parametrize("name", ["gpu1", "gpu8", "multinode"])
def test_gpu_configs_parse_and_their_model_config_is_valid(name, capsys):
    from multimodal.config import FoundationConfig

    path = ALIGN.parent / f"{name}.yaml"
    with pytest.raises(SystemExit) as done:  # every key is checked against the classes' signatures
        main(["fit", "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["stage"] == "joint" and printed["data"]["source"] == "webdataset"
    config = FoundationConfig.from_preset(printed["model"]["preset"], printed["model"]["overrides"])
    assert config.decoder is not None and config.language is not None
    assert printed["data"]["image_size"] == config.image.image_size


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_components_train_and_export_under_their_own_names(tmp_path):
    """model.compile: compiled in place, so checkpoints and the export keep the usual parameter names."""
    from conftest import ALIGN, scaled_config
    from multimodal.cli import main

    config = scaled_config(tmp_path, ALIGN, max_steps=2, val_check_interval=2)
    assert main(["fit", "--config", str(config), "--model.compile", "true"]) == 0
    model = FoundationModel.from_pretrained(tmp_path / "runs" / "align" / "model")
    assert not any("_orig_mod" in name for name in model.state_dict())


def test_cpu_precision_is_decided_by_the_best_try_not_a_slowed_one(monkeypatch):
    """Another job on the cores slows single timings; the fastest of interleaved tries decides."""
    from train import precision

    times = {torch.bfloat16: iter([0.9, 0.3, 0.3, 0.3, 0.3]), torch.float32: iter([1.0, 1.0, 1.0, 1.0, 1.0])}
    monkeypatch.setattr(precision, "_time_matmul", lambda dtype: next(times[dtype]))
    assert precision.bf16_matmul_ratio.__wrapped__() == pytest.approx(0.3)  # the first try alone (0.9 vs 1.0) would say 0.9
    times = {torch.bfloat16: iter([0.8] * 5), torch.float32: iter([1.0] * 5)}
    assert precision.bf16_matmul_ratio.__wrapped__() == pytest.approx(0.8)  # 0.8 is not a clear margin
    monkeypatch.setattr(precision, "bf16_matmul_ratio", lambda: 0.8)
    assert not precision.cpu_bf16_is_faster() and precision.cpu_bf16_could_pay()


@pytest.mark.parametrize("slow_under_autocast", [True, False])
def test_step_precision_is_the_faster_of_the_timed_steps(slow_under_autocast):
    """The model's own step decides, not a matmul: a step slower under bf16 autocast keeps fp32;
    the random streams are left as they were (the run trains as if nothing had been timed)."""
    from train.precision import faster_step_precision

    def step():
        torch.randn(3)  # draws from the global stream, as a denoising step does
        autocast = torch.is_autocast_enabled("cpu")
        time.sleep(0.05 if autocast == slow_under_autocast else 0.005)

    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    choice, seconds = faster_step_precision(step)
    assert torch.rand(1) == expected
    assert choice == ("32-true" if slow_under_autocast else "bf16-mixed")
    slow, fast = ("bf16-mixed", "32-true") if slow_under_autocast else ("32-true", "bf16-mixed")
    assert seconds[slow] >= 0.05 > seconds[fast]


def test_ctrl_c_before_training_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the model is built or the precision timed: a line and status 130, no traceback."""
    import train.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.cli, "run_cli", interrupted)
    assert main(["fit", "--config", "x.yaml"]) == 130
    assert capsys.readouterr().err == "multimodal fit: interrupted\n"


def test_probe_step_runs_forward_and_backward_without_leaving_a_trace():
    """What is timed is the stage's forward and backward at the model's sizes; no gradients,
    seen tokens or sample counts stay behind."""
    module = FoundationModule(preset="tiny", stage="joint")
    params = [p for p in module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    seen = module.seen_tokens.clone()
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    calls, grads = [], []
    module.model.register_forward_hook(lambda mod, args, out: calls.append(sorted(out)))
    for p in (params[0], params[-1]):
        p.register_hook(lambda g: grads.append(g.shape))
    step = module.probe_step(batch_size=1000)
    assert torch.rand(1) == expected  # building the step drew nothing from the global stream
    step()
    assert calls and {"caption_logits", "denoise_pred", "image_features"} <= set(calls[0])
    assert len(grads) == 2  # the backward ran, to the first and the last trained parameter
    assert all(p.grad is None for p in params) and all(torch.equal(a, b) for a, b in zip(before, params))
    assert torch.equal(module.seen_tokens, seen) and module.samples_seen == 0
