"""compare.rating: blind side-by-side sheets, their key, and filled sheets mapped back to the five B-vs-A bins."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from common.records import ImageRecord
from compare.rating import RATINGS, export_rating_sheet, parse_rating, read_key, score_rating_sheets
from compare.stats import BINS, pair_records

N = 6


def save_png(path: Path, value: int, model: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("model", model)  # metadata that would tell the raters which checkpoint made the image
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path, pnginfo=info)
    return str(path)


@pytest.fixture
def exported(tmp_path):
    a, b = [], []
    for i in range(N):
        prompt = f"prompt {i // 2}, with a comma"
        for side, out, value in (("a", a, 10 * i), ("b", b, 10 * i + 5)):
            uri = save_png(tmp_path / f"{side}{i}.png", value, side.upper())
            out.append(ImageRecord(f"{side}{i}", prompt, i % 2, {}, image_uri=uri, scores={"overall": 0.5}))
    pairs = pair_records(a, b)
    sheet, key = export_rating_sheet(pairs, tmp_path / "survey", seed=0)
    return pairs, sheet, key, tmp_path


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def fill(sheet: Path, out: Path, ratings: list[str]) -> Path:
    r = rows(sheet)
    for row, v in zip(r, ratings):
        row["rating"] = v
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(r[0]))
        w.writeheader()
        w.writerows(r)
    return out


def test_sheet_layout_and_blinding(exported):
    pairs, sheet, key_csv, _ = exported
    assert sheet == sheet.parent / "ratings.csv" and key_csv.parent == sheet.parent.parent  # key outside the sheet
    r = rows(sheet)
    assert list(r[0]) == ["item", "prompt", "left_image", "right_image", "rating"]
    assert [x["item"] for x in r] == [str(i) for i in range(1, N + 1)] and all(x["rating"] == "" for x in r)
    assert r[0]["prompt"] == "prompt 0, with a comma"
    key = read_key(key_csv)
    assert sorted(key) == list(range(1, N + 1)) and sum(v == "left" for v in key.values()) == N // 2
    for row, (ra, rb) in zip(r, pairs):
        b_side = key[int(row["item"])]
        left = Image.open(sheet.parent / row["left_image"])
        right = Image.open(sheet.parent / row["right_image"])
        assert "model" not in left.info and "model" not in right.info
        assert row["left_image"] == f"images/{int(row['item']):04d}_left.png"
        want_left, want_right = (rb, ra) if b_side == "left" else (ra, rb)
        assert np.array_equal(np.asarray(left), np.asarray(Image.open(want_left.image_uri)))
        assert np.array_equal(np.asarray(right), np.asarray(Image.open(want_right.image_uri)))
    assert "left>>right" in (sheet.parent / "INSTRUCTIONS.txt").read_text()


def test_sides_are_seeded(exported):
    pairs, _, key_csv, tmp = exported
    _, key_again = export_rating_sheet(pairs, tmp / "again", seed=0)
    _, key_other = export_rating_sheet(pairs, tmp / "other", seed=1)
    assert read_key(key_again) == read_key(key_csv)
    assert read_key(key_other) != read_key(key_csv)


def test_scores_map_back_to_b_vs_a_bins(exported):
    _, sheet, key_csv, tmp = exported
    key = read_key(key_csv)
    # rater 1 always prefers B strongly, in words
    r1 = ["left>>right" if key[i] == "left" else "right>>left" for i in range(1, N + 1)]
    # rater 2 gives +1 (left slightly better) to every item: B > A where B is left, B < A where it is right
    r2 = ["1"] * N
    # rater 3: items 1, 2 "same", item 3 "-2" (right much better), the rest empty
    r3 = [" Same ", "0", "-2", "", "", ""]
    sheets = [fill(sheet, tmp / f"rater{k}.csv", r) for k, r in enumerate((r1, r2, r3), 1)]
    got = score_rating_sheets(sheets, key_csv)
    assert got["bins"] == list(BINS)
    s1, s2, s3 = got["sheets"]
    assert s1["counts"] == {"much_better": N, "better": 0, "same": 0, "worse": 0, "much_worse": 0}
    assert s1["fractions"]["much_better"] == 1.0 and (s1["n_rated"], s1["n_unrated"]) == (N, 0)
    assert s2["counts"] == {"much_better": 0, "better": N // 2, "same": 0, "worse": N // 2, "much_worse": 0}
    b3 = "much_worse" if key[3] == "left" else "much_better"
    assert s3["counts"] == {**dict.fromkeys(BINS, 0), "same": 2, b3: 1}
    assert (s3["n_rated"], s3["n_unrated"]) == (3, 3) and s3["fractions"]["same"] == pytest.approx(2 / 3)
    pooled = got["pooled"]
    assert pooled["n_sheets"] == 3 and (pooled["n_rated"], pooled["n_unrated"]) == (15, 3)
    assert sum(pooled["counts"].values()) == 15
    assert pooled["counts"]["much_better"] == N + (b3 == "much_better")
    assert pooled["fractions"]["same"] == pytest.approx(2 / 15)


def test_rows_missing_from_a_sheet_count_as_unrated(exported):
    _, sheet, key_csv, tmp = exported
    r = rows(sheet)[:2]
    r[0]["rating"], r[1]["rating"] = "right>left", "LEFT > RIGHT"
    out = tmp / "short.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(r[0]))
        w.writeheader()
        w.writerows(r)
    s = score_rating_sheets([out], key_csv)["sheets"][0]
    assert (s["n_items"], s["n_rated"], s["n_unrated"]) == (N, 2, N - 2)


def test_bad_sheets_name_the_row(exported):
    _, sheet, key_csv, tmp = exported
    bad = fill(sheet, tmp / "bad.csv", ["same", "better"])
    with pytest.raises(ValueError, match=r"bad.csv: row 3 \(item 2\): unknown rating 'better'"):
        score_rating_sheets([bad], key_csv)
    r = rows(sheet)
    r[1]["item"] = "1"
    dup = tmp / "dup.csv"
    with open(dup, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(r[0]))
        w.writeheader()
        w.writerows(r)
    with pytest.raises(ValueError, match="row 3: item 1 appears twice"):
        score_rating_sheets([dup], key_csv)
    r[1]["item"] = "99"
    with open(dup, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(r[0]))
        w.writeheader()
        w.writerows(r)
    with pytest.raises(ValueError, match="row 3: item 99 is not in the key"):
        score_rating_sheets([dup], key_csv)
    with pytest.raises(ValueError, match="non-empty list"):
        score_rating_sheets(str(sheet), key_csv)


def test_parse_rating_table():
    assert {k: parse_rating(k, "x") for k in RATINGS} == RATINGS
    assert parse_rating("  ", "x") is None and parse_rating("Right >> Left", "x") == -2
    with pytest.raises(ValueError, match="x: unknown rating '3'"):
        parse_rating("3", "x")


def test_export_needs_local_images(tmp_path):
    with pytest.raises(ValueError, match="no pairs"):
        export_rating_sheet([], tmp_path, seed=0)
    a = ImageRecord("a", "p", 0, {}, image_uri="s3://bucket/a.png")
    b = ImageRecord("b", "p", 0, {}, image_uri="s3://bucket/b.png")
    with pytest.raises(ValueError, match=r"item 1 left: image 's3://bucket/[ab].png' is not a readable local file"):
        export_rating_sheet([(a, b)], tmp_path, seed=0)
    with pytest.raises(ValueError, match="differ in prompt or seed"):
        export_rating_sheet([(a, ImageRecord("b", "p", 1, {}))], tmp_path, seed=0)
