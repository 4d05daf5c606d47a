"""The decoder stage end to end: frozen encoders, EMA, fidelity metric, export, generate."""

import subprocess
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from conftest import DECODER, scaled_config
from multimodal import FoundationConfig, FoundationModel
from multimodal.cli import main
from train.shapes import analyze


def test_decoder_stage_trains_decoder_only_and_exports(tmp_path, capsys):
    torch.manual_seed(0)
    init = FoundationModel(FoundationConfig.from_preset("tiny"))
    init.save_pretrained(tmp_path / "aligned")
    cfg = scaled_config(tmp_path, DECODER, model={"init_from": str(tmp_path / "aligned")})
    assert main(["fit", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "gen_cs_heldout" in out and "gen_cs_heldin" in out

    run = tmp_path / "runs/decoder/version_0"
    assert "val/gen_cs_heldout" in (run / "metrics.csv").read_text()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    before, after = init.state_dict(), load_file(str(run / "model/model.safetensors"))
    enc = [k for k in before if k.startswith("encoders.")]
    dec = [k for k in before if k.startswith("decoder.")]
    assert all(torch.equal(before[k], after[k]) for k in enc), "frozen encoders must not change"
    assert any(not torch.equal(before[k], after[k]) for k in dec)

    ckpt = torch.load(tmp_path / "runs/decoder/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert "decoder_ema" in ckpt and ckpt["global_step"] == 4
    exported = tmp_path / "exported"
    assert main(["export", "--ckpt", str(tmp_path / "runs/decoder/checkpoints/last.ckpt"), "--out", str(exported)]) == 0
    assert "global step 4" in (exported / "README.md").read_text()
    # a checkpoint of an earlier version (evaluation settings among the model's arguments) still exports
    ckpt["hyper_parameters"].update({"fidelity_images": 64, "guidance_scale": 3.0})
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "old_export")]) == 0
    assert torch.equal(load_file(str(tmp_path / "old_export/model.safetensors"))[dec[0]], load_file(str(exported / "model.safetensors"))[dec[0]])
    # the export carries the EMA decoder weights, as the end-of-fit model folder does
    ema_export, fit_export = load_file(str(exported / "model.safetensors")), after
    assert all(torch.equal(ema_export[k], fit_export[k]) for k in dec)
    UNet2DConditionModel.from_pretrained(str(exported / "decoder"))

    image = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "multimodal.cli", "generate", "a red circle", "--model", str(exported),
                             "--out", str(image), "--steps", "2", "--num-images", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    for path in (tmp_path / "x_0.png", tmp_path / "x_1.png"):
        with Image.open(path) as img:
            assert img.size == (32, 32)
            analyze(img)  # readable (an untrained decoder may draw nothing)


def test_generate_names_bad_arguments(tmp_path, capsys):
    FoundationModel(FoundationConfig.from_preset("tiny")).save_pretrained(tmp_path / "m")
    assert main(["generate", "x", "--model", str(tmp_path / "m"), "--steps", "0"]) == 2
    assert "--steps must be an integer in [1, 999]" in capsys.readouterr().err


def test_joint_stage_trains_both_losses_through_one_text_pass(tmp_path):
    from conftest import ROOT

    cfg = scaled_config(tmp_path, ROOT / "assets/configs/shapes.yaml", max_steps=2,
                        model={})
    assert main(["fit", "--config", str(cfg)]) == 0
    header, *rows = (tmp_path / "runs/shapes/version_0/metrics.csv").read_text().splitlines()
    logged = {k for row in rows for k, v in zip(header.split(","), row.split(",")) if v}
    assert {"train/contrastive", "train/diffusion", "train/caption", "val/zero_shot_acc", "val/gen_cs_heldout", "val/caption_acc"} <= logged
