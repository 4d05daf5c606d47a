"""Content controls of the pipeline: a prompt filter (word list or callable) that refuses
prompts by name, and the output checker's type. Generation and completion both check prompts."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Union

import torch

PromptFilter = Union[Sequence[str], Callable[[str], Union[bool, str]]]
OutputChecker = Callable[[torch.Tensor], Sequence[bool]]


class PromptBlocked(ValueError):
    """A prompt refused by the pipeline's prompt filter."""


def compile_prompt_filter(prompt_filter: PromptFilter | None) -> Callable[[str], Union[bool, str]] | None:
    """A word list (whole words, any case) becomes a callable that returns the reason a prompt
    is refused; a callable stays as it is."""
    if prompt_filter is None or callable(prompt_filter):
        return prompt_filter
    words = [w.strip().lower() for w in prompt_filter if isinstance(w, str) and w.strip()]
    if not words:
        raise ValueError("prompt_filter: the word list is empty")
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    return lambda text: (m := pattern.search(text)) is not None and f"word list: {m.group(0)!r}"


def check_prompts(prompt_filter: Callable[[str], Union[bool, str]] | None, prompts: Sequence[str]) -> None:
    """Raise ``PromptBlocked`` naming the filter (and its reason) for a refused prompt."""
    if prompt_filter is None:
        return
    for prompt in prompts:
        verdict = prompt_filter(prompt)
        if verdict:
            reason = verdict if isinstance(verdict, str) else getattr(prompt_filter, "__name__", "callable")
            raise PromptBlocked(f"prompt refused by the prompt filter ({reason}): {prompt!r}")
