"""Benchmarks and diagnostics; each module is also a script (``python benchmarks/<name>.py``)."""

from __future__ import annotations

from pathlib import Path

from common.atomic import atomic_write_text


def emit(text: str, out: str | Path | None) -> None:
    """Print a script's markdown result and, when ``out`` is given, write it there (atomically)."""
    print(text)
    if out:
        atomic_write_text(out, text)
