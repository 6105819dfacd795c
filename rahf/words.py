"""The RichHF-18K word rule, without torch: split on any of ``,.?!":;`` and spaces, drop empty pieces."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD_SPLIT = re.compile(r'[,.?!":; ]+')


def prompt_words(prompt: str) -> list[str]:
    """Words of a prompt by the RichHF-18K rule: split on ``,.?!":;`` and spaces, drop empty pieces."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be str, got {type(prompt).__name__}")
    return [w for w in _WORD_SPLIT.split(prompt.replace("\n", " ").replace("\t", " ")) if w]


def clean_prompt(prompt: str) -> str:
    """The cleaned prompt: its words joined with one space (``"A cat, sleeping."`` -> ``"A cat sleeping"``)."""
    return " ".join(prompt_words(prompt))


def keyword_sequence(prompt: str, word_labels: Sequence[int], suffix: str = "_0") -> str:
    """Cleaned prompt with ``suffix`` on each misaligned word; label 0 = misaligned (RichHF-18K)."""
    words = prompt_words(prompt)
    if len(words) != len(word_labels):
        raise ValueError(f"prompt has {len(words)} words but {len(word_labels)} labels: {prompt!r}")
    return " ".join(w + suffix if lab == 0 else w for w, lab in zip(words, word_labels))
