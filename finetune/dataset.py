"""Export of a selected finetuning set as an image folder (paper §5).

The folder is what diffusers' text-to-image training scripts and the ``datasets`` "imagefolder" loader read::

    <out>/<id>.png          the selected image (PNG bytes copied as they are; other formats converted to PNG)
    <out>/metadata.jsonl    one JSON object per image, sorted by (text, id):
                            file_name, text (the prompt), plausibility, alignment, aesthetics, overall,
                            seed, generator, rahf, id, selection
    <out>/heatmaps/<id>.png  with ``heatmap=NAME``: the record's RAHF heatmap NAME (8-bit grey, 0..255 = 0..1),
                            named in the row's ``heatmap`` column, with ``heatmap_source`` = {"name", "uri"}
                            (the model is the row's ``rahf``); LoRA finetuning reads it as a per-region weight

``out`` is a local folder or any fsspec URL (``s3://bucket/prefix``, ``memory://...``). Every write is atomic:
locally a temporary file in the same folder then ``os.replace``; elsewhere one ``pipe_file`` (a single PUT).
Images are written first and ``metadata.jsonl`` last, so the metadata never names a missing image.

Exporting is idempotent and resumable: an image already in the folder (same id) is neither read nor rewritten,
and ``metadata.jsonl`` is rewritten in full. The folder accumulates: rows of images that an earlier export
wrote, and that are still there, are kept (a row of the new selection replaces the row of the same image), so
every image in the folder has exactly one row and the loader accepts it. Export a different selection to a fresh
folder to get exactly that selection. An image that cannot be read is reported in ``ExportResult.failed`` and
left out; it never stops the export.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from common.atomic import atomic_write_bytes
from common.keys import dataset_image_name
from common.names import SCORE_NAMES
from common.records import ImageRecord

METADATA_FILE = "metadata.jsonl"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass
class ExportResult:
    """What an export did: images written, images already present, metadata rows, and failures (id, error)."""

    out: str
    written: int = 0
    skipped_existing: int = 0
    rows: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["failed"] = [list(f) for f in self.failed]
        return d


def _read_uri(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def _as_png(data: bytes) -> bytes:
    """``data`` if it is a readable PNG, else the image re-encoded as PNG; raises if PIL cannot read it."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a truncated or corrupt file fails here, not in training
        if image.format == "PNG" and data.startswith(PNG_SIGNATURE):
            return data
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that readers see the old file or the whole new one, never a part."""
    if isinstance(fs, LocalFileSystem):
        atomic_write_bytes(path, data)
    else:
        fs.pipe_file(path, data)


def _json_value(v: Any) -> Any:
    """Numpy numbers become Python ones, non-finite floats None (JSON has no NaN); containers recursively."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


HEATMAP_DIR = "heatmaps"


def dataset_heatmap_name(id: str) -> str:
    """``heatmaps/<id>.png``: the file name of an image's heatmap inside an exported finetuning folder."""
    return f"{HEATMAP_DIR}/{dataset_image_name(id)}"


def metadata_row(record: ImageRecord, heatmap: str | None = None) -> dict[str, Any]:
    """The ``metadata.jsonl`` object of one record; every score name is a column (None when absent). With
    ``heatmap`` (a heatmap name the record carries) the row names its copy and where it came from."""
    row: dict[str, Any] = {"file_name": dataset_image_name(record.id), "text": record.prompt}
    row.update({name: record.scores.get(name) for name in SCORE_NAMES})
    row.update(seed=record.seed, generator=record.generator, rahf=record.rahf, id=record.id, selection=record.selection)
    if heatmap is not None:
        row.update(
            heatmap=dataset_heatmap_name(record.id),
            heatmap_source={"name": heatmap, "uri": record.heatmap_uris[heatmap]},
        )
    return _json_value(row)


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("text", "")), str(row.get("id", row["file_name"]))


def _encode_rows(rows: list[dict[str, Any]]) -> bytes:
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in sorted(rows, key=_row_key)]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _parse_rows(data: bytes, where: str, *, check_names: bool = False) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "file_name" not in row:
            raise ValueError(f"{where} line {n}: expected a JSON object with 'file_name'")
        if check_names:
            check_file_name(row["file_name"], f"{where} line {n}")
        rows.append(row)
    return rows


def check_file_name(name: Any, where: str) -> str:
    """``name`` when it is a relative "/"-separated path inside the folder (``x.png`` or ``sub/x.png``).

    Raises ``ValueError`` naming ``where`` and the name for anything else: not a string, empty, absolute, a drive
    or backslash path, or with an empty, ``.`` or ``..`` part; such a row could read a file outside the folder.
    """
    if not isinstance(name, str):
        raise ValueError(f"{where}: file_name must be a string, got {name!r}")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name) or "://" in name:
        raise ValueError(f"{where}: file_name {name!r} is an absolute path; it must be relative to the folder")
    if "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"{where}: file_name {name!r} is not a plain relative path inside the folder")
    return name


def read_metadata(out: str) -> list[dict[str, Any]]:
    """The rows of ``<out>/metadata.jsonl`` in file order (sorted by text, then id, when this module wrote it).

    Every ``file_name`` is checked to be a relative path inside ``out`` (:func:`check_file_name`).
    """
    fs, root = fsspec.core.url_to_fs(out)
    path = posixpath.join(root, METADATA_FILE)
    if not fs.exists(path):
        raise FileNotFoundError(f"no {METADATA_FILE} in {out}")
    return _parse_rows(fs.cat_file(path), f"{out}/{METADATA_FILE}", check_names=True)


def read_image_bytes(out: str, file_name: str) -> bytes:
    """The bytes of ``<out>/<file_name>``; ``file_name`` must pass :func:`check_file_name`, and on a local folder
    the file, symlinks resolved, must lie inside ``out`` (``ValueError`` naming the file otherwise)."""
    check_file_name(file_name, f"{out}/{METADATA_FILE}")
    fs, root = fsspec.core.url_to_fs(out)
    path = posixpath.join(root.rstrip("/"), file_name)
    if isinstance(fs, LocalFileSystem):
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ValueError(f"{out}: file_name {file_name!r} resolves to {real}, outside the data folder")
    return fs.cat_file(path)


def export_dataset(
    selected: Sequence[ImageRecord],
    out: str,
    *,
    read_image: Callable[[str], bytes] | None = None,
    heatmap: str | None = None,
) -> ExportResult:
    """Write ``selected`` as an image folder with ``metadata.jsonl`` at ``out`` (local path or fsspec URL).

    Args:
        selected: records to export, typically ``select_best(...).selected``; a repeated id is exported once
            (the later record's metadata wins).
        out: destination folder, e.g. ``runs/r1/finetune-data`` or ``s3://bucket/run/finetune-data``.
        read_image: bytes of an ``image_uri``; default reads it with fsspec (local paths, ``s3://``, ...).
        heatmap: also copy each record's heatmap of this name (``heatmap_uris[heatmap]``, e.g.
            ``"implausibility"``) to ``heatmaps/<id>.png``; a record without it fails (reported, left out).
    Returns:
        an :class:`ExportResult`; ``rows`` is the number of lines of the rewritten ``metadata.jsonl``.
    """
    read_image = read_image or _read_uri
    fs, root = fsspec.core.url_to_fs(out)  # fsspec paths are "/"-separated for every filesystem, local too
    if isinstance(fs, LocalFileSystem):  # object stores have no folders to make
        fs.makedirs(root, exist_ok=True)
    present = _names_in(fs, root)
    rows = _existing_rows(fs, root, present)
    result = ExportResult(out=out)
    for record in {r.id: r for r in selected}.values():
        error = _export_heatmap(fs, root, record, heatmap, read_image) if heatmap is not None else None
        error = error or _export_image(fs, root, present, record, read_image, result)
        if error is None:
            rows[dataset_image_name(record.id)] = metadata_row(record, heatmap)
        else:
            result.failed.append((record.id, error))
    _write_atomic(fs, posixpath.join(root, METADATA_FILE), _encode_rows(list(rows.values())))
    result.rows = len(rows)
    return result


def _names_in(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """File names directly under ``root`` (one listing, not one request per image); empty if it does not exist."""
    fs.invalidate_cache(root)
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return set()


def _existing_rows(fs: fsspec.AbstractFileSystem, root: str, present: set[str]) -> dict[str, dict[str, Any]]:
    """file_name -> row of the current ``metadata.jsonl``, for images still in the folder."""
    if METADATA_FILE not in present:
        return {}
    path = posixpath.join(root, METADATA_FILE)
    return {r["file_name"]: r for r in _parse_rows(fs.cat_file(path), path) if r["file_name"] in present}


def _export_heatmap(
    fs: fsspec.AbstractFileSystem, root: str, record: ImageRecord, name: str, read_image: Callable[[str], bytes]
) -> str | None:
    """Copy the record's heatmap ``name`` to ``<root>/heatmaps/<id>.png`` (as 8-bit grey); the error text when it
    cannot."""
    if not _SAFE_ID.fullmatch(record.id):
        return f"id {record.id!r} is not a safe file name"
    uri = record.heatmap_uris.get(name)
    if not uri:
        return f"record has no {name!r} heatmap"
    try:
        with Image.open(io.BytesIO(read_image(uri))) as im:
            im.load()
            grey = im.convert("L")
        buf = io.BytesIO()
        grey.save(buf, format="PNG")
    except Exception as e:  # any unreadable heatmap is reported, never raised
        return f"{type(e).__name__}: {e}"
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.join(root, HEATMAP_DIR), exist_ok=True)
    _write_atomic(fs, posixpath.join(root, dataset_heatmap_name(record.id)), buf.getvalue())
    return None


def _export_image(
    fs: fsspec.AbstractFileSystem,
    root: str,
    present: set[str],
    record: ImageRecord,
    read_image: Callable[[str], bytes],
    result: ExportResult,
) -> str | None:
    """Copy one record's image to ``<root>/<id>.png`` unless it is there; the error text when it cannot."""
    if not _SAFE_ID.fullmatch(record.id):
        return f"id {record.id!r} is not a safe file name"
    name = dataset_image_name(record.id)
    if name in present:
        result.skipped_existing += 1
        return None
    if not record.image_uri:
        return "record has no image_uri"
    try:
        data = _as_png(read_image(record.image_uri))
    except Exception as e:  # any unreadable or undecodable image is reported, never raised
        return f"{type(e).__name__}: {e}"
    _write_atomic(fs, posixpath.join(root, name), data)
    result.written += 1
    return None
