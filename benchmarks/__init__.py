"""Benchmarks and diagnostics; each module is also a script (``python benchmarks/<name>.py``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text


def emit(text: str, out: str | Path | None) -> None:
    """Print a script's markdown result and, when ``out`` is given, write it there (atomically)."""
    print(text)
    if out:
        atomic_write_text(out, text)


def synthetic_rows(data: Path, split: str) -> list[dict[str, Any]]:
    """The rows of a synthetic split's ``<split>.jsonl`` (uid, image, prompt, flaws), in file order."""
    return [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def named_models(specs: Sequence[str]) -> list[tuple[str, str]]:
    """(name, path) of ``NAME=PATH`` model specs; a bare PATH is named after its folder."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        out.append((name, path) if sep else (Path(spec).name, spec))
    return out


def with_skipped(lines: Sequence[str], skipped: Sequence[str], what: str = "image") -> str:
    """A diagnostic's markdown: ``lines`` and, when inputs were skipped, a list naming each (with why)."""
    if skipped:
        lines = [
            *lines,
            "",
            f"Skipped {len(skipped)} {what}(s) that could not be scored:",
            *[f"- {x}" for x in skipped],
        ]
    return "\n".join(lines) + "\n"


def diagnostic_parser(doc: str, data_help: str, model_help: str) -> argparse.ArgumentParser:
    """The arguments every model diagnostic takes: ``--data`` and ``--model`` (both required, ``--model``
    repeatable), ``--threads`` and ``--out``; the description is the first line of ``doc``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help=data_help)
    ap.add_argument("--model", action="append", required=True, help=model_help)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    return ap


def score_each(
    scorer: Any, prompts: Sequence[str], images: Sequence[str | Path], chunk: int = 256
) -> tuple[list[tuple[int, Any]], list[str]]:
    """Score every (prompt, image) pair with a ``RAHFScorer``, ``chunk`` pairs a call: ([(index, RichFeedback)]
    for the pairs that could be scored, ``"<image>: <why>"`` for each that could not). One unreadable image skips
    that pair only."""
    from common.records import ScoringFailure

    scored, skipped = [], []
    for start in range(0, len(prompts), chunk):
        stop = start + chunk
        out = scorer.score(list(prompts[start:stop]), [str(x) for x in images[start:stop]], errors="return")
        for i, fb in enumerate(out, start):
            if isinstance(fb, ScoringFailure):
                skipped.append(f"{images[i]}: {fb.error}")
            else:
                scored.append((i, fb))
    return scored, skipped
