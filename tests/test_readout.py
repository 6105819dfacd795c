"""rahf.readout: the score read-out fit on a held-out split, saved beside the weights, applied by the scorer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.processor import load_image
from rahf.readout import (
    READOUT_FILE,
    ReadoutConfig,
    ScoreReadout,
    feature_names,
    fit_ridge,
    fit_score_readout,
    output_features,
    predict,
)
from rahf.scorer import RAHFScorer
from richfeedback.cli import main
from tests.conftest import save_tiny_rahf, synthetic_split_folder

F = len(feature_names(SCORE_NAMES, HEATMAP_NAMES))


def _random_readout(n: int = 40, seed: int = 0) -> tuple[ScoreReadout, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, F))
    truth = np.clip(x[:, :4] * 0.5 + x[:, 4:8] * 0.4 + rng.normal(scale=0.05, size=(n, 4)), 0, 1)
    present = np.c_[x[:, 4] > 0.5, x[:, 7] > 0.3]  # heat where a map's mean column says so
    return ScoreReadout.fit(x, truth, SCORE_NAMES, HEATMAP_NAMES, ReadoutConfig(lam=1.0), present), x


def test_features_are_the_scores_then_each_map_s_mean_peak_and_hot_area():
    assert feature_names(SCORE_NAMES, HEATMAP_NAMES)[:5] == (*SCORE_NAMES, f"{HEATMAP_NAMES[0]}/mean")
    scores = {s: torch.tensor([0.1 * (i + 1), 0.5]) for i, s in enumerate(SCORE_NAMES)}
    maps = {h: torch.zeros(2, 4, 4) for h in HEATMAP_NAMES}
    maps[HEATMAP_NAMES[0]][0, 0, :2] = torch.tensor([0.2, 1.0])  # mean 1.2 / 16, max 1, area above 0.25: 1 / 16
    x = output_features(scores, maps, SCORE_NAMES, HEATMAP_NAMES, 0.25)
    assert x.shape == (2, F)
    named = dict(zip(feature_names(SCORE_NAMES, HEATMAP_NAMES), x[0].tolist(), strict=True))
    assert named[SCORE_NAMES[2]] == pytest.approx(0.3)
    assert named[f"{HEATMAP_NAMES[0]}/mean"] == pytest.approx(1.2 / 16)
    assert named[f"{HEATMAP_NAMES[0]}/max"] == pytest.approx(1.0)
    assert named[f"{HEATMAP_NAMES[0]}/area"] == pytest.approx(1 / 16)
    assert named[f"{HEATMAP_NAMES[1]}/max"] == 0.0 and x[1, 4:].abs().sum() == 0


def test_ridge_recovers_a_linear_map_and_shrinks_with_the_penalty():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, -1.0]
    x = np.c_[x, np.full(200, 7.0)]  # a constant column must not break the fit
    y = 0.5 + x[:, 0] - 0.2 * x[:, 1] + 3.0 * x[:, 2]
    exact = fit_ridge(x, y, lam=0.0)
    assert np.allclose(predict(x, exact), y, atol=1e-9)
    shrunk = fit_ridge(x, y, lam=1000.0)
    assert np.abs(shrunk[2][1:]).sum() < np.abs(exact[2][1:]).sum()
    assert shrunk[2][0] == pytest.approx(y.mean())  # the intercept is not penalised
    with pytest.raises(ValueError, match="lam must be >= 0"):
        fit_ridge(x, y, lam=-1.0)
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        fit_ridge(x, y[:10], lam=1.0)


def test_the_tensor_path_equals_the_numpy_path_and_stays_in_0_1():
    readout, x = _random_readout()
    scores = {s: torch.tensor(x[:, i], dtype=torch.float32) for i, s in enumerate(SCORE_NAMES)}
    maps = {
        h: torch.rand(len(x), 8, 8, generator=torch.Generator().manual_seed(i)) for i, h in enumerate(HEATMAP_NAMES)
    }
    feats = output_features(scores, maps, SCORE_NAMES, HEATMAP_NAMES, readout.area_threshold).double().numpy()
    got, gated = readout.apply(scores, maps)
    want, gates = readout.apply_numpy(feats), readout.gates_numpy(feats)
    for j, name in enumerate(SCORE_NAMES):
        assert got[name].dtype == torch.float32 and got[name].shape == (len(x),)
        assert np.allclose(got[name].numpy(), want[:, j], atol=1e-5)
    for k, name in enumerate(HEATMAP_NAMES):  # each map scaled by its own presence probability
        assert np.allclose(gated[name].numpy(), maps[name].numpy() * gates[:, k, None, None], atol=1e-6)
    assert ((gates > 0) & (gates < 1)).all()
    far = readout.apply_numpy(np.full((1, F), 1e6))
    assert far.min() >= 0.0 and far.max() <= 1.0  # clipped, however far outside the fit the features are


def test_presence_gates_learn_which_maps_have_heat():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, F))
    present = np.c_[x[:, 4] + 0.3 * x[:, 5] > 0, x[:, 7] > 0.5]  # two rules a logistic gate can express
    readout = ScoreReadout.fit(
        x, rng.uniform(size=(300, 4)), SCORE_NAMES, HEATMAP_NAMES, ReadoutConfig(lam=0.1), present
    )
    fresh = rng.normal(size=(300, F))
    truth = np.c_[fresh[:, 4] + 0.3 * fresh[:, 5] > 0, fresh[:, 7] > 0.5]
    p = readout.gates_numpy(fresh)
    assert p.shape == (300, 2) and np.mean((p > 0.5) == truth) > 0.95  # on images it was not fit on
    assert readout.gate_weight[0, 4] > 0 and abs(readout.gate_weight[0, 4]) > abs(readout.gate_weight[0, 0])
    plain = ScoreReadout.fit(x, rng.uniform(size=(300, 4)), SCORE_NAMES, HEATMAP_NAMES, ReadoutConfig(map_gates=False))
    maps = {h: torch.ones(2, 3, 3) for h in HEATMAP_NAMES}
    scores = {s: torch.zeros(2) for s in SCORE_NAMES}
    assert plain.gates_numpy(x) is None and plain.apply(scores, maps)[1] == maps  # no gates: maps as given
    with pytest.raises(ValueError, match="map gates need present"):
        ScoreReadout.fit(x, x[:, :4], SCORE_NAMES, HEATMAP_NAMES, ReadoutConfig())


def test_save_and_load_round_trip_and_refusals(tmp_path):
    readout, x = _random_readout()
    readout.info["split"] = "dev"
    readout.save(tmp_path)
    again = ScoreReadout.load(tmp_path)
    assert again is not None and again.score_names == readout.score_names
    assert again.heatmap_names == readout.heatmap_names and again.area_threshold == readout.area_threshold
    assert np.array_equal(again.apply_numpy(x), readout.apply_numpy(x)) and again.info == readout.info
    assert np.array_equal(again.gates_numpy(x), readout.gates_numpy(x))
    assert ScoreReadout.load(tmp_path / "nowhere") is None
    (tmp_path / READOUT_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a score read-out"):
        ScoreReadout.load(tmp_path)
    with pytest.raises(ValueError, match="at least 12 labelled examples"):
        ScoreReadout.fit(x[:11], x[:11, :4], SCORE_NAMES, HEATMAP_NAMES, ReadoutConfig(map_gates=False))
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ReadoutConfig(lam=-1.0)
    with pytest.raises(ValueError, match="reads scores"):
        readout.check_model(SCORE_NAMES[:2], HEATMAP_NAMES, "model")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A saved rahf-tiny (random init), a small synthetic dev/test split, and its read-out fit at lam 0."""
    data = synthetic_split_folder(tmp_path_factory, "synth-readout-fit", {"dev": 24, "test": 6}, seed=5)
    folder = save_tiny_rahf(tmp_path_factory.mktemp("readout-model"))
    readout, table = fit_score_readout(folder, data, ReadoutConfig(lam=0.0), batch_size=8)
    return data, folder, readout, table


def test_an_in_sample_fit_is_no_worse_than_the_head_calibrated(calibrated, one_torch_thread):
    data, folder, readout, table = calibrated
    assert readout.info["examples"] == 24 and readout.info["skipped"] == 0 and readout.info["split"] == "dev"
    assert set(table) == set(SCORE_NAMES) and all(-1 <= v <= 1 for t in table.values() for v in t.values())
    raw = RAHFScorer.from_pretrained(folder, score_readout=False)
    from rahf.data.richhf import read_split

    records, _ = read_split(data, "dev")
    fb = raw.score(records.prompts, [records.image(i) for i in range(len(records))], keywords=False)
    x = np.stack(
        [
            output_features(
                {s: torch.tensor([f.scores[s]]) for s in SCORE_NAMES},
                {h: torch.from_numpy(f.heatmaps[h])[None] for h in HEATMAP_NAMES},
                SCORE_NAMES,
                HEATMAP_NAMES,
                0.25,
            )[0].numpy()
            for f in fb
        ]
    ).astype(np.float64)
    truth = np.asarray([[r.example.scores[s] for s in SCORE_NAMES] for r in records.read(range(len(records)))])
    fitted = readout.apply_numpy(x)
    for j in range(len(SCORE_NAMES)):  # least squares over more features, then clipping into [0, 1], never loses
        head_only = predict(x[:, [j]], fit_ridge(x[:, [j]], truth[:, j], 0.0))
        assert np.mean((fitted[:, j] - truth[:, j]) ** 2) <= np.mean((head_only - truth[:, j]) ** 2) + 1e-12


def test_the_scorer_applies_a_saved_read_out_on_every_path(calibrated, tmp_path, one_torch_thread):
    data, _, readout, _ = calibrated
    model_dir = save_tiny_rahf(tmp_path / "model")
    readout.save(model_dir)
    from rahf.data.richhf import read_split

    records, _ = read_split(data, "test")
    images = [records.image(i) for i in range(len(records))]
    raw = RAHFScorer.from_pretrained(model_dir, score_readout=False)
    cal = RAHFScorer.from_pretrained(model_dir)
    assert raw.score_readout is None and cal.score_readout is not None
    assert "+" in cal.identity["weights_hash"] and "+" not in raw.identity["weights_hash"]
    before = raw.score(records.prompts, images, keywords=False)
    after = cal.score(records.prompts, images, keywords=False)
    feats = output_features(
        {s: torch.tensor([f.scores[s] for f in before]) for s in SCORE_NAMES},
        {h: torch.stack([torch.from_numpy(f.heatmaps[h]) for f in before]) for h in HEATMAP_NAMES},
        SCORE_NAMES,
        HEATMAP_NAMES,
        readout.area_threshold,
    ).double()
    want, gates = readout.apply_numpy(feats.numpy()), readout.gates_numpy(feats.numpy())
    got = np.array([[f.scores[s] for s in SCORE_NAMES] for f in after])
    assert np.allclose(got, want, atol=1e-5) and not np.allclose(got, feats[:, :4].numpy(), atol=1e-3)
    for i, (a, b) in enumerate(zip(before, after, strict=True)):  # the model's maps, each scaled by its gate
        for k, h in enumerate(HEATMAP_NAMES):
            assert np.allclose(b.heatmaps[h], a.heatmaps[h] * gates[i, k], atol=1e-6)
    only = cal.score(records.prompts, images, scores_only=True)
    assert np.allclose([[f.scores[s] for s in SCORE_NAMES] for f in only], got, atol=1e-6)
    assert all(f.heatmaps == {} for f in only)  # the maps the read-out needed are not returned
    one_map = cal.score(records.prompts, images, heatmaps=(HEATMAP_NAMES[1],), keywords=False)
    assert set(one_map[0].heatmaps) == {HEATMAP_NAMES[1]}
    assert np.allclose([[f.scores[s] for s in SCORE_NAMES] for f in one_map], got, atol=1e-6)
    arrays = [np.asarray(load_image(im).convert("RGB"), np.float32) / 255 for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    value = cal.score_tensor(records.prompts, pixels, SCORE_NAMES[0])
    assert np.allclose(value.detach().numpy(), got[:, 0], atol=1e-4)
    value.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()


def test_calibrate_writes_the_read_out_and_eval_can_ignore_it(calibrated, tmp_path, capsys, one_torch_thread):
    data, _, _, _ = calibrated
    model_dir = save_tiny_rahf(tmp_path / "model")
    assert main(["calibrate", "--model", "rahf-tiny", "--data", str(data)]) == 2  # a preset name: no folder to write
    assert "not a saved RAHF folder" in capsys.readouterr().err and not (Path("rahf-tiny") / READOUT_FILE).exists()
    calibrate = ["calibrate", "--model", model_dir, "--data", str(data), "--threads", "1"]
    assert main([*calibrate, "--no-map-gates"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "model" / READOUT_FILE).is_file() and "fit on 24 examples" in out and "gate" not in out
    assert ScoreReadout.load(model_dir).gate_weight is None
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "/" in line][1:] == [
        f"| {s}" for s in SCORE_NAMES
    ]
    import json

    tables = {}
    for flag in ([], ["--raw-scores"]):
        folder = tmp_path / f"eval{len(flag)}"
        args = ["eval", "--data", str(data), "--model", f"m={model_dir}", "--out", str(folder), "--threads", "1"]
        assert main(args + flag) == 0
        tables[len(flag)] = json.loads((folder / "metrics.json").read_text())["m"]
    assert tables[0]["heatmaps"] == tables[1]["heatmaps"] and tables[0]["scores"] != tables[1]["scores"]
    capsys.readouterr()
    assert main(calibrate) == 0  # with the presence gates (the default)
    assert "presence gate of the implausibility map" in capsys.readouterr().out
    assert ScoreReadout.load(model_dir).gate_weight.shape == (2, F)


def test_the_cost_benchmark_times_the_demo_model_with_and_without_its_read_out(capsys, one_torch_thread):
    from benchmarks.readout_cost import main as bench

    assert bench(["--images", "4", "--batch-size", "4", "--repeats", "1", "--threads", "1", "--no-write"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "×" in line]
    assert [r[0] for r in rows] == ["| scores only", "| everything"]
    for r in rows:  # images per second, and their ratio
        heads, readout, ratio = float(r[1]), float(r[2]), float(r[3].rstrip(" |×"))
        assert heads > 0 and readout > 0 and ratio == pytest.approx(readout / heads, abs=0.006)


def test_an_augmented_prompt_model_scores_through_its_read_out_on_every_path(tmp_path, one_torch_thread):
    from rahf.presets import build_rahf

    model, processor = build_rahf("rahf-tiny", variant="augmented_prompt")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    readout, _ = _random_readout()
    readout.save(tmp_path)
    scorer = RAHFScorer.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    from PIL import Image

    pictures = [Image.fromarray(a) for a in images]
    full = scorer.score(["a red circle", "two blue squares"], pictures, keywords=False)
    only = scorer.score(["a red circle", "two blue squares"], pictures, scores_only=True)
    assert np.allclose(
        [[f.scores[s] for s in SCORE_NAMES] for f in full],
        [[f.scores[s] for s in SCORE_NAMES] for f in only],
        atol=1e-5,
    )
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
    value = scorer.score_tensor(["a red circle", "two blue squares"], pixels, SCORE_NAMES[1])
    assert np.allclose(value.detach().numpy(), [f.scores[SCORE_NAMES[1]] for f in full], atol=1e-4)
