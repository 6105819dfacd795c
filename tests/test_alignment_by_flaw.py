"""benchmarks/alignment_by_flaw.py: a model's alignment score grouped by the kind of misalignment of each image."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.alignment_by_flaw import by_flaw, flaw_key, gaps, main
from tests.conftest import save_tiny_rahf, synthetic_split_folder


def test_flaw_key_counts_groups_and_names_the_alignment_kinds_in_order():
    one = "two red circles at the left"
    two = one + " and a blue square in the middle"
    assert flaw_key(one, ["distortion:circle"]) == (1, "none")  # distortion is not an alignment flaw
    assert flaw_key(two, ["extra:1", "wrong_colour:0", "distortion:square"]) == (2, "wrong_colour+extra")
    assert flaw_key(two, ["extra:0", "missing:0"]) == (2, "missing+extra")


def test_table_means_and_the_one_group_gaps():
    rows = [
        ((1, "none"), 1.0, 0.9, 0.1, 0),
        ((1, "none"), 1.0, 0.8, 0.0, 0),
        ((1, "wrong_colour"), 2 / 3, 0.85, 0.2, 1),
        ((1, "missing"), 1 / 3, 0.35, 0.0, 2),
        ((2, "extra"), 5 / 6, 0.7, 0.6, 1),
    ]
    table = by_flaw(rows)
    assert list(table) == [(1, "missing"), (1, "none"), (1, "wrong_colour"), (2, "extra")]
    np.testing.assert_allclose(table[(1, "none")], [2, 1.0, 0.85, 0.05, 0.0])
    g = gaps(table)
    assert set(g) == {"wrong_colour", "missing"}  # no one-group image with an extra object alone
    assert g["wrong_colour"] == pytest.approx((1 / 3, 0.0))  # blind to the colour: no gap in the score
    assert g["missing"] == pytest.approx((2 / 3, 0.5))


def test_command_scores_a_saved_model_and_every_image_lands_in_one_row(tmp_path_factory, tmp_path, capsys):
    data = synthetic_split_folder(tmp_path_factory, "synth-by-flaw", {"test": 40}, seed=5)
    model_dir = save_tiny_rahf(tmp_path / "model")
    out = tmp_path / "by_flaw.md"
    args = ["--data", str(data), "--model", f"tiny={model_dir}", "--min-count", "1", "--threads", "1"]
    assert main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| tiny |")]
    assert sum(int(r[3]) for r in rows) == 40
    for r in rows:
        assert 0.0 <= float(r[4]) <= 1.0 and 0.0 <= float(r[5]) <= 1.0
        if r[2] == "none":
            assert float(r[4]) == pytest.approx(1.0)  # a flawless image is fully aligned in truth
    assert "- tiny: " in text and "Skipped" not in text


def test_command_skips_an_unreadable_image_and_names_it(tmp_path_factory, tmp_path):
    from benchmarks import synthetic_rows

    data = synthetic_split_folder(tmp_path_factory, "synth-by-flaw-bad", {"test": 12}, seed=6)
    broken = data / synthetic_rows(data, "test")[4]["image"]
    broken.write_bytes(b"not a png")
    model_dir = save_tiny_rahf(tmp_path / "model")
    out = tmp_path / "by_flaw.md"
    assert main(["--data", str(data), "--model", f"tiny={model_dir}", "--min-count", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Skipped 1 image(s) that could not be scored:" in text and f"- {broken}: " in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| tiny |")]
    assert sum(int(r[3]) for r in rows) == 11  # the other images are all scored


def test_an_image_without_a_label_is_skipped_and_named(tmp_path_factory, tmp_path):
    import json

    data = synthetic_split_folder(tmp_path_factory, "synth-by-flaw-nolabel", {"test": 6}, seed=7)
    jsonl = data / "test.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    extra = {**rows[0], "uid": "not-in-the-tfrecord"}
    jsonl.write_text("\n".join(json.dumps(r) for r in [*rows, extra]) + "\n")
    model_dir = save_tiny_rahf(tmp_path / "model")
    out = tmp_path / "by_flaw.md"
    assert main(["--data", str(data), "--model", f"tiny={model_dir}", "--min-count", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "no label for uid 'not-in-the-tfrecord'" in text
    assert sum(int(r.split(" | ")[3]) for r in text.splitlines() if r.startswith("| tiny |")) == 6
