"""The command line: `richfeedback samples` and `richfeedback score`, end to end on files."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from common.names import SCORE_NAMES
from richfeedback.cli import main


def test_samples_writes_scores_overlays_and_keywords(tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["samples", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and not any("error" in r for r in rows)
    for r in rows:
        assert set(r["scores"]) == set(SCORE_NAMES)
        assert all(0.0 < v < 1.0 for v in r["scores"].values())
        assert isinstance(r["misaligned_keywords"], list) and isinstance(r["keyword_sequence"], str)
        overlay = Image.open(out / r["overlay"])
        source = Image.open(r["image"])
        # image | implausibility | misalignment, 4 px gaps, at the image's own size
        assert overlay.size == (3 * source.width + 8, source.height) and overlay.mode == "RGB"
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header.startswith("image,prompt,plausibility,alignment,aesthetics,overall")
    assert "wrote" in capsys.readouterr().out


def test_score_keeps_going_past_a_bad_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 50, 3), 90, dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps({"image": "good.png", "prompt": "a grey square"})
        + "\n"
        + json.dumps({"image": "bad.png", "prompt": "a cat"})
        + "\n"
    )
    out = tmp_path / "run"
    # exit 1: an item failed; the rest is still scored and written
    assert main(["score", "--items", str(items), "--out", str(out), "--scores-only"]) == 1
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert "scores" in rows[0] and "overlay" not in rows[0]
    assert "cannot decode image" in rows[1]["error"]
    assert not list(out.glob(".*.tmp"))


def test_score_needs_inputs(tmp_path, capsys):
    assert main(["score", "--out", str(tmp_path)]) == 2
    assert "--items" in capsys.readouterr().err


def test_finetune_command_fits_the_synthetic_world(tmp_path, capsys):
    from common.records import ImageRecord
    from finetune.dataset import export_dataset
    from generators.base import encode_png
    from generators.synthetic import SyntheticGenerator

    records = []
    for g in SyntheticGenerator().generate(["a red circle at the left"], 4):
        path = tmp_path / f"{g.id}.png"
        path.write_bytes(encode_png(g.image))
        rec = ImageRecord.from_generated(g, str(path))
        rec.scores = g.truth["scores"]
        records.append(rec)
    export_dataset(records, str(tmp_path / "data"))
    args = [
        "finetune",
        "--data-dir",
        str(tmp_path / "data"),
        "--out-dir",
        str(tmp_path / "ft"),
        "--generator",
        "synthetic",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["examples"] == 4 and (tmp_path / "ft" / "adapter" / "flaws.json").is_file()
    assert set(out["flaws"]["distortion"]) == {"circle", "square", "triangle", "diamond"}


def test_rating_sheet_round_trip_through_the_commands(tmp_path, capsys):
    from flows.config import LoopConfig
    from flows.stages import generate_and_score

    for side in ("a", "b"):
        config = LoopConfig(generator="synthetic", rahf="rahf-tiny", per_prompt=3)
        generate_and_score(str(tmp_path / "cmp" / "compare" / side), ["a red circle at the left"], config)
    assert main(["rating-sheet", str(tmp_path / "cmp"), "--out", str(tmp_path / "rs"), "--seed", "1"]) == 0
    sheet = tmp_path / "rs" / "sheet" / "ratings.csv"
    lines = sheet.read_text(encoding="utf-8-sig").splitlines()
    assert len(lines) == 4 and lines[0].endswith("rating")
    sheet.write_text("\n".join([lines[0]] + [ln + "same" for ln in lines[1:]]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["rating-score", str(sheet), "--key", str(tmp_path / "rs" / "key.csv")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pooled"]["n_rated"] == 3 and result["pooled"]["fractions"]["same"] == 1.0
