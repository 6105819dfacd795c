"""Line-by-line readers for user input files: a bad line is reported by file and line, the good ones are kept.

Each line is decoded as UTF-8 on its own, so one stray byte costs that line only. ``strict=True`` turns any
bad line into a :class:`BadLinesError` that names every bad ``file:line``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LineIssue:
    """One bad line of an input file (lines count from 1); ``kept``: its item was kept, to be recorded as an error."""

    path: Path
    line: int
    reason: str
    kept: bool = False

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class BadLinesError(ValueError):
    """An input file refused for its bad lines (``strict``); the message names the first few as ``file:line``."""

    def __init__(self, issues: list[LineIssue], *, headline: str | None = None, shown: int = 5) -> None:
        self.issues = list(issues)
        more = len(self.issues) - shown
        text = "; ".join(str(i) for i in self.issues[:shown]) + (f"; and {more} more" if more > 0 else "")
        headline = headline or f"{len(self.issues)} bad line(s)"
        super().__init__(f"{headline}: {text}" if text else headline)


def decoded_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, problem)`` for every line; text is None when the line is not UTF-8.

    A UTF-8 byte-order mark at the start and the ``\\r`` of CRLF endings are dropped.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            yield n, raw.decode("utf-8"), None
        except UnicodeDecodeError as err:
            yield n, None, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"


def control_character(text: str) -> str | None:
    """The first C0/C1 control character of ``text`` other than tab, as ``U+XXXX``; None when there is none."""
    for ch in text:
        if (ord(ch) < 0x20 and ch != "\t") or 0x7F <= ord(ch) < 0xA0:
            return f"U+{ord(ch):04X}"
    return None


def raise_if_strict(issues: list[LineIssue], strict: bool) -> None:
    """Refuse the file (:class:`BadLinesError`) when ``strict`` and any line was bad."""
    if strict and issues:
        raise BadLinesError(issues)


def read_prompt_lines(path: str | os.PathLike, *, strict: bool = False) -> tuple[list[str], list[LineIssue]]:
    """A text file of one prompt per line -> (prompts, bad lines).

    Prompts are stripped of surrounding white space; blank lines are skipped. A line that is not UTF-8 or holds a
    control character (other than tab) is bad: reported, not used; with ``strict`` the file is refused.
    """
    path = Path(path)
    prompts, issues = [], []
    for n, text, problem in decoded_lines(path):
        if problem is None and (ctrl := control_character(text or "")):
            problem = f"control character {ctrl} in the prompt"
        if problem is not None:
            issues.append(LineIssue(path, n, problem))
        elif text is not None and text.strip():
            prompts.append(text.strip())
    raise_if_strict(issues, strict)
    return prompts, issues
