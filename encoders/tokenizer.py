"""open_clip's BPE tokenizer (vocabulary ships inside the open_clip package: no download)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch


def _open_clip_tokenizer_module():
    """open_clip's ``tokenizer`` module, the same file, without running the package's
    ``__init__`` (which imports torchvision and every model: seconds that a command that only
    tokenizes should not wait). Loaded under a private name, so ``import open_clip`` later
    stays exactly as open_clip makes it."""
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.tokenizer")
    name = "_open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ImportError("open_clip (pip install open-clip-torch) provides the tokenizer")
    path = Path(package.submodule_search_locations[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.is_file():  # e.g. a zipped install: the ordinary import
        return importlib.import_module("open_clip.tokenizer")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a future tokenizer.py with relative imports: the ordinary import
        del sys.modules[name]
        return importlib.import_module("open_clip.tokenizer")
    return module


SimpleTokenizer = _open_clip_tokenizer_module().SimpleTokenizer


class Tokenizer:
    """Callable: str or list of str -> LongTensor [B, context_length], padded with 0."""

    def __init__(self, context_length: int = 77):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._bpe.encoder)
        self.sot_token_id = self._bpe.sot_token_id
        self.eot_token_id = self._bpe.eot_token_id

    def __reduce__(self):  # pickled by its settings: the BPE class may live under a private module name
        return (Tokenizer, (self.context_length,))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a string or a list of strings")
        return self._bpe(list(texts), context_length=self.context_length)

    def overflows(self, texts: list[str]) -> list[bool]:
        """Which texts are longer than the context (and so get truncated by ``__call__``)."""
        room = self.context_length - 2  # start- and end-of-text tokens
        return [len(self._bpe.encode(t)) > room for t in texts]

    def word_ids(self, text: str) -> list[tuple[str, list[int]]]:
        """Each word of ``text`` (as the tokenizer splits and lowercases it) with its token ids."""
        import regex  # open_clip's own dependency: its split pattern needs it

        words = regex.findall(self._bpe.pat, " ".join(text.lower().split()))
        return [(w, self._bpe.encode(w)) for w in words]

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        ids = [int(t) for t in tokens if int(t) not in (0, self.sot_token_id, self.eot_token_id)]
        return self._bpe.decode(ids).strip()
