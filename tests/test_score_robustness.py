"""Batch scoring under hostile input: huge images, shared file stems, bad lines, odd prompts, CSV formulas, modes."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.lines import BadLinesError, read_prompt_lines
from common.records import RichFeedback, ScoringFailure
from rahf.batch import PARTS_DIR, ScoreItem, read_items, score_items
from rahf.processor import ImageTooLargeError, InvalidImageError, load_image
from richfeedback.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height`` RGB, then IEND: what a decompression bomb shows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _solid(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


# -- row 1: a decompression bomb is one error record; results are durable chunk by chunk -----------------------


def test_decompression_bomb_is_an_error_record_and_the_rest_are_written(scorer, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    good = _solid(tmp_path / "good.png", (40, 30), (90, 90, 90))
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png"):
        load_image(bomb)
    out = tmp_path / "run"
    rows = score_items(scorer, [ScoreItem(good, "a"), ScoreItem(bomb, "b"), ScoreItem(good, "c")], out)
    assert [("error" in r) for r in rows] == [False, True, False]
    assert "too large" in rows[1]["error"] and "400000000 pixels" in rows[1]["error"]
    assert all(0.0 < v < 1.0 for r in (rows[0], rows[2]) for v in r["scores"].values())
    assert _rows(out) == rows
    assert not (out / PARTS_DIR).exists()


def test_library_errors_return_catches_the_bomb(scorer, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    results = scorer.score(["a", "b"], [bomb, Image.new("RGB", (20, 20))], errors="return")
    assert isinstance(results[0], ScoringFailure) and "too large" in results[0].error
    assert isinstance(results[1], RichFeedback)


def test_a_crash_late_in_a_batch_keeps_the_chunks_already_scored(scorer, tmp_path, monkeypatch):
    paths = [_solid(tmp_path / f"im{i}.png", (30, 20), (10 * i, 50, 60)) for i in range(5)]
    items = [ScoreItem(p, f"prompt {i}") for i, p in enumerate(paths)]
    real, calls = scorer.score, []

    def crash_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer, "score", crash_on_third_chunk)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        score_items(scorer, items, out, chunk_size=2)
    parts = sorted((out / PARTS_DIR).glob("*.jsonl"))
    kept = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    assert [r["prompt"] for r in kept] == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"]
    assert all("scores" in r and (out / r["overlay"]).is_file() for r in kept)
    assert not (out / "scores.jsonl").exists()
    # A rerun reuses the two finished chunks and scores only the last (tests/test_score_resume.py has the rest).
    rescored = []
    monkeypatch.setattr(scorer, "score", lambda prompts, *a, **k: rescored.extend(prompts) or real(prompts, *a, **k))
    rows = score_items(scorer, items, out, chunk_size=2)
    assert rescored == ["prompt 4"]
    assert len(_rows(out)) == 5 and [r["prompt"] for r in rows] == [f"prompt {i}" for i in range(5)]
    assert not (out / PARTS_DIR).exists()
    assert [r["scores"] for r in rows[:4]] == [r["scores"] for r in kept]


# -- row 2: a pixel limit, and heatmaps / overlays capped in size -------------------------------------------------


def test_images_over_the_pixel_limit_are_error_records(scorer, tmp_path):
    big = _solid(tmp_path / "big.png", (3000, 3000), (200, 40, 90))
    small = _solid(tmp_path / "small.png", (30, 30), (200, 40, 90))
    rows = score_items(scorer, [ScoreItem(big, "a"), ScoreItem(small, "a")], tmp_path / "run", max_pixels=4_000_000)
    assert "3000x3000" in rows[0]["error"] and "max_pixels" in rows[0]["error"] and "4000000" in rows[0]["error"]
    assert "scores" in rows[1]


def test_big_images_give_capped_heatmaps_and_overlays_with_the_same_scores(scorer, tmp_path):
    colour = (200, 40, 90)
    big = _solid(tmp_path / "big.png", (3000, 1500), colour)
    small = _solid(tmp_path / "small.png", (128, 64), colour)
    out = tmp_path / "run"
    rows = score_items(scorer, [ScoreItem(big, "a red square"), ScoreItem(small, "a red square")], out, max_side=128)
    for r in rows:
        overlay = Image.open(out / r["overlay"])
        assert overlay.size == (3 * 128 + 8, 64)  # image | two heatmaps, 4 px gaps, long side capped at 128
        assert overlay.getpixel((5, 5)) == colour  # the left panel is the (reduced) image itself
    for name, value in rows[0]["scores"].items():
        assert 0.0 < value < 1.0 and abs(value - rows[1]["scores"][name]) < 1e-5


def test_library_max_side_caps_image_sized_heatmaps(scorer):
    im = Image.new("RGB", (3000, 1500), (10, 200, 30))
    (fb,) = scorer.score("a", [im], heatmap_size="image", max_side=256)
    assert all(hm.shape == (128, 256) and 0.0 <= hm.min() <= hm.max() <= 1.0 for hm in fb.heatmaps.values())
    with pytest.raises(ValueError, match="max_side"):
        scorer.score("a", [im], max_side=scorer.processor.image_size - 1)
    (failure,) = scorer.score("a", [im], max_pixels=1_000_000, errors="return")
    assert isinstance(failure, ScoringFailure) and "3000x1500" in failure.error


def test_jpeg_is_decoded_reduced(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (120, 30, 200)).save(path, quality=90)
    im = load_image(path, max_side=500)
    assert im.size == (500, 375) and im.mode == "RGB"
    assert np.abs(np.asarray(im, dtype=int) - (120, 30, 200)).max() <= 3
    with pytest.raises(ImageTooLargeError, match="4000x3000"):
        load_image(path, max_pixels=10_000_000)


def test_cli_max_pixels_and_max_side_flags(tmp_path):
    big = _solid(tmp_path / "big.png", (1200, 600), (0, 0, 255))
    out = tmp_path / "run"
    args = ["score", "--image", str(big), "--prompt", "blue", "--out", str(out)]
    assert main([*args, "--max-side", "200"]) == 0
    assert Image.open(out / _rows(out)[0]["overlay"]).size == (3 * 200 + 8, 100)
    assert main([*args, "--max-pixels", "500000"]) == 1
    assert "over the limit" in _rows(out)[0]["error"]
    assert main([*args, "--max-side", "10"]) == 2  # below the model's input size: refused before any scoring


# -- row 3: outputs named by item, never overwritten ----------------------------------------------------------


def test_items_sharing_a_stem_or_an_image_get_their_own_overlays(scorer, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    red = _solid(tmp_path / "a" / "cat.png", (32, 32), (255, 0, 0))
    green = _solid(tmp_path / "b" / "cat.png", (32, 32), (0, 255, 0))
    items = [ScoreItem(red, "a cat"), ScoreItem(green, "a cat")] + [ScoreItem(red, f"prompt {i}") for i in range(12)]
    out = tmp_path / "run"
    rows = score_items(scorer, items, out)
    overlays = [r["overlay"] for r in rows]
    assert len(set(overlays)) == 14 and len(list((out / "overlays").glob("*.png"))) == 14
    assert len({r["id"] for r in rows}) == 14
    assert Image.open(out / overlays[0]).getpixel((1, 1)) == (255, 0, 0)
    assert Image.open(out / overlays[1]).getpixel((1, 1)) == (0, 255, 0)
    assert all("cat" in Path(o).stem for o in overlays)


# -- row 4: bad lines are reported by file:line; --strict refuses the file ------------------------------------


def _items_file(tmp_path: Path) -> Path:
    _solid(tmp_path / "good.png", (24, 24), (1, 2, 3))
    good = json.dumps({"image": "good.png", "prompt": "a square"}).encode()
    path = tmp_path / "items.jsonl"
    path.write_bytes(good + b"\n" + b'{"image": "good.png", "prompt": "caf\xe9"}\n' + b"{not json\n\n" + good + b"\n")
    return path


def test_read_items_reports_bad_lines_and_keeps_the_good(tmp_path):
    path = _items_file(tmp_path)
    items, issues = read_items(path)
    assert [it.prompt for it in items] == ["a square", "a square"]
    assert [(i.line, str(i).split(": ")[0]) for i in issues] == [(2, f"{path}:2"), (3, f"{path}:3")]
    assert "UTF-8" in issues[0].reason and "JSON" in issues[1].reason and not any(i.kept for i in issues)
    with pytest.raises(BadLinesError, match=f"{path}:2"):
        read_items(path, strict=True)


def test_cli_score_counts_bad_lines_and_strict_refuses(tmp_path, capsys):
    path = _items_file(tmp_path)
    out = tmp_path / "run"
    assert main(["score", "--items", str(path), "--out", str(out), "--scores-only"]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and f"{path}:3:" in err and "2 bad lines" in err
    assert len(_rows(out)) == 2 and all("scores" in r for r in _rows(out))
    strict = tmp_path / "strict"
    assert main(["score", "--items", str(path), "--out", str(strict), "--strict"]) == 2
    assert f"{path}:2:" in capsys.readouterr().err and not strict.exists()


def test_prompt_lines_reader(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\n\xff\xfe bad\n\nsecond \x00 nul\n  a dog  \r\n")
    prompts, issues = read_prompt_lines(path)
    assert prompts == ["a cat", "a dog"] and [i.line for i in issues] == [2, 4]
    with pytest.raises(BadLinesError, match=f"{path}:2"):
        read_prompt_lines(path, strict=True)
    assert main(["loop", "--prompts", str(path), "--strict", "--out", str(tmp_path / "loop")]) == 2
    assert f"{path}:2:" in capsys.readouterr().err


# -- row 5: a prompt that is not a string is refused for its item ---------------------------------------------


def test_non_string_prompts_are_error_records(scorer, tmp_path):
    _solid(tmp_path / "im.png", (24, 24), (9, 9, 9))
    lines = [{"image": "im.png", "prompt": p} for p in (None, 5, ["a", "b"], "fine")] + [{"image": "im.png"}]
    items_path = tmp_path / "items.jsonl"
    items_path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"image": "im.png", "prompt": "\\ud800"}\n')
    items, issues = read_items(items_path)
    assert len(items) == 6 and [i.line for i in issues] == [1, 2, 3, 5, 6] and all(i.kept for i in issues)
    rows = score_items(scorer, items, tmp_path / "run")
    assert [r["prompt"] for r in rows[:4]] == [None, 5, ["a", "b"], "fine"]
    assert "got null" in rows[0]["error"] and "got int" in rows[1]["error"] and "got list" in rows[2]["error"]
    assert "scores" in rows[3] and "no prompt" in rows[4]["error"] and "surrogate" in rows[5]["error"]
    results = scorer.score(["a", None], [Image.new("RGB", (9, 9))] * 2, errors="return")  # type: ignore[list-item]
    assert isinstance(results[0], RichFeedback) and isinstance(results[1], ScoringFailure)
    assert "prompt must be a string" in results[1].error


# -- row 6: CSV cells that a spreadsheet would run as formulas are neutralised -----------------------------------


def test_csv_neutralises_formula_cells_and_jsonl_keeps_the_prompt(scorer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _solid(tmp_path / "=evil.png", (16, 16), (5, 5, 5))
    prompts = ['=HYPERLINK("http://x","y")', "+1", "-2", "@SUM(A1)", "\tx", "\rx", "a cat"]
    items = [ScoreItem(Path("=evil.png"), p) for p in prompts] + [ScoreItem(Path("-missing.png"), "a")]
    out = tmp_path / "run"
    score_items(scorer, items, out, overlays=False)
    assert [r["prompt"] for r in _rows(out)] == [*prompts, "a"]
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["prompt"] for r in table] == ["'" + p for p in prompts[:-1]] + ["a cat", "a"]
    assert {r["image"] for r in table} == {"'=evil.png", "'-missing.png"}
    assert table[-1]["error"].startswith("cannot open image")
    assert float(table[0]["overall"]) == pytest.approx(_rows(out)[0]["scores"]["overall"])


# -- row 7: files follow the user's umask -------------------------------------------------------------------------


def test_outputs_follow_the_umask(scorer, tmp_path):
    im = _solid(tmp_path / "im.png", (16, 16), (5, 5, 5))
    old = os.umask(0o022)
    try:
        score_items(scorer, [ScoreItem(im, "a"), ScoreItem(im, "b")], tmp_path / "run", chunk_size=1)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) == 4 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


# -- the command's messages and exit code --------------------------------------------------------------------------


def test_scores_only_does_not_announce_overlays_and_failures_are_counted(tmp_path, capsys):
    good = _solid(tmp_path / "good.png", (24, 24), (1, 2, 3))
    out = tmp_path / "run"
    assert main(["score", "--image", str(good), "--prompt", "x", "--out", str(out), "--scores-only"]) == 0
    text = capsys.readouterr().out
    assert "overlays" not in text and "scores.jsonl" in text
    missing = tmp_path / "missing.png"
    assert main(["score", "--image", str(good), str(missing), "--prompt", "x", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "1 of 2 items failed" in text and "overlays" in text


def test_load_image_wraps_any_decoder_failure(tmp_path):
    with pytest.raises(InvalidImageError, match="cannot open"):
        load_image("bad\x00name.png")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with pytest.raises(InvalidImageError):
        load_image(buf.getvalue()[:40])
