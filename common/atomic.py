"""Whole-or-absent local file writes, the one writer every package uses.

A write goes to a temporary file beside its target (``.<name>.<random>.tmp``, created with mode 0o666 so the
user's umask decides the final permissions, as for any ``open(path, "w")``), is optionally flushed to disk, and
is renamed over the target. A reader sees the old file or the whole new one, never a part; an interrupted write
leaves at most a temporary file, which :func:`sweep_stale_temps` removes on the next run.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: str | os.PathLike) -> str:
    """A fresh temporary file name beside ``path`` (same folder, so the rename is atomic)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of :func:`temp_name`'s."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes], *, fsync: bool = False) -> Path:
    """Write ``data`` (bytes, or an iterable of chunks) at ``path`` atomically; creates the folder; returns it.

    Args:
        path: the target file; its parent folders are created.
        data: the whole content, or chunks written in order (a streaming writer).
        fsync: flush the file to disk before the rename (for run records that must survive a power loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_create_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> bool:
    """Write ``data`` at ``path`` only if nothing is there (write-once); True when this call created it.

    The bytes go to a temporary file first, which is hard-linked to ``path`` (``os.link`` refuses an existing
    target atomically), so a reader sees no file or the whole one, and of several concurrent creators exactly one
    wins. Creates the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        atomic_write_bytes(tmp, data, fsync=fsync)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def sweep_stale_temps(folder: str | os.PathLike, *, older_than_s: float = 60.0) -> list[Path]:
    """Remove temporary files of interrupted writes below ``folder`` older than ``older_than_s``; returns them.

    The age guard keeps the temporary file of a write that another live process is making right now.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for p in folder.rglob(f"*{TMP_SUFFIX}"):
        try:
            if p.is_file() and is_temp_name(p.name) and p.stat().st_mtime < cutoff:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            continue
    return removed
