"""What a model knows: which components were trained (``config.training``) and which words its
training captions contained (``vocabulary.json``: the token ids seen). Inference refuses a
component that was never trained, naming the command that trains it, and reports prompt words
the model never saw, so that noise and guesses are never passed off as answers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable

from .config import FoundationConfig, read_json

VOCABULARY_NAME = "vocabulary.json"

_STAGE = {"text": "align", "image": "align", "decoder": "decoder", "language": "language"}
_PURPOSE = {"text": "the text encoder", "image": "the image encoder", "decoder": "the image decoder (generation)",
            "language": "the language head (captions, completion)"}


def train_command(config: FoundationConfig, component: str, folder: str | None = None) -> str:
    """The command that trains ``component`` of the model in ``folder``, on the data its last
    run used (the shapes recipes for shapes data, ``folder.yaml`` for a user's data)."""
    runs = config.training.runs if config.training else []
    data = next((r["data"] for r in reversed(runs) if isinstance(r.get("data"), dict)), {})
    start = f" --model.init_from {folder}" if folder else " --model.init_from MODEL_FOLDER"
    if data.get("source") in (None, "shapes"):
        recipe = {"align": "align.yaml", "decoder": "decoder.yaml", "language": "language.yaml"}[_STAGE[component]]
        return f"multimodal fit --config assets/configs/{recipe}{start}"
    return (f"multimodal fit --config assets/configs/folder.yaml{start} --model.stage {_STAGE[component]} "
            f"--data.source {data['source']} --data.path {data.get('path')} (with the --model.preset / --model.overrides "
            "the model was trained with)")


class UntrainedComponentError(ValueError):
    """A component of the model was never trained (its record says 0 steps)."""


class UnseenWordsWarning(UserWarning):
    """Words of the input never occurred in the model's training captions."""


class UntrainedComponentWarning(UserWarning):
    """An untrained component was run anyway (``allow_untrained=True``): its output is noise."""


def check_trained(config: FoundationConfig, components: Iterable[str], allow_untrained: bool = False,
                  folder: str | None = None) -> None:
    """Raise ``UntrainedComponentError`` (or warn, with ``allow_untrained``) for each of
    ``components`` the model's training record says was never trained; a model without a
    record (unknown history) passes."""
    record = config.training
    if record is None:
        return
    for name in components:
        if record.trained(name):
            continue
        message = (f"{_PURPOSE[name]} of this model was never trained (config.json training.steps.{name} = 0), "
                   f"so its output would be noise. Train it: {train_command(config, name, folder)}")
        if not allow_untrained:
            raise UntrainedComponentError(message + " (or pass allow_untrained=True / --allow-untrained to run it anyway)")
        warnings.warn(message, UntrainedComponentWarning, stacklevel=3)


def trained_components(config: FoundationConfig) -> list[str]:
    """The components the record says were trained (all present ones when there is no record)."""
    present = ["text", "image"] + [c for c in ("decoder", "language") if getattr(config, c) is not None]
    return present if config.training is None else [c for c in present if config.training.trained(c)]


# ---- vocabulary ---------------------------------------------------------------------------------
def save_vocabulary(directory: str | Path, token_ids: Iterable[int]) -> Path:
    path = Path(directory) / VOCABULARY_NAME
    ids = sorted({int(i) for i in token_ids})
    path.write_text(json.dumps({"about": "token ids that occurred in this model's training captions", "token_ids": ids}) + "\n")
    return path


def load_vocabulary(directory: str | Path, vocab_size: int = 49408) -> frozenset[int] | None:
    """The token ids seen in training, or None when the folder does not say (unknown). Every id
    must be an integer in [0, vocab_size) and there must be one: a compact vocabulary indexes by them."""
    path = Path(directory) / VOCABULARY_NAME
    if not path.is_file():
        return None
    try:
        ids = read_json(path)["token_ids"]
        if not isinstance(ids, list) or not ids:
            raise ValueError("token_ids must be a non-empty list")
        bad = [i for i in ids if type(i) is not int or not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
        return frozenset(ids)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a vocabulary file ({err})") from None


def unseen_words(tokenizer, vocabulary: frozenset[int] | None, texts: str | Iterable[str]) -> list[str]:
    """The words of ``texts`` (in order, once each) with a token the model never saw in
    training; empty when all were seen or when the vocabulary is unknown."""
    if vocabulary is None:
        return []
    out: list[str] = []
    for text in [texts] if isinstance(texts, str) else texts:
        for word, ids in tokenizer.word_ids(text):
            if any(ch.isalnum() for ch in word) and not set(ids) <= vocabulary and word not in out:
                out.append(word)
    return out


def unseen_message(words: list[str]) -> str:
    return (f"the model never saw {', '.join(repr(w) for w in words)} in its training captions: "
            "what it makes of them is a guess")


def knowledge_summary(config: FoundationConfig, vocabulary: frozenset[int] | None, tokenizer, max_words: int = 60) -> str:
    """One line on what a model knows: the data it was trained on (from its record) and the
    words of its training captions, so that a page or a card can say it up front."""
    runs = config.training.runs if config.training else []
    sources = []
    for run in runs:
        data = run.get("data") if isinstance(run.get("data"), dict) else {}
        name = ("the embedded captioned-shapes data" if data.get("source") in (None, "shapes")
                else f"{data.get('source')} data{' in ' + Path(str(data['path'])).name if data.get('path') else ''}")
        if name not in sources:
            sources.append(name)
    steps = sum(int(r.get("steps", 0)) for r in runs)
    trained = f"Trained on {' and '.join(sources)} ({steps} steps)" if sources else "Training history unknown"
    if vocabulary is None:
        return trained + "; the words of its training captions are unknown."
    special = {tokenizer.sot_token_id, tokenizer.eot_token_id}
    decoded = (tokenizer.decode([i]).strip() for i in vocabulary if i not in special)
    words = sorted({w for w in decoded if any(c.isalnum() for c in w)})
    shown = ", ".join(words[:max_words]) + (f" and {len(words) - max_words} more" if len(words) > max_words else "")
    return f"{trained}; it knows {len(words)} words: {shown}. Any other word is a guess."
