"""Score a list of (image file, prompt) items into an output folder: the library behind ``richfeedback score``.

Writes, per run folder:

* ``scores.jsonl``: one line per item in input order — its id, image, prompt, the four scores, misaligned
  keywords, the keyword sequence, the overlay file, or ``error`` for an item that could not be scored;
* ``scores.csv``: the same scores as a table (text cells that a spreadsheet would run as a formula are
  prefixed with ``'``; the JSONL keeps the true text);
* ``overlays/<id>.png``: the image beside its implausibility and misalignment overlays. The id is the item's
  zero-padded position and its file stem (``000007-cat``), so items sharing an image or a stem never collide.

Items are scored in chunks. After each chunk its overlays and a part file ``scores.parts/<chunk>.jsonl`` are
written, so a crash late in a batch keeps every chunk finished before it; at the end ``scores.jsonl`` and
``scores.csv`` are written and the parts removed. Every file is written to a temporary name and renamed, with the
user's umask, so none is ever half written.

Resuming: a run records what it is scoring in ``scores.parts/run.json`` (a hash of the item list, the model's
identity, dtype and processor settings, and the options that shape the rows: ``overlays``, ``scores_only``,
``max_pixels``, ``max_side``, ``chunk_size``). A rerun in the folder with the same record reuses every part file
that holds exactly its chunk's rows (each row's id, image and prompt those of its item, each with scores or an
error, each overlay it names on disk) and scores only the other chunks, so its ``scores.jsonl`` is the one an
uninterrupted run writes. An error record in a finished chunk is a finished outcome and is reused as it is. A part
file that fails those checks is named and its chunk scored again; parts of a run with another record (other items
or order, another model, other options) or none are discarded, with a note, never mixed in. Images are known by
path: a file replaced in place after its chunk finished is not noticed. A completed folder has no parts left, so a
rerun there scores everything again.

One bad item (an image that cannot be opened or decoded, one over ``max_pixels``, a prompt that is not a
string) becomes a line with its error; the rest are scored. Images are reduced as they are decoded so their
long side is at most ``max_side``: heatmaps and overlays come at that size, and memory per item is bounded.
Each image is decoded once, in groups of the scorer's batch size, and dropped once its overlay is written.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from common.atomic import atomic_write_bytes, sweep_stale_temps
from common.lines import LineIssue, decoded_lines, raise_if_strict
from common.records import RichFeedback, ScoringFailure
from rahf.processor import DEFAULT_MAX_PIXELS, InvalidImageError, ProcessorConfig, load_image, to_rgb
from rahf.scorer import RAHFScorer, prompt_problem
from rahf.visualize import overlay_heatmap, side_by_side

#: Long side, in pixels, to which images are reduced before scoring; heatmaps and overlays come at this size.
DEFAULT_MAX_SIDE = 1024
#: Items per chunk: the unit of durable progress (a part file and its overlays).
DEFAULT_CHUNK_SIZE = 32
PARTS_DIR = "scores.parts"
#: The record, inside ``PARTS_DIR``, of what a run scores: a rerun reuses parts only under the same record.
RUN_FILE = "run.json"
_RUN_FORMAT = 1
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_MISSING = object()


@dataclass
class ScoreItem:
    """One input: an image file and the prompt it was generated from.

    ``prompt`` is what the input held; a value that is not a string is refused for this item when scored.
    """

    image: Path
    prompt: object


def read_items(path: str | Path, *, strict: bool = False) -> tuple[list[ScoreItem], list[LineIssue]]:
    """Read a JSONL file of ``{"image": path, "prompt": str}`` -> (items, bad lines).

    Image paths are relative to the file. A line that is not UTF-8, not a JSON object, or has no ``image``
    string is skipped and reported. A line whose prompt is missing or not a string of valid Unicode is reported
    and kept as an item, which :func:`score_items` records as an error. ``strict``: any bad line refuses the
    file (:class:`common.lines.BadLinesError`, naming ``file:line``).
    """
    path = Path(path)
    items, issues = [], []
    for n, text, problem in decoded_lines(path):
        if problem is None and text is not None and not text.strip():
            continue
        if problem is None:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                row, problem = None, f"not valid JSON ({err.msg} at column {err.colno})"
            if problem is None and not (isinstance(row, dict) and isinstance(row.get("image"), str) and row["image"]):
                problem = 'expected a JSON object {"image": path, "prompt": text} with a non-empty image path'
        if problem is not None:
            issues.append(LineIssue(path, n, problem))
            continue
        prompt = row.get("prompt", _MISSING)
        items.append(ScoreItem(path.parent / row["image"], prompt))
        reason = _item_problem(items[-1])
        if reason is not None:
            issues.append(LineIssue(path, n, reason, kept=True))
    raise_if_strict(issues, strict)
    return items, issues


def _item_problem(item: ScoreItem) -> str | None:
    return "no prompt" if item.prompt is _MISSING else prompt_problem(item.prompt)


def item_id(index: int, image: Path, total: int) -> str:
    """A run-unique id for item ``index``: its zero-padded position and file stem (``000007-cat``)."""
    stem = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in Path(image).stem)[:80]
    return f"{index:0{max(6, len(str(total - 1)))}d}-{stem}"


def score_items(
    scorer: RAHFScorer,
    items: Sequence[ScoreItem],
    out_dir: str | Path,
    *,
    overlays: bool = True,
    scores_only: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_side: int | None = DEFAULT_MAX_SIDE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Score ``items`` and write the run folder (see the module docstring); returns the JSONL rows.

    Resumes an interrupted run of the same items, model and options in ``out_dir``: its finished chunks are
    reused, the rest scored.

    Args:
        max_pixels: images with more pixels are error records (None: only Pillow's own limit).
        max_side: images are reduced to this long side before scoring; heatmaps and overlays have that size
            (None: each image's own size, memory grows with it).
        chunk_size: items scored, and made durable, per chunk.
        log: receives the notes on resuming (parts reused, damaged or discarded); None for silence.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_limits(scorer, max_pixels, max_side)
    say = log or (lambda _: None)
    out_dir = Path(out_dir)
    parts = out_dir / PARTS_DIR
    sweep_stale_temps(out_dir)
    options = {
        "overlays": overlays,
        "scores_only": scores_only,
        "max_pixels": max_pixels,
        "max_side": max_side,
        "chunk_size": chunk_size,
    }
    record = run_record(scorer, items, options)
    starts = range(0, len(items), chunk_size)
    finished = _finished_chunks(parts, record, items, starts, out_dir, say)
    atomic_write_bytes(parts / RUN_FILE, (json.dumps(record, indent=1) + "\n").encode("ascii"))
    if finished is not None:
        reused = sum(len(r) for r in finished.values())
        say(
            f"resuming {out_dir}: reused {reused} of {len(items)} items ({len(finished)} of {len(starts)} chunks) "
            f"from an interrupted run; scoring the other {len(items) - reused}"
        )
    finished = finished or {}
    limits = {"max_pixels": max_pixels, "max_side": max_side}
    rows: list[dict] = []
    for c, start in enumerate(starts):
        if c in finished:
            rows.extend(finished.pop(c))
            continue
        chunk = items[start : start + chunk_size]
        chunk_rows = [_base_row(i, it, len(items)) for i, it in enumerate(chunk, start=start)]
        pending = []
        for row, it in zip(chunk_rows, chunk):
            problem = _item_problem(it)
            if problem is None:
                pending.append((row, it))
            else:
                row["error"] = problem
        done = 0
        while done < len(pending):  # groups of the scorer's batch size (which may shrink after out of memory)
            group = pending[done : done + scorer.batch_size]
            done += len(group)
            _score_group(scorer, group, out_dir, overlays=overlays, scores_only=scores_only, limits=limits)
        atomic_write_bytes(parts / _part_name(c), _jsonl(chunk_rows))
        rows.extend(chunk_rows)
    atomic_write_bytes(out_dir / "scores.jsonl", _jsonl(rows))
    atomic_write_bytes(
        out_dir / "scores.csv", _csv(rows, scorer.model.config.score_names).encode("utf-8", "backslashreplace")
    )
    if parts.is_dir():
        shutil.rmtree(parts)
    return rows


def run_record(scorer: RAHFScorer, items: Sequence[ScoreItem], options: dict) -> dict:
    """What a run scores, as ``scores.parts/run.json`` holds it: the hash of the item list (absolute image paths
    and prompts, in order), the model, the options.

    The model is its ``identity`` (source and weights hash), dtype and processor settings; a scorer built in
    memory (no source, no weights hash) is known by a hash of its parameters and buffers instead.
    """
    h = hashlib.sha256()
    for it in items:
        prompt = {"missing": True} if it.prompt is _MISSING else it.prompt
        h.update((json.dumps([os.path.abspath(it.image), prompt], default=repr) + "\n").encode("ascii"))
    identity = dict(scorer.identity)
    if identity.get("weights_hash") is None and identity.get("source") == "in-memory":
        identity["parameters_hash"] = _parameters_hash(scorer.model)
    model = {
        **identity,
        "dtype": str(scorer.dtype).removeprefix("torch."),
        "processor": {f.name: getattr(scorer.processor, f.name) for f in dataclasses.fields(ProcessorConfig)},
        "score_names": list(scorer.model.config.score_names),
    }
    return {
        "format": _RUN_FORMAT,
        "items": {"count": len(items), "sha256": h.hexdigest()},
        "model": json.loads(json.dumps(model, default=repr)),
        "options": dict(options),
    }


def _parameters_hash(model) -> str:
    """SHA-256 (16 hex digits) of a model's parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _record_change(old: object, new: dict) -> str | None:
    """Why an earlier run's record ``old`` is not ``new`` (None when they are the same)."""
    if not isinstance(old, dict) or old.get("format") != new["format"]:
        return "no readable run record"
    changes = []
    if old.get("items") != new["items"]:
        changes.append("the item list")
    if old.get("model") != new["model"]:
        changes.append("the model")
    before = old.get("options") if isinstance(old.get("options"), dict) else {}
    changes += [f"{k} {before.get(k)} -> {v}" for k, v in new["options"].items() if before.get(k, _MISSING) != v]
    return ", ".join(changes) if changes else None


def _finished_chunks(
    parts: Path,
    record: dict,
    items: Sequence[ScoreItem],
    starts: range,
    out_dir: Path,
    say: Callable[[str], None],
) -> dict[int, list[dict]] | None:
    """The rows of each finished chunk an earlier run of the same ``record`` left in ``parts``; None when there
    is no such run. Parts of another run are removed, and damaged ones named, through ``say``."""
    if not parts.is_dir():
        return None
    try:
        old = json.loads((parts / RUN_FILE).read_bytes())
    except (OSError, ValueError):
        old = None
    change = _record_change(old, record)
    if change is not None:
        n = sum(1 for p in parts.glob("*.jsonl"))
        say(f"note: discarding {n} finished chunks of an earlier run in {parts} ({change}); scoring from the start")
        shutil.rmtree(parts)
        return None
    finished = {}
    for c, start in enumerate(starts):
        path = parts / _part_name(c)
        if not path.exists():
            continue
        chunk = items[start : start + record["options"]["chunk_size"]]
        base = [_base_row(i, it, len(items)) for i, it in enumerate(chunk, start=start)]
        rows, problem = _read_part(path, start, base, out_dir)
        if problem is None:
            finished[c] = rows
        else:
            say(f"note: {path} is not a finished chunk ({problem}); its {len(base)} items are scored again")
    return finished


def _read_part(path: Path, start: int, base: list[dict], out_dir: Path) -> tuple[list[dict], str | None]:
    """The rows of a part file when they are exactly its chunk's (``base``: the id, image and prompt of items
    ``start``, ``start + 1``, ...), else a reason."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        return [], f"cannot read it: {err.strerror or err}"
    except UnicodeDecodeError as err:
        return [], f"not UTF-8 at byte {err.start}"
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            return [], f"line {n}: not valid JSON ({err.msg})"
    if len(rows) != len(base):
        return [], f"{len(rows)} rows, expected {len(base)}"
    for n, (row, want) in enumerate(zip(rows, base), start=1):
        want = json.loads(json.dumps(want))  # as the part file holds it (tuples as lists, ...)
        if not isinstance(row, dict) or any(row.get(k, _MISSING) != v for k, v in want.items()):
            return [], f"row {n} is not item {start + n - 1}"
        if "scores" not in row and "error" not in row:
            return [], f"row {n} has neither scores nor an error"
        if "overlay" in row and not (isinstance(row["overlay"], str) and (out_dir / row["overlay"]).is_file()):
            return [], f"row {n}'s overlay {row['overlay']} is missing"
    return rows, None


def _part_name(chunk: int) -> str:
    return f"{chunk:06d}.jsonl"


def check_limits(scorer: RAHFScorer, max_pixels: int | None, max_side: int | None) -> None:
    """Refuse (``ValueError``) a pixel limit below 1 or a side cap below the model's input size."""
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 (or None), got {max_pixels}")
    if max_side is not None and max_side < scorer.processor.image_size:
        raise ValueError(f"max_side must be >= the model's input size {scorer.processor.image_size}, got {max_side}")


def _score_group(
    scorer: RAHFScorer,
    group: list[tuple[dict, ScoreItem]],
    out_dir: Path,
    *,
    overlays: bool,
    scores_only: bool,
    limits: dict,
) -> None:
    """Decode (once, within ``limits``), score and draw one group of items, filling in their rows."""
    decoded = []
    for row, item in group:
        try:
            decoded.append((row, to_rgb(load_image(item.image, **limits))))
        except InvalidImageError as err:
            row["error"] = str(err)
    if not decoded:
        return
    results = scorer.score(
        [row["prompt"] for row, _ in decoded],
        [image for _, image in decoded],
        errors="return",
        heatmap_size="image",
        scores_only=scores_only,
        max_pixels=None,  # applied above, as the images were decoded
    )
    for (row, image), res in zip(decoded, results):
        if isinstance(res, ScoringFailure):
            row["error"] = res.error
            continue
        row.update(_feedback_row(res))
        if overlays and res.heatmaps:
            row["overlay"] = _write_overlay(out_dir, row["id"], image, res)


def _base_row(index: int, item: ScoreItem, total: int) -> dict:
    prompt = None if item.prompt is _MISSING else item.prompt
    return {"id": item_id(index, item.image, total), "image": str(item.image), "prompt": prompt}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("ascii")  # ASCII: lone surrogates stay escaped


def _feedback_row(fb: RichFeedback) -> dict:
    return {
        "scores": {k: round(v, 6) for k, v in fb.scores.items()},
        "misaligned_keywords": fb.misaligned_keywords,
        "keyword_sequence": fb.keyword_sequence,
        "prompt_truncated": fb.prompt_truncated,
    }


def _write_overlay(out_dir: Path, key: str, image: Image.Image, fb: RichFeedback) -> str:
    panels = [overlay_heatmap(image, fb.heatmaps[n]) for n in fb.heatmaps]
    picture = side_by_side([image, *panels])
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    rel = Path("overlays") / f"{key}.png"
    atomic_write_bytes(out_dir / rel, buf.getvalue())
    return str(rel)


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet will not run: text starting with ``= + - @``, tab or CR gets a leading ``'``.

    Numbers pass unchanged; None becomes an empty cell; lists are written as their JSON text.
    """
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv(rows: list[dict], score_names: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "prompt", *score_names, "misaligned_keywords", "error", "id"])
    for r in rows:
        scores = r.get("scores", {})
        writer.writerow(
            [
                csv_cell(r["image"]),
                csv_cell(r["prompt"]),
                *[scores.get(n, "") for n in score_names],
                csv_cell(" ".join(r.get("misaligned_keywords", []))),
                csv_cell(r.get("error", "")),
                csv_cell(r["id"]),
            ]
        )
    return buf.getvalue()
