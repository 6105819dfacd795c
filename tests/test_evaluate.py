"""Evaluation tables on a tiny synthetic split: perfect predictions, the mean baseline, the eval command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rahf.baselines import MeanPredictor, SmallCNN, predict_small_cnn, train_small_cnn
from rahf.evaluate import Predictions, evaluate, load_ground_truth, markdown
from rahf.presets import build_rahf
from rahf.train import load_split
from richfeedback.cli import main
from tests.conftest import synthetic_split_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_split_folder(tmp_path_factory, "synth-eval", {"train": 16, "test": 12}, seed=1)


def test_perfect_predictions_score_perfectly(data_dir):
    gt = load_ground_truth(data_dir, "test")
    perfect = Predictions(dict(gt.scores), dict(gt.heatmaps), list(gt.targets))
    t = evaluate(perfect, gt)
    assert t["n"] == 12
    for n, row in t["scores"].items():
        assert row["plcc"] == pytest.approx(1.0) and row["srcc"] == pytest.approx(1.0), n
    for row in t["heatmaps"].values():
        assert row["mse"] == 0.0
        assert np.isnan(row["cc"]) or row["cc"] == pytest.approx(1.0)
    marked = sum(s.count("_0") for s in gt.targets)
    assert t["keywords"]["tp"] == marked and t["keywords"]["fp"] == 0
    assert "Table 4" in markdown({"perfect": t})


def test_mean_baseline_has_no_ranking_power(data_dir):
    processor = build_rahf("rahf-tiny")[1]
    train = load_split(data_dir, "train", processor)
    gt = load_ground_truth(data_dir, "test")
    t = evaluate(MeanPredictor().fit(train).predict(gt, processor), gt)
    assert all(np.isnan(r["plcc"]) for r in t["scores"].values())  # a constant has no correlation
    assert t["keywords"]["tp"] == 0 and t["keywords"]["f1"] == 0.0
    hm = t["heatmaps"]["implausibility"]
    if not np.isnan(hm["cc"]):
        assert hm["cc"] == pytest.approx(0.0, abs=1e-9) or abs(hm["cc"]) < 1.0


def test_small_cnn_trains_and_predicts_in_range(data_dir):
    processor = build_rahf("rahf-tiny")[1]
    train = load_split(data_dir, "train", processor)
    model = train_small_cnn(train, steps=3, batch_size=8, lr=1e-3)
    assert isinstance(model, SmallCNN)
    pred = predict_small_cnn(model, load_ground_truth(data_dir, "test"), processor)
    assert pred.heatmaps["implausibility"].shape == (12, 64, 64)
    assert all(((v >= 0) & (v <= 1)).all() for v in pred.scores.values())


def test_eval_command_writes_tables(data_dir, tmp_path):
    model_dir = tmp_path / "model"
    model, processor = build_rahf("rahf-tiny")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--data",
                str(data_dir),
                "--model",
                f"tiny={model_dir}",
                "--baselines",
                "--baseline-steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "metrics.json").read_text())
    assert set(results) == {"tiny", "mean predictor", "small CNN"}
    assert {"plausibility", "overall"} <= set(results["tiny"]["scores"])
    assert "Table 2" in (out / "metrics.md").read_text()


def test_empty_map_weight_lowers_heat_on_flawless_training_images(data_dir):
    """The same CNN, seed and steps: with λ = 9 its maps on flawless images are darker than with plain MSE."""
    processor = build_rahf("rahf-tiny")[1]
    train = load_split(data_dir, "train", processor)
    empty = train.heatmaps["misalignment"].flatten(1).amax(dim=1) <= 0
    assert 0 < int(empty.sum()) < len(empty)  # the split has both kinds
    heat = []
    for weight in (0.0, 9.0):
        model = train_small_cnn(train, steps=40, batch_size=8, lr=2e-3, empty_heatmap_weight=weight)
        with torch.no_grad():
            _, maps = model(train.pixels[empty])
        heat.append(float(maps[:, 1].square().mean()))  # the misalignment channel; MSE against an empty target
    assert heat[1] < 0.8 * heat[0]
