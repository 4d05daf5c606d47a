import math
from pathlib import Path

import pytest
import torch
import yaml

from multimodal import FoundationConfig, FoundationModel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model() -> FoundationModel:
    return FoundationModel(FoundationConfig.from_preset("tiny")).eval()


ROOT = Path(__file__).resolve().parents[1]
ALIGN = ROOT / "assets" / "configs" / "align.yaml"
DECODER = ROOT / "assets" / "configs" / "decoder.yaml"
JOINT = ROOT / "assets" / "configs" / "shapes.yaml"


def scaled_config(tmp_path: Path, source: Path, every_n: int = 2, model: dict | None = None, **trainer) -> Path:
    """A shipped config scaled down to the tiny preset, writing under ``tmp_path``."""
    cfg = yaml.safe_load(source.read_text())
    name = cfg["trainer"]["logger"]["init_args"]["name"]
    cfg["trainer"].update({"max_steps": 4, "val_check_interval": 2, "log_every_n_steps": 1,
                           "enable_progress_bar": False, "enable_model_summary": False, **trainer})
    for cb in cfg["trainer"]["callbacks"]:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("ModelCheckpoint"):
            args.update({"dirpath": str(tmp_path / f"runs/{name}/checkpoints"), "every_n_train_steps": every_n})
        if "export_to" in args:
            args["export_to"] = str(tmp_path / f"runs/{name}/model")
        if cb["class_path"].endswith("SampleGrid"):
            args.update({"every_n_steps": every_n, "num_images": 4})
        if cb["class_path"].endswith("ShapesGeneration"):
            args["num_prompts"] = 4
        if cb["class_path"].endswith("ShapesCaption"):
            args["max_new_tokens"] = 4
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    cfg["model"].update({"preset": "tiny", "warmup_steps": 1, "overrides": {"sampling": {"steps": 2}}, **(model or {})})
    cfg["data"].update({"batch_size": 16, "val_size": 48, "num_workers": 0})
    path = tmp_path / f"tiny_{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FOLDER = ROOT / "assets" / "configs" / "folder.yaml"
SMALL = {"overrides": {"image": {"image_size": 16, "patch_size": 8}, "decoder": {"image_size": 16}, "sampling": {"steps": 2}}}


def folder_config(tmp_path: Path, data: dict | None = None, **trainer) -> Path:
    """``folder.yaml`` scaled down (16-pixel tiny model, 4 steps) with ``data`` options."""
    path = scaled_config(tmp_path, FOLDER, model=SMALL, **trainer)
    cfg = yaml.safe_load(path.read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].startswith("train.report."):
            cb["init_args"] = {"num_images": 8}
    cfg["data"].update(data or {})
    path.write_text(yaml.safe_dump(cfg))
    return path


def image_folder(root: Path, n: int, captions: bool) -> Path:
    """``n`` 16-pixel images, with a same-name .txt caption each when ``captions``."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 20 % 255, 0, 0)).save(root / f"{i}.png")
        if captions:
            (root / f"{i}.txt").write_text(f"a red square number {i}")
    return root


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar shard with these members, in this order (webdataset groups neighbours by key)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def assert_same_computation(actual: torch.Tensor, expected: torch.Tensor, reduction: int, depth: int = 1) -> None:
    """The two results differ only by floating-point summation order (another kernel, another
    sequence length, another library's layout). Such differences grow like eps(dtype) *
    sqrt(reduction length) per layer of ``depth``, relative to the values' magnitude; the
    tolerance is that bound times 4, derived from the dtype and the computation, never from the
    machine the test was written on."""
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, expected.abs().max().item())
    tol = 4 * eps * math.sqrt(reduction) * depth * scale
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)
