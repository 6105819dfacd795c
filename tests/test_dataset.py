"""Export of the finetuning set as an image folder with metadata.jsonl: content, idempotence, failures, remote."""

from __future__ import annotations

import io
import json
import math
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from common.names import SCORE_NAMES
from common.records import ImageRecord
from finetune.dataset import METADATA_FILE, ExportResult, export_dataset, metadata_row, read_metadata
from finetune.select import select_best
from generators.base import GeneratorIdentity, image_id

GEN = GeneratorIdentity("amused", "amused/amused-256", adapter_hash="1a2b3c4d")
RAHF = {"preset": "rahf-tiny", "weights_hash": "feedbeef"}


def png_bytes(seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_records(folder, prompts=("a cat", "a bird", "a dog"), seeds=(0, 1)) -> list[ImageRecord]:
    """One record per (prompt, seed) with its PNG written under ``folder`` (a pathlib folder or fsspec URL)."""
    records = []
    for i, (prompt, seed) in enumerate((p, s) for p in prompts for s in seeds):
        rid = image_id(prompt, seed, GEN, {"steps": 12})
        uri = f"{folder}/{rid}.png"
        with fsspec.open(uri, "wb") as f:
            f.write(png_bytes(i))
        scores = {"plausibility": round(0.5 + 0.08 * i, 2), "alignment": 0.7, "aesthetics": 0.6, "overall": 0.65}
        records.append(ImageRecord(rid, prompt, seed, GEN.to_dict(), {"steps": 12}, uri, scores, rahf=RAHF))
    return records


def sort_key(r: ImageRecord) -> tuple[str, str]:
    return r.prompt, r.id


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_export_writes_images_and_sorted_metadata(tmp_path):
    records = make_records(tmp_path / "src")
    out = tmp_path / "out"
    result = export_dataset(records, str(out))
    assert (result.written, result.skipped_existing, result.rows, result.failed) == (6, 0, 6, [])
    assert listing(out) == sorted([f"{r.id}.png" for r in records] + [METADATA_FILE])
    for r in records:  # PNG bytes are copied unchanged
        assert (out / f"{r.id}.png").read_bytes() == (tmp_path / "src" / f"{r.id}.png").read_bytes()
    rows = read_metadata(str(out))
    expected = sorted(records, key=sort_key)
    assert [row["id"] for row in rows] == [r.id for r in expected]
    assert [row["text"] for row in rows] == ["a bird", "a bird", "a cat", "a cat", "a dog", "a dog"]
    first = rows[0]
    assert first["file_name"] == f"{first['id']}.png"
    assert set(first) == {
        "file_name", "text", *SCORE_NAMES, "seed", "generator", "rahf", "id", "selection",
    }  # fmt: skip
    source = next(r for r in records if r.id == first["id"])  # within a prompt, rows are in id order
    assert first["plausibility"] == source.scores["plausibility"] and first["seed"] == source.seed
    assert first["generator"] == GEN.to_dict() and first["rahf"] == RAHF
    assert rows == [metadata_row(r) for r in expected]  # read_metadata round-trips what was written


def test_selection_round_trips_through_metadata(tmp_path):
    records = make_records(tmp_path / "src")
    selected = select_best(records).selected  # the dog's seeds score 0.82 and 0.9, the rest < 0.8
    assert [(r.prompt, r.seed) for r in selected] == [("a dog", 1)]
    export_dataset(selected, str(tmp_path / "out"))
    (row,) = read_metadata(str(tmp_path / "out"))
    assert row["selection"] == json.loads(json.dumps(selected[0].selection))
    assert row["selection"]["rank"] == 1 and row["plausibility"] == 0.9


def test_export_twice_is_byte_identical_and_reads_nothing(tmp_path):
    records = make_records(tmp_path / "src")
    out = tmp_path / "out"
    export_dataset(records, str(out))
    meta, files = (out / METADATA_FILE).read_bytes(), listing(out)
    reads: list[str] = []

    def counting_reader(uri: str) -> bytes:
        reads.append(uri)
        return (tmp_path / "src" / uri.rsplit("/", 1)[1]).read_bytes()

    again = export_dataset(list(reversed(records)) + records[:2], str(out), read_image=counting_reader)
    assert (again.written, again.skipped_existing, again.rows) == (0, 6, 6)
    assert reads == []
    assert (out / METADATA_FILE).read_bytes() == meta and listing(out) == files
    assert len((out / METADATA_FILE).read_text().splitlines()) == 6


def test_larger_selection_adds_only_new_images(tmp_path):
    records = make_records(tmp_path / "src", seeds=(0, 1, 2))
    out = tmp_path / "out"
    export_dataset(records[:4], str(out))
    reads: list[str] = []

    def counting_reader(uri: str) -> bytes:
        reads.append(uri)
        with fsspec.open(uri, "rb") as f:
            return f.read()

    result = export_dataset(records, str(out), read_image=counting_reader)
    assert (result.written, result.skipped_existing, result.rows) == (5, 4, 9)
    assert sorted(reads) == sorted(r.image_uri for r in records[4:])
    assert [row["id"] for row in read_metadata(str(out))] == [r.id for r in sorted(records, key=sort_key)]
    # the same folder as one export of the whole selection
    export_dataset(records, str(tmp_path / "fresh"))
    assert (out / METADATA_FILE).read_bytes() == (tmp_path / "fresh" / METADATA_FILE).read_bytes()


def test_rows_of_earlier_export_are_kept_so_every_image_has_one_row(tmp_path):
    records = make_records(tmp_path / "src")
    out = tmp_path / "out"
    export_dataset(records[:2], str(out))
    result = export_dataset(records[4:], str(out))
    assert result.rows == 4
    ids = {row["id"] for row in read_metadata(str(out))}
    assert ids == {r.id for r in records[:2] + records[4:]}
    assert {f"{i}.png" for i in ids} | {METADATA_FILE} == set(listing(out))


def test_bad_images_are_reported_and_the_rest_exported(tmp_path):
    records = make_records(tmp_path / "src")
    (tmp_path / "src" / f"{records[1].id}.png").unlink()  # missing
    (tmp_path / "src" / f"{records[2].id}.png").write_bytes(b"not an image")  # undecodable
    (tmp_path / "src" / f"{records[3].id}.png").write_bytes(png_bytes(3)[:60])  # truncated
    records[4].image_uri = ""
    out = tmp_path / "out"
    result = export_dataset(records, str(out))
    failed = dict(result.failed)
    assert list(failed) == [r.id for r in records[1:5]]
    assert failed[records[1].id].startswith("FileNotFoundError")
    assert failed[records[4].id] == "record has no image_uri"
    assert (result.written, result.rows) == (2, 2)
    assert listing(out) == sorted([f"{records[0].id}.png", f"{records[5].id}.png", METADATA_FILE])
    assert json.loads(json.dumps(result.to_dict()))["failed"][0] == [records[1].id, failed[records[1].id]]
    # once the image is back, a rerun exports it and keeps the others
    (tmp_path / "src" / f"{records[1].id}.png").write_bytes(png_bytes(1))
    rerun = export_dataset(records, str(out))
    assert (rerun.written, rerun.skipped_existing, rerun.rows, len(rerun.failed)) == (1, 2, 3, 3)


def test_unsafe_id_is_refused():
    record = ImageRecord("../escape", "p", 0, GEN.to_dict(), image_uri="/nowhere.png")
    result = export_dataset([record], f"memory://bucket/{uuid.uuid4().hex}")
    assert result.failed == [("../escape", "id '../escape' is not a safe file name")] and result.rows == 0


def test_non_png_is_converted_and_non_finite_scores_become_null(tmp_path):
    (tmp_path / "a.jpg").write_bytes(png_bytes(0, fmt="JPEG"))
    record = ImageRecord("abc123", "p", 7, GEN.to_dict(), image_uri=str(tmp_path / "a.jpg"))
    record.scores = {"plausibility": 0.9, "aesthetics": math.nan, "overall": np.float32(0.5)}
    export_dataset([record], str(tmp_path / "out"))
    data = (tmp_path / "out" / "abc123.png").read_bytes()
    assert data.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(data)).size == (16, 12)
    (row,) = read_metadata(str(tmp_path / "out"))
    assert row["aesthetics"] is None and row["alignment"] is None and row["plausibility"] == 0.9
    assert row["overall"] == 0.5
    assert "NaN" not in (tmp_path / "out" / METADATA_FILE).read_text()


def test_no_temporary_files_are_left(tmp_path):
    export_dataset(make_records(tmp_path / "src"), str(tmp_path / "out"))
    assert not [n for n in listing(tmp_path / "out") if n.startswith(".") or n.endswith(".tmp")]


def test_read_metadata_of_folder_without_export_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        read_metadata(str(tmp_path))


def test_remote_uri_export_through_fsspec_memory_filesystem():
    root = f"memory://bucket/{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        records = make_records(f"{root}/src")
        out = f"{root}/finetune-data"
        result = export_dataset(records, out)
        assert isinstance(result, ExportResult) and (result.written, result.rows, result.failed) == (6, 6, [])
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(out, detail=False))
        assert names == sorted([f"{r.id}.png" for r in records] + [METADATA_FILE])
        assert fs.cat_file(f"{out}/{records[0].id}.png") == fs.cat_file(records[0].image_uri)
        meta = fs.cat_file(f"{out}/{METADATA_FILE}")
        assert read_metadata(out) == [metadata_row(r) for r in sorted(records, key=sort_key)]
        again = export_dataset(records, out)
        assert (again.written, again.skipped_existing) == (0, 6) and fs.cat_file(f"{out}/{METADATA_FILE}") == meta
    finally:
        fs.rm(root, recursive=True)
