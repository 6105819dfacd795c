"""Score a list of (image file, prompt) items into an output folder: the library behind ``richfeedback score``.

Writes, per run folder:

* ``scores.jsonl``: one line per item in input order — image, prompt, the four scores, misaligned keywords,
  the keyword sequence, the overlay files, or ``error`` for an item that could not be scored;
* ``scores.csv``: the same scores as a table;
* ``overlays/<stem>.png``: the image beside its implausibility and misalignment overlays.

Every file is written to a temporary name and renamed, so an interrupted run never leaves half a file. One bad
image becomes a line with its error; the rest of the batch is scored.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_bytes
from rahf.processor import load_image, to_rgb
from rahf.scorer import RAHFScorer, RichFeedback, ScoringFailure
from rahf.visualize import overlay_heatmap, side_by_side


@dataclass
class ScoreItem:
    """One input: an image file and the prompt it was generated from."""

    image: Path
    prompt: str


def read_items(path: str | Path) -> list[ScoreItem]:
    """Read a JSONL file of ``{"image": path, "prompt": str}``; image paths are relative to the file."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(ScoreItem(path.parent / row["image"], str(row["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f'{path}:{n}: expected {{"image": ..., "prompt": ...}}: {err}') from err
    return items


def score_items(
    scorer: RAHFScorer,
    items: Sequence[ScoreItem],
    out_dir: str | Path,
    *,
    overlays: bool = True,
    scores_only: bool = False,
) -> list[dict]:
    """Score ``items`` and write the run folder; returns the JSONL rows."""
    out_dir = Path(out_dir)
    results = scorer.score(
        [it.prompt for it in items],
        [it.image for it in items],
        errors="return",
        heatmap_size="image",
        scores_only=scores_only,
    )
    rows = []
    for item, res in zip(items, results):
        row: dict = {"image": str(item.image), "prompt": item.prompt}
        if isinstance(res, ScoringFailure):
            row["error"] = res.error
        else:
            row.update(_feedback_row(res))
            if overlays and res.heatmaps:
                row["overlay"] = _write_overlay(out_dir, item, res)
        rows.append(row)
    atomic_write_bytes(out_dir / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    atomic_write_bytes(out_dir / "scores.csv", _csv(rows, scorer.model.config.score_names).encode())
    return rows


def _feedback_row(fb: RichFeedback) -> dict:
    return {
        "scores": {k: round(v, 6) for k, v in fb.scores.items()},
        "misaligned_keywords": fb.misaligned_keywords,
        "keyword_sequence": fb.keyword_sequence,
        "prompt_truncated": fb.prompt_truncated,
    }


def _write_overlay(out_dir: Path, item: ScoreItem, fb: RichFeedback) -> str:
    image = load_image(item.image)
    panels = [overlay_heatmap(image, fb.heatmaps[n]) for n in fb.heatmaps]
    picture = side_by_side([to_rgb(image), *panels])
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    rel = Path("overlays") / f"{item.image.stem}.png"
    atomic_write_bytes(out_dir / rel, buf.getvalue())
    return str(rel)


def _csv(rows: list[dict], score_names: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "prompt", *score_names, "misaligned_keywords", "error"])
    for r in rows:
        scores = r.get("scores", {})
        writer.writerow(
            [
                r["image"],
                r["prompt"],
                *[scores.get(n, "") for n in score_names],
                " ".join(r.get("misaligned_keywords", [])),
                r.get("error", ""),
            ]
        )
    return buf.getvalue()
