"""The RichHF-18K word rule, without torch: split on any of ``,.?!":;`` and spaces, drop empty pieces."""

from __future__ import annotations

import re

_WORD_SPLIT = re.compile(r'[,.?!":; ]+')


def prompt_words(prompt: str) -> list[str]:
    """Words of a prompt by the RichHF-18K rule: split on ``,.?!":;`` and spaces, drop empty pieces."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be str, got {type(prompt).__name__}")
    return [w for w in _WORD_SPLIT.split(prompt.replace("\n", " ").replace("\t", " ")) if w]


def clean_prompt(prompt: str) -> str:
    """The cleaned prompt: its words joined with one space (``"A cat, sleeping."`` -> ``"A cat sleeping"``)."""
    return " ".join(prompt_words(prompt))
