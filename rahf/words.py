"""Prompt words without torch: the RichHF-18K word rule (split on any of ``,.?!":;`` and spaces, drop empty
pieces), the keyword sequence and one-word prompt edits."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

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


def swap_word(prompt: str, classes: Sequence[Sequence[str]], rng) -> str | None:
    """The cleaned prompt with one word replaced by another member of its class (a hard negative for
    image-text matching: ``"a red circle"`` -> ``"a blue circle"``), or None when no word of the prompt belongs to
    a class of two or more words. Matching is case-insensitive; the word and its replacement are drawn uniformly by
    ``rng`` (a ``numpy.random.Generator``)."""
    lookup = {w.lower(): [c for c in cls if c.lower() != w.lower()] for cls in classes for w in cls}
    words = prompt_words(prompt)
    spots = [i for i, w in enumerate(words) if lookup.get(w.lower())]
    if not spots:
        return None
    i = spots[int(rng.integers(len(spots)))]
    others = lookup[words[i].lower()]
    words[i] = others[int(rng.integers(len(others)))]
    return " ".join(words)


def load_swap_classes(spec: str) -> list[list[str]]:
    """Word classes for :func:`swap_word`: ``"synthetic"`` for the synthetic world's, else a JSON file holding a
    list of lists of words (``[["red", "blue"], ["cat", "dog"]]``); ValueError names what is off in the file."""
    if spec == "synthetic":
        from rahf.data.synthetic import SWAP_CLASSES

        return [list(c) for c in SWAP_CLASSES]
    try:
        classes = json.loads(Path(spec).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{spec}: not JSON: {err}") from err
    if not isinstance(classes, list) or not all(
        isinstance(c, list) and all(isinstance(w, str) and w for w in c) for c in classes
    ):
        raise ValueError(f'{spec}: want a JSON list of lists of words, e.g. [["red", "blue"]]')
    return classes
