"""Blind side-by-side rating sheets for the paper's human evaluation of a finetuned generator (§5, Table 5).

The paper showed six raters an image of the original and of the finetuned Muse for the same prompt, in random
order and without saying which is which, and let them choose one of five answers (left much better, left
better, about the same, right better, right much better). :func:`export_rating_sheet` writes such a survey
for checkpoints A and B; :func:`score_rating_sheets` maps the filled sheets back to the five B-vs-A bins of
:mod:`compare.stats`, per rater and pooled.

Layout of ``out_dir``::

    sheet/ratings.csv     item, prompt, left_image, right_image, rating (empty)  -> give this folder to raters
    sheet/images/         <item>_left.png, <item>_right.png (re-encoded: no metadata that could tell A from B)
    sheet/INSTRUCTIONS.txt
    key.csv               item, b_side (left|right), prompt, seed, a_id, b_id   -> keep it from the raters

Ratings: ``left>>right``, ``left>right``, ``same``, ``right>left``, ``right>>left``, or the digits ``2, 1, 0, -1,
-2`` (positive favours the left image); case and spaces are ignored, an empty cell counts as unrated.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.records import ImageRecord
from compare.report import local_path
from compare.stats import BINS

SHEET_COLUMNS = ("item", "prompt", "left_image", "right_image", "rating")
KEY_COLUMNS = ("item", "b_side", "prompt", "seed", "a_id", "b_id")
#: accepted rating strings (after removing spaces and lower-casing) -> preference for the left image
RATINGS = {
    **{"left>>right": 2, "left>right": 1, "same": 0, "right>left": -1, "right>>left": -2},
    **{"2": 2, "1": 1, "0": 0, "-1": -1, "-2": -2, "+2": 2, "+1": 1},
}

_INSTRUCTIONS = """Side-by-side rating

Each row of ratings.csv names two images of the same prompt (columns left_image and right_image, files in
images/). Look at both and write in the "rating" column which one is better:

  left>>right   (or  2)   the left image is significantly better
  left>right    (or  1)   the left image is slightly better
  same          (or  0)   about the same
  right>left    (or -1)   the right image is slightly better
  right>>left   (or -2)   the right image is significantly better

Judge {criterion}. Leave a cell empty if you cannot decide. Do not change the item column.
"""


def _export_image(uri: str, dst: Path, what: str) -> str:
    src = local_path(uri)
    if src is None:
        raise ValueError(f"{what}: image {uri!r} is not a readable local file")
    with Image.open(src) as im:
        im.load()
        im.save(dst, format="PNG")  # a fresh PNG: text chunks and EXIF that could identify the model are gone
    return f"images/{dst.name}"


def export_rating_sheet(
    pairs: Sequence[tuple[ImageRecord, ImageRecord]],
    out_dir: str | Path,
    *,
    seed: int,
    criterion: str = "plausibility: fewer artifacts, distortions and implausible parts",
) -> tuple[Path, Path]:
    """Write a blind rating sheet of ``pairs`` (one row each, in order) and its key; returns (sheet_csv, key_csv).

    B is on the left for ⌈N/2⌉ items chosen by ``np.random.default_rng(seed)``; the sheet names sides only.
    ``criterion`` is what the raters are asked to judge (the paper rated plausibility).
    """
    if not pairs:
        raise ValueError("no pairs to export")
    out = Path(out_dir)
    images = out / "sheet" / "images"
    images.mkdir(parents=True, exist_ok=True)
    b_left = np.random.default_rng(seed).permutation(len(pairs)) % 2 == 0
    sheet_rows, key_rows = [], []
    for i, ((ra, rb), left_is_b) in enumerate(zip(pairs, b_left), 1):
        if (ra.prompt, int(ra.seed)) != (rb.prompt, int(rb.seed)):
            raise ValueError(f"pair {i}: A and B differ in prompt or seed ({ra.prompt!r}/{ra.seed} vs {rb.seed})")
        left, right = (rb, ra) if left_is_b else (ra, rb)
        sheet_rows.append(
            {
                "item": i,
                "prompt": ra.prompt,
                "left_image": _export_image(left.image_uri, images / f"{i:04d}_left.png", f"item {i} left"),
                "right_image": _export_image(right.image_uri, images / f"{i:04d}_right.png", f"item {i} right"),
                "rating": "",
            }
        )
        side = "left" if left_is_b else "right"
        key_rows.append({"item": i, "b_side": side, "prompt": ra.prompt, "seed": ra.seed, "a_id": ra.id, "b_id": rb.id})
    sheet_csv = _write_csv(out / "sheet" / "ratings.csv", SHEET_COLUMNS, sheet_rows, "utf-8-sig")  # BOM: spreadsheets
    (out / "sheet" / "INSTRUCTIONS.txt").write_text(_INSTRUCTIONS.format(criterion=criterion), encoding="utf-8")
    return sheet_csv, _write_csv(out / "key.csv", KEY_COLUMNS, key_rows, "utf-8")


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]], encoding: str) -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
    return path


def _item(value: str | None, where: str) -> int:
    try:
        f = float(str(value).strip())  # a spreadsheet may save 3 as 3.0
    except ValueError:
        f = float("nan")
    if not f.is_integer():
        raise ValueError(f"{where}: item {value!r} is not an item number")
    return int(f)


def read_key(key_csv: str | Path) -> dict[int, str]:
    """item -> ``"left"`` or ``"right"``, the side B was shown on."""
    with open(key_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        key = {}
        for row in reader:
            where = f"{key_csv}: row {reader.line_num}"
            if row.get("b_side") not in ("left", "right"):
                raise ValueError(f"{where}: b_side must be left or right, got {row.get('b_side')!r}")
            key[_item(row.get("item"), where)] = row["b_side"]
    return key


def parse_rating(value: str, where: str) -> int | None:
    """Preference for the left image in -2..2 of one rating cell; None when empty."""
    v = "".join(value.split()).lower()
    if not v:
        return None
    if v not in RATINGS:
        allowed = ", ".join(k for k in RATINGS if not k.startswith("+"))
        raise ValueError(f"{where}: unknown rating {value!r}; use one of {allowed}")
    return RATINGS[v]


def _read_sheet(sheet: Path, key: dict[int, str]) -> dict[int, int | None]:
    """item -> B-vs-A preference in -2..2 (None when unrated) of one filled sheet."""
    with open(sheet, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"item", "rating"} <= set(reader.fieldnames):
            raise ValueError(f"{sheet}: needs columns item and rating, has {reader.fieldnames}")
        prefs: dict[int, int | None] = {}
        for row in reader:
            where = f"{sheet}: row {reader.line_num}"
            item = _item(row["item"], where)
            if item not in key:
                raise ValueError(f"{where}: item {item} is not in the key")
            if item in prefs:
                raise ValueError(f"{where}: item {item} appears twice")
            left = parse_rating(row["rating"] or "", f"{where} (item {item})")
            prefs[item] = None if left is None else (left if key[item] == "left" else -left)
    return prefs


def _bins(prefs: list[int | None], n_items: int) -> dict[str, Any]:
    rated = [p for p in prefs if p is not None]
    counts = {b: sum(1 for p in rated if BINS[2 - p] == b) for b in BINS}
    n = len(rated)
    return {
        "n_items": n_items,
        "n_rated": n,
        "n_unrated": n_items - n,
        "counts": counts,
        "fractions": {b: (c / n if n else 0.0) for b, c in counts.items()},
    }


def score_rating_sheets(sheets: Sequence[str | Path], key_csv: str | Path) -> dict[str, Any]:
    """Map filled rating sheets back to the five B-vs-A bins of :data:`compare.stats.BINS`.

    Returns ``{"bins", "sheets": [{"sheet", "n_items", "n_rated", "n_unrated", "counts", "fractions"}, ...],
    "pooled": {...}}``: counts and fractions of rated items per sheet (one rater each) and over all sheets;
    fractions are of rated items, empty cells and rows missing from a sheet count as unrated. Unknown rating
    strings, items not in the key and repeated items raise ValueError naming the sheet and row.
    """
    if isinstance(sheets, (str, Path)) or not sheets:
        raise ValueError("sheets must be a non-empty list of CSV paths")
    key = read_key(key_csv)
    per_sheet, pooled = [], []
    for sheet in sheets:
        prefs = _read_sheet(Path(sheet), key)
        values = [prefs.get(item) for item in key]
        per_sheet.append({"sheet": str(sheet), **_bins(values, len(key))})
        pooled += values
    return {
        "bins": list(BINS),
        "sheets": per_sheet,
        "pooled": {"n_sheets": len(per_sheet), **_bins(pooled, len(pooled))},
    }
