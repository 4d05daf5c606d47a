"""Commands start at once: what a command never uses is neither imported nor built.

Checked by what ends up in ``sys.modules`` and in the model (never by timing a test): the
``--help`` path imports no torch; zero-shot classification imports neither diffusers nor the
open_clip package and builds neither the decoder nor the language head."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from multimodal import FoundationConfig, FoundationModel, FoundationPipeline
from multimodal.model import OPTIONAL_HEADS

from conftest import ROOT


def _modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has imported after running ``code``."""
    script = code + "\nimport json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    FoundationModel(FoundationConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


def test_help_imports_no_torch():
    loaded = _modules_after("import sys; sys.argv = ['multimodal', '--help']\n"
                            "from multimodal.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass")
    assert not loaded & {"torch", "diffusers", "open_clip", "lightning"}, loaded


def test_zero_shot_classification_imports_neither_diffusers_nor_open_clip(saved_tiny):
    loaded = _modules_after(
        "from multimodal import FoundationPipeline\n"
        f"pipe = FoundationPipeline.from_pretrained({str(saved_tiny)!r}, components=(), allow_untrained=True)\n"
        f"print(pipe.classify([{str(ROOT / 'assets' / 'demo' / 'small_red_circle.png')!r}], ['red circle', 'blue square']))")
    assert "torch" in loaded  # the run did happen
    assert not loaded & {"diffusers", "open_clip", "lightning", "peft", "torchvision"}, loaded & {"diffusers", "open_clip"}


def test_components_load_only_the_heads_asked_for(saved_tiny):
    full = FoundationModel.from_pretrained(saved_tiny)
    encoders_only = FoundationModel.from_pretrained(saved_tiny, components=())
    language_only = FoundationModel.from_pretrained(saved_tiny, components=["language"])
    assert encoders_only.decoder is None and encoders_only.language is None
    assert encoders_only.skipped == OPTIONAL_HEADS and language_only.skipped == ("decoder",)
    assert language_only.language is not None and language_only.decoder is None
    assert encoders_only.config == full.config  # the folder's config, not a reduced one
    tokens = full.tokenize(["a red circle", "a blue square"])
    torch.testing.assert_close(encoders_only.encode_text(tokens), full.encode_text(tokens), rtol=0, atol=0)
    ids = torch.tensor([[full.tokenizer.sot_token_id, 320]])
    torch.testing.assert_close(language_only.language_logits(ids), full.language_logits(ids), rtol=0, atol=0)


def test_a_model_loaded_in_part_says_so_and_is_never_saved(saved_tiny, tmp_path):
    pipe = FoundationPipeline.from_pretrained(saved_tiny, components=(), allow_untrained=True)
    with pytest.raises(ValueError, match="loaded without its diffusion decoder"):
        pipe("a red circle", num_inference_steps=1, show_progress=False)
    with pytest.raises(ValueError, match="loaded without its language head"):
        pipe.caption([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match="saving it would lose them"):
        pipe.model.save_pretrained(tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    with pytest.raises(ValueError, match=r"components must be among \('decoder', 'language'\), got \['encoders'\]"):
        FoundationModel.from_pretrained(saved_tiny, components=("encoders",))
    for bad in ("decoder", 5, {"decoder": 1}):
        with pytest.raises(ValueError, match=r"components must be a list of heads among \('decoder', 'language'\), got"):
            FoundationModel.from_pretrained(saved_tiny, components=bad)


def test_tokenizer_without_the_open_clip_package_matches_open_clip():
    import open_clip

    from encoders.tokenizer import Tokenizer

    texts = ["a small red circle at the top left", "Ünïcode &amp; punctuation!?", ""]
    ours = Tokenizer(77)
    assert torch.equal(ours(texts), open_clip.tokenize(texts))
    assert type(ours._bpe).__module__ == "_open_clip_tokenizer"  # the file loaded alone (conftest imported it first)
    again = pickle.loads(pickle.dumps(ours))  # e.g. spawned dataloader workers: rebuilt from its settings
    assert torch.equal(again(texts), ours(texts))
