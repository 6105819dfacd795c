"""benchmarks/score_readout.py: a dev-fit linear read-out of a model's own outputs against its score heads."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.score_readout import FEATURE_NAMES, features, main, readout_table
from common.names import HEATMAP_NAMES, SCORE_NAMES
from tests.conftest import save_tiny_rahf, synthetic_split_folder


def test_features_summarise_scores_maps_and_keywords():
    scores = {s: 0.1 * (i + 1) for i, s in enumerate(SCORE_NAMES)}
    maps = {h: np.zeros((4, 4), np.float32) for h in HEATMAP_NAMES}
    maps[HEATMAP_NAMES[0]][0, :2] = [0.2, 1.0]  # mean 1.2 / 16, max 1, area above 0.25: 1 / 16
    row = features(scores, maps, ["red", "two"], "two red squares and a circle")
    assert row.shape == (len(FEATURE_NAMES),)
    named = dict(zip(FEATURE_NAMES, row, strict=True))
    assert named[SCORE_NAMES[2]] == pytest.approx(0.3)
    assert named[f"{HEATMAP_NAMES[0]}/mean"] == pytest.approx(1.2 / 16)
    assert named[f"{HEATMAP_NAMES[0]}/max"] == pytest.approx(1.0)
    assert named[f"{HEATMAP_NAMES[0]}/area"] == pytest.approx(1 / 16)
    assert named[f"{HEATMAP_NAMES[1]}/max"] == 0.0
    assert named["keywords/count"] == 2 and named["keywords/share"] == pytest.approx(2 / 6)


def test_readout_gains_only_where_the_outputs_carry_the_truth():
    rng = np.random.default_rng(1)

    def split(n):
        truth = rng.uniform(size=(n, 4))
        heads = truth + rng.normal(scale=[0.5, 0.05, 0.05, 0.05], size=(n, 4))  # the first head is poor
        extra = rng.normal(size=(n, len(FEATURE_NAMES) - 4))
        extra[:, 0] = truth[:, 0] + rng.normal(scale=0.02, size=n)  # ... but a map feature knows the first score
        return np.c_[heads, extra], truth

    x_fit, y_fit = split(300)
    x_eval, y_eval = split(300)
    table = readout_table(x_fit, y_fit, x_eval, y_eval, lam=1.0)
    first, second = table[SCORE_NAMES[0]], table[SCORE_NAMES[1]]
    assert first["head_plcc"] < 0.6 and first["readout_plcc"] > 0.99
    assert abs(second["readout_plcc"] - second["head_plcc"]) < 0.01  # nothing to add beyond a good head


def _run_on_tiny_model(data, tmp_path) -> tuple[str, str]:
    """Save rahf-tiny (random init) and run the command on ``data``; (the model folder, the written table)."""
    model_dir = save_tiny_rahf(tmp_path / "model")
    out = tmp_path / "readout.md"
    assert main(["--data", str(data), "--model", model_dir, "--threads", "1", "--out", str(out)]) == 0
    return model_dir, out.read_text()


def test_command_scores_a_saved_model_on_two_splits(tmp_path_factory, tmp_path, capsys):
    data = synthetic_split_folder(tmp_path_factory, "synth-readout", {"dev": 24, "test": 12}, seed=3)
    model_dir, text = _run_on_tiny_model(data, tmp_path)
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = [line for line in text.splitlines() if line.startswith(f"| {model_dir} |")]
    assert [r.split(" | ")[1] for r in rows] == list(SCORE_NAMES)
    assert "Skipped" not in text
    for r in rows:  # every cell is a pair of correlations in [-1, 1]
        for cell in r.split(" | ")[2:4]:
            assert all(-1.0 <= float(v) <= 1.0 for v in cell.split(" / "))


def test_command_skips_an_unreadable_image_and_names_it(tmp_path_factory, tmp_path):
    from rahf.data.richhf import read_split

    data = synthetic_split_folder(tmp_path_factory, "synth-readout-bad", {"dev": 12, "test": 10}, seed=4)
    broken = read_split(data, "test")[0].image(3)
    broken.write_bytes(b"not a png")
    model_dir, text = _run_on_tiny_model(data, tmp_path)
    assert "Skipped 1 example(s) that could not be scored:" in text and f"- {broken}: " in text
    assert len([line for line in text.splitlines() if line.startswith(f"| {model_dir} |")]) == 4


def test_mirror_prompt_swaps_left_and_right_as_whole_words():
    from benchmarks.score_readout import mirror_prompt

    assert mirror_prompt("two red circles at the left and a blue square at the Right") == (
        "two red circles at the right and a blue square at the left"
    )
    assert mirror_prompt("a leftover square in the middle") == "a leftover square in the middle"


def test_mirrored_features_are_the_mean_of_both_views(tmp_path_factory, tmp_path):
    from PIL import Image, ImageOps

    from benchmarks.score_readout import mirror_prompt, split_features
    from rahf.data.richhf import read_split
    from rahf.scorer import RAHFScorer

    data = synthetic_split_folder(tmp_path_factory, "synth-mirror", {"test": 6}, seed=5)
    model_dir = save_tiny_rahf(tmp_path / "model")
    plain, truth, _ = split_features(model_dir, data, "test", 1, 8, 0.25)
    both, truth_m, _ = split_features(model_dir, data, "test", 1, 8, 0.25, mirror=True)
    assert np.array_equal(truth, truth_m) and not np.allclose(plain, both, rtol=0, atol=1e-9)
    record = read_split(data, "test")[0][0]
    view = ImageOps.mirror(Image.open(record.image).convert("RGB"))
    fb = RAHFScorer.from_pretrained(model_dir, score_readout=False).score(mirror_prompt(record.prompt), [view])[0]
    mirrored = features(fb.scores, fb.heatmaps, fb.misaligned_keywords, mirror_prompt(record.prompt))
    np.testing.assert_allclose(both[0], (plain[0] + mirrored) / 2, rtol=1e-5, atol=1e-6)
