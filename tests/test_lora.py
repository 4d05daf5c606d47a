"""LoRA adapters: injection, save/load, merge/unload, base checks, and a LoRA fine-tune from the
shipped model on shapes it never saw."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffusion.decoder import TextCondition
from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.adapt import labeled_folder
from multimodal.templates import DEFAULT_TEMPLATES
from multimodal.cli import main
from multimodal.demo import SHIPPED_MODEL
from multimodal.config import AdapterConfig
from multimodal.files import ADAPTER_WEIGHTS
from multimodal.lora import count_parameters, weights_sha256
from train.module import FoundationModule
from train.shapes import write_new_domain

from conftest import ROOT, assert_same_computation

ALL = ["text", "image", "decoder", "language"]


def _outputs(model: FoundationModel) -> dict[str, torch.Tensor]:
    """Every component's output on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=g)
    texts = ["a red circle", "a small blue square at the top left"]
    cond = model.text_condition(texts)
    with torch.no_grad():
        return {
            "text": model.encode_text(texts), "image": model.encode_image(images),
            "decoder": model.decoder(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 500]), TextCondition(*cond)),
            "language": model.language_logits(model.tokenize(texts), model.image_tokens(images)),
        }


def _randomize_lora(model: FoundationModel) -> None:
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05


def test_adapter_save_load_merge_unload(tiny_model, tmp_path):
    base_dir = tiny_model.save_pretrained(tmp_path / "base")
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    before = _outputs(tiny_model)
    tiny_model.add_adapter(AdapterConfig(components=ALL, r=2, alpha=4))
    assert all(torch.equal(before[k], v) for k, v in _outputs(tiny_model).items()), "a fresh adapter (B = 0) must not change outputs"
    trainable, total = count_parameters(tiny_model)
    assert trainable / total <= 0.05
    _randomize_lora(tiny_model)
    adapted = _outputs(tiny_model)
    assert all((adapted[k] - before[k]).abs().max() > 1e-4 for k in ALL), "every component's adapter must act"
    with pytest.raises(ValueError, match="save_adapter"):
        tiny_model.save_pretrained(tmp_path / "nope")

    out = tiny_model.save_adapter(tmp_path / "adapter", base_model=base_dir)
    saved = load_file(str(out / ADAPTER_WEIGHTS))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved), "only the adapter is saved"
    assert {k.split(".")[0] for k in saved} == set(ALL)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model"] == str(base_dir) and config["base_sha256"] == weights_sha256(base_dir)

    # the adapter folder alone brings its base; outputs equal the in-memory adapted model
    pipe = FoundationPipeline.from_pretrained(out)
    # the same weights and computation, reloaded: equal up to fp32 summation order (UNet convs: 3x3x32 terms)
    for k, v in _outputs(pipe.model).items():
        assert_same_computation(v, adapted[k], reduction=9 * 32, depth=2)
    # merge: the same outputs from plain weights, W + (alpha / r) B A
    layer = pipe.model.encoders.text.transformer.blocks[0].attn.qkv
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    pipe.merge_adapter()
    assert pipe.model.adapter is None and isinstance(pipe.model.encoders.text.transformer.blocks[0].attn.qkv, torch.nn.Linear)
    assert_same_computation(pipe.model.encoders.text.transformer.blocks[0].attn.qkv.weight, expected, reduction=2)  # B @ A: r = 2 terms
    assert all(torch.allclose(v, adapted[k], atol=1e-5) for k, v in _outputs(pipe.model).items())
    merged_dir = pipe.save_pretrained(tmp_path / "merged")
    assert all(torch.allclose(v, adapted[k], atol=1e-5) for k, v in _outputs(FoundationModel.from_pretrained(merged_dir)).items())
    # unload: the base again, bit for bit, with the same parameter names
    tiny_model.unload_adapter()
    state = tiny_model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    assert all(torch.equal(before[k], v) for k, v in _outputs(tiny_model).items())
    with pytest.raises(ValueError, match="no LoRA adapter"):
        tiny_model.unload_adapter()


def test_adapter_is_refused_on_another_base(tiny_model, tmp_path):
    base_dir = tiny_model.save_pretrained(tmp_path / "base")
    other = FoundationModel(FoundationConfig.from_preset("tiny")).save_pretrained(tmp_path / "other")
    tiny_model.add_adapter(AdapterConfig(components=["text"], r=2))
    adapter = tiny_model.save_adapter(tmp_path / "adapter", base_model=base_dir)
    with pytest.raises(ValueError, match="not the same base model"):
        FoundationPipeline.from_pretrained(other, adapter=adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model"] = str(tmp_path / "moved")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="moved"):
        FoundationPipeline.from_pretrained(adapter)
    assert FoundationPipeline.from_pretrained(base_dir, adapter=adapter).model.adapter is not None


def test_bad_adapter_settings_are_named(tiny_model):
    with pytest.raises(ValueError, match="lora components"):
        AdapterConfig(components=["text", "vision"])
    with pytest.raises(ValueError, match="lora r"):
        AdapterConfig(r=0)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(ValueError, match="match no module of component 'image'"):
        tiny_model.add_adapter(AdapterConfig(components=["text", "image"], targets={"image": ["no_such_layer"]}))
    assert tiny_model.adapter is None and tiny_model.state_dict().keys() == before.keys(), "a failed add leaves no LoRA layer"
    assert all(p.requires_grad for p in tiny_model.parameters())
    with pytest.raises(ValueError, match=r"components \['decoder'\] are frozen by stage 'align'"):
        FoundationModule(preset="tiny", stage="align", lora=AdapterConfig(components=["text", "decoder"]))


def test_lora_needs_the_exact_base_and_a_consistent_adapter(tiny_model, tmp_path):
    base_dir = tiny_model.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="model.lora: model.init_from .* does not match"):
        FoundationModule(preset="tiny", overrides={"text": {"width": 64}}, init_from=str(base_dir), lora=AdapterConfig())
    module = FoundationModule(preset="tiny", init_from=str(base_dir), lora=AdapterConfig(components=["text"], r=2))
    assert module.model.adapter.base_sha256 == weights_sha256(base_dir)  # recorded when training starts
    adapter = module.model.save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="model.lora differs from the adapter"):
        FoundationModule(preset="tiny", init_from=str(adapter), lora=AdapterConfig(components=["text"], r=4))
    continued = FoundationModule(preset="tiny", init_from=str(adapter))  # continue it: base, then adapter
    assert continued.model.adapter.r == 2 and continued.base_model == str(base_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match="shapes do not match"):
        FoundationPipeline.from_pretrained(adapter)


def _zero_shot(pipe: FoundationPipeline, folder: Path) -> float:
    paths, labels, classes = labeled_folder(folder)
    probs = pipe.classify([str(p) for p in paths], classes, templates=list(DEFAULT_TEMPLATES))
    return (probs.argmax(-1) == torch.tensor(labels)).float().mean().item()


@pytest.mark.slow
def test_lora_fine_tune_of_the_shipped_model_on_new_shapes(tmp_path, capsys):
    """assets/configs/lora.yaml at a smaller scale (fewer steps and images; the full run is in
    the README): only the adapter trains, the base stays bit-identical, and zero-shot accuracy
    on the four new shapes rises from near chance."""
    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        pytest.skip("the shipped model is not in this checkout")
    data = tmp_path / "new_shapes"
    write_new_domain(data / "train", count=1280, seed=0)
    write_new_domain(data / "val", count=120, seed=1)
    base = FoundationPipeline.from_pretrained(SHIPPED_MODEL)
    before = _zero_shot(base, data / "val")
    assert before <= 0.4, f"the shipped model should not know the new shapes yet (chance 0.25), got {before}"
    sha = weights_sha256(SHIPPED_MODEL)

    cfg = yaml.safe_load((ROOT / "assets/configs/lora.yaml").read_text())
    cfg["trainer"].update({"max_steps": 200, "val_check_interval": 200, "enable_progress_bar": False})
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["dirpath"] = str(tmp_path / "ckpt")
        if cb["class_path"].endswith("ExportModel"):
            cb["init_args"]["export_to"] = str(tmp_path / "adapter")
    cfg["model"]["init_from"] = str(SHIPPED_MODEL)
    cfg["data"].update({"path": str(data / "train"), "val_path": str(data / "val"), "batch_size": 128, "num_workers": 0})
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "multimodal.cli", "fit", "--config", str(config)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = (next((tmp_path / "runs" / "lora").glob("version_*")) / "metrics.csv").read_text()
    assert "val/zero_shot_acc" in metrics  # data.class_folders: validation scores the subfolder classes
    share = float(re.search(r"trainable parameters = ([0-9.]+)% of the model", run.stdout + run.stderr).group(1))
    assert share <= 5.0

    # the base weights in the final checkpoint are the shipped ones, bit for bit; the file is untouched
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    shipped = FoundationModel.from_pretrained(SHIPPED_MODEL).state_dict()
    base_part = {k.removeprefix("model.").replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    assert base_part.keys() == shipped.keys()
    assert all(torch.equal(base_part[k], shipped[k]) for k in shipped)
    assert weights_sha256(SHIPPED_MODEL) == sha
    assert all("lora_" in k for k in load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS)))

    after = _zero_shot(FoundationPipeline.from_pretrained(tmp_path / "adapter"), data / "val")
    assert after >= 0.75 and after >= before + 0.4, f"zero-shot on the new shapes: {before:.3f} -> {after:.3f}"
    # the CLI applies it (--adapter) and merges it (multimodal merge) to the same predictions
    image = str(next((data / "val" / "star").iterdir()))
    for args in (["--adapter", str(tmp_path / "adapter")], None):
        if args is None:
            assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
            capsys.readouterr()
            args = ["--model", str(tmp_path / "merged")]
        assert main(["classify", image, "--labels", "star, cross, hexagon, heart", "--top", "1", *args]) == 0
        out = capsys.readouterr().out
        assert out.strip().split("\t")[1].startswith("star"), out


def test_lora_fit_on_every_component(tiny_model, tmp_path):
    """Joint stage with adapters on all four components: every adapter gets gradients and
    changes, the base does not, and the export is the adapter alone."""
    from conftest import JOINT, scaled_config

    base_dir = tiny_model.save_pretrained(tmp_path / "base")
    lora = {"components": ALL, "r": 2, "alpha": 4.0}
    config = scaled_config(tmp_path, JOINT, model={"init_from": str(base_dir), "lora": lora, "lr": 0.01},
                           max_steps=2, val_check_interval=2)
    assert main(["fit", "--config", str(config)]) == 0
    name = yaml.safe_load(JOINT.read_text())["trainer"]["logger"]["init_args"]["name"]
    state = torch.load(next((tmp_path / "runs" / name / "checkpoints").glob("last*.ckpt")), map_location="cpu",
                       weights_only=True)["state_dict"]
    base = tiny_model.state_dict()
    base_part = {k.removeprefix("model.").replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    assert base_part.keys() == base.keys() and all(torch.equal(base_part[k], base[k]) for k in base)
    trained = {k: v for k, v in state.items() if "lora_B" in k}
    prefixes = {"text": "model.encoders.text.", "image": "model.encoders.image.", "decoder": "model.decoder.", "language": "model.language."}
    for part, prefix in prefixes.items():  # B starts at zero: non-zero means that component's adapter trained
        assert any(v.abs().max() > 0 for k, v in trained.items() if k.startswith(prefix)), part
    exported = tmp_path / "runs" / name / "model"
    assert {k.split(".")[0] for k in load_file(str(exported / ADAPTER_WEIGHTS))} == set(ALL)
    adapted = FoundationPipeline.from_pretrained(exported)
    assert adapted.model.adapter.components == ALL
    want = _outputs(adapted.model)
    # multimodal export of the checkpoint: the adapter (same outputs), or --merge: a full model (same outputs)
    ckpt = str(next((tmp_path / "runs" / name / "checkpoints").glob("last*.ckpt")))
    assert main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "exp")]) == 0
    assert main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "full"), "--merge"]) == 0
    for model in (FoundationPipeline.from_pretrained(tmp_path / "exp").model, FoundationModel.from_pretrained(tmp_path / "full")):
        assert all(torch.allclose(v, want[k], atol=1e-5) for k, v in _outputs(model).items())
