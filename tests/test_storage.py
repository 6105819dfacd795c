"""The run store (flows/storage.py; docs/storage.md) on a local folder and on a real S3-protocol server (moto)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

from common import atomic
from common.records import ImageRecord
from flows import storage
from flows.storage import RunStore, heatmap_key, image_key, record_key, with_retries
from generators.base import GeneratorIdentity, image_id
from tests.s3_server import S3Server, running_s3, s3_server  # noqa: F401

GEN = GeneratorIdentity("synthetic", "world-v1")


def make_record(prompt: str, seed: int, **kw) -> ImageRecord:
    return ImageRecord(image_id(prompt, seed, GEN, {}), prompt, seed, GEN.to_dict(), **kw)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch) -> Iterator[str]:
    """A local folder or ``s3://bucket/run`` on a moto server of the test's own."""
    if request.param == "local":
        yield str(tmp_path / "run")
        return
    with running_s3(monkeypatch) as server:
        yield server.root


# -- bytes, JSON, listing ----------------------------------------------------------------------------------


def test_bytes_round_trip(root):
    store = RunStore(root)
    assert store.list() == [] and store.list("images") == []
    assert store.uri("images/a.png") == root + "/images/a.png"
    assert not store.exists("images/a.png")

    store.write_bytes("images/b.png", b"\x89PNG b")
    store.write_bytes("images/a.png", b"\x89PNG a")
    store.write_bytes("notes.txt", b"hello")
    store.write_json("cfg/run.json", {"b": [1, 2], "a": None})
    assert store.read_bytes("images/a.png") == b"\x89PNG a"
    assert store.read_json("cfg/run.json") == {"a": None, "b": [1, 2]}
    assert store.exists("images/a.png") and not store.exists("images/c.png")
    assert store.list() == ["cfg/run.json", "images/a.png", "images/b.png", "notes.txt"]
    assert store.list("images") == store.list("images/") == ["images/a.png", "images/b.png"]
    assert store.list("heatmaps") == []

    store.write_bytes("images/a.png", b"second")  # overwrite
    assert store.read_bytes("images/a.png") == b"second"
    store.delete("images/a.png")
    store.delete("images/a.png")  # a missing key is not an error
    assert store.list("images") == ["images/b.png"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("images/a.png")


def test_keys_are_checked(tmp_path):
    store = RunStore(str(tmp_path))
    for bad in ["", "/abs", "../up", "a/../b", "a//b", "./a"]:
        with pytest.raises(ValueError, match="key must be"):
            store.write_bytes(bad, b"x")
    with pytest.raises(ValueError, match="bytes"):
        store.write_bytes("a", "text")
    with pytest.raises(ValueError, match="id must be"):
        record_key("a/b")
    assert (image_key("f00"), heatmap_key("f00", "implausibility")) == (
        "images/f00.png",
        "heatmaps/f00-implausibility.png",
    )


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    for i in range(5):
        store.write_bytes(f"images/{i}.png", bytes([i]) * 100)
    store.write_bytes("images/0.png", b"new")
    folder = tmp_path / "run" / "images"
    assert sorted(os.listdir(folder)) == [f"{i}.png" for i in range(5)]  # no temp files left

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        store.write_bytes("images/0.png", b"half")
    monkeypatch.undo()
    assert store.read_bytes("images/0.png") == b"new"  # old content whole, temp file cleaned up
    assert sorted(os.listdir(folder)) == [f"{i}.png" for i in range(5)]

    (folder / ".5.png.0123abcd.tmp").write_bytes(b"left by a killed writer")
    assert store.list("images") == [f"images/{i}.png" for i in range(5)]


# -- records and manifest ----------------------------------------------------------------------------------


def test_records(root):
    store = RunStore(root)
    recs = [make_record("a red cube", s, scores={"overall": 0.25 * s}) for s in range(3)]
    for r in recs:
        assert store.put_record(r) == f"records/{r.id}.json"
    store.write_bytes(record_key("0000broken"), b'{"id": "0000broken", "prompt": ')  # truncated JSON
    store.write_bytes(record_key("0001wrongid"), recs[0].to_json().encode())  # content of another id

    assert store.get_record(recs[1].id) == recs[1]
    assert store.has_record(recs[2].id) and not store.has_record("ffff")
    calls = []
    listing = store.list
    store.list = lambda prefix="": calls.append(prefix) or listing(prefix)
    assert store.has_records([recs[0].id, recs[2].id, "ffff"]) == {recs[0].id, recs[2].id}
    assert calls == ["records"]  # one listing, not one request per id

    read = store.records()
    assert read.ids == sorted(r.id for r in recs) and len(read) == 3
    assert [r.scores for r in read] == [r.scores for r in sorted(recs, key=lambda r: r.id)]
    assert [key for key, _ in read.bad] == ["records/0000broken.json", "records/0001wrongid.json"]
    assert "JSONDecodeError" in read.bad[0][1] and "does not match" in read.bad[1][1]
    with pytest.raises(FileNotFoundError):
        store.get_record("ffff")


def test_manifest(root):
    store = RunStore(root)
    recs = [make_record(p, s) for p in ("a dog", "a cat") for s in range(3)]
    shuffled = [recs[4], recs[0], recs[5], recs[2], recs[0], recs[1], recs[3]]  # recs[0] twice
    uri = store.write_manifest(shuffled)
    assert uri == store.uri("manifest.jsonl")
    first = store.read_bytes("manifest.jsonl")
    lines = first.decode().splitlines()
    assert len(lines) == 6 and first.endswith(b"\n")
    assert [ImageRecord.from_json(line).id for line in lines] == sorted(r.id for r in recs)
    assert store.read_manifest() == sorted(recs, key=lambda r: r.id)

    store.write_manifest(list(reversed(recs)))
    store.write_manifest(recs)
    assert store.read_bytes("manifest.jsonl") == first  # same records, same bytes

    changed = make_record("a dog", 0, stage="repaired")
    with pytest.raises(ValueError, match="share id"):
        store.write_manifest([recs[0], changed])
    store.write_manifest([], key="empty.jsonl")
    assert store.read_manifest("empty.jsonl") == []


# -- retries -----------------------------------------------------------------------------------------------


def test_retry_backoff_and_what_is_not_retried(monkeypatch, caplog):
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    botocore_exceptions = pytest.importorskip("botocore.exceptions")
    errors = [ConnectionError("refused"), botocore_exceptions.EndpointConnectionError(endpoint_url="http://x")]

    def flaky():
        if errors:
            raise errors.pop(0)
        return 42

    with caplog.at_level(logging.WARNING, logger="flows.storage"):
        assert with_retries(flaky, what="put x") == 42
    assert sleeps == [0.2, 0.4]
    assert [r.getMessage().split(";")[1] for r in caplog.records] == [" retry 1/5 in 0.2 s", " retry 2/5 in 0.4 s"]

    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        with_retries(missing)
    assert calls == [1]

    sleeps.clear()

    def down():
        raise TimeoutError("still down")

    with pytest.raises(TimeoutError):
        with_retries(down)
    assert sleeps == [0.2, 0.4, 0.8, 1.6, 3.0]  # 6 tries, capped at 3 s
    with pytest.raises(ValueError, match="tries"):
        with_retries(down, tries=0)


def test_write_during_s3_outage_succeeds(s3_server: S3Server, caplog):  # noqa: F811
    """The S3 endpoint goes down for ~2 s while a write is issued; the write rides it out and lands whole.

    The outage is real: the moto server is shut down (connections to its port are refused) and a thread starts
    a new one on the same port 2 s later. moto keeps buckets and objects in this process rather than in the
    server, so what was written before the outage is still there afterwards (asserted below). botocore's own
    retries are turned off for this store so that the retries seen are the store's.
    """
    store = RunStore(s3_server.root, storage_options={"config_kwargs": {"retries": {"total_max_attempts": 1}}})
    before = make_record("before the outage", 0)
    store.put_record(before)

    s3_server.stop()
    restarter = threading.Timer(2.0, s3_server.start)
    restarter.start()
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="flows.storage"):
        uri = store.write_bytes("images/during.png", b"\x89PNG during")
    elapsed = time.perf_counter() - t0
    restarter.join()

    assert uri == s3_server.root + "/images/during.png"
    assert elapsed >= 1.5
    retries = [r.getMessage() for r in caplog.records if r.name == "flows.storage"]
    assert len(retries) >= 3 and all("EndpointConnectionError" in m and "retry" in m for m in retries)
    assert store.read_bytes("images/during.png") == b"\x89PNG during"
    assert store.records().records == [before]
