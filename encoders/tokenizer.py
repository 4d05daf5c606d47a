"""open_clip's BPE tokenizer (vocabulary ships inside the open_clip package: no download)."""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer


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
