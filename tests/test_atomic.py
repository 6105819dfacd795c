from __future__ import annotations

import os
import stat
import time

import pytest

from common import atomic
from common.atomic import atomic_write_bytes, atomic_write_text, sweep_stale_temps


def test_whole_content_streamed_chunks_and_folder_created(tmp_path):
    p = atomic_write_bytes(tmp_path / "a" / "b.bin", (bytes([i]) * 3 for i in range(4)))
    assert p.read_bytes() == b"\x00\x00\x00\x01\x01\x01\x02\x02\x02\x03\x03\x03"
    atomic_write_text(p, "é")
    assert p.read_bytes() == "é".encode()
    assert os.listdir(p.parent) == ["b.bin"]


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "x", b"1")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's 0600
        os.umask(0o077)
        q = atomic_write_bytes(tmp_path / "y", b"1")
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_failed_write_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    p = atomic_write_bytes(tmp_path / "f", b"old")

    def boom(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_sweep_removes_only_old_temp_files(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / ".r.json.abc123.tmp"
    fresh = tmp_path / ".s.json.def456.tmp"
    keep = tmp_path / "notes.tmp"  # not one of ours (no leading dot)
    for f in (stale, fresh, keep):
        f.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(keep, (old, old))
    assert sweep_stale_temps(tmp_path, older_than_s=60) == [stale]
    assert not stale.exists() and fresh.exists() and keep.exists()
    assert sweep_stale_temps(tmp_path / "missing") == []
