"""Training: the loss falls, every part is logged, a killed run resumes to the same weights, bad rows are counted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rahf.train import TrainConfig, train
from richfeedback.cli import main
from tests.conftest import synthetic_split_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_split_folder(tmp_path_factory, "synth", {"train": 24, "dev": 8}, seed=0)


def config(data_dir, out, **kw) -> TrainConfig:
    base = {
        "steps": 6,
        "batch_size": 4,
        "lr": 2e-3,
        "warmup_steps": 2,
        "checkpoint_every": 3,
        "eval_every": 3,
        "log_every": 1,
        "device": "cpu",
    }
    return TrainConfig(data_dir=str(data_dir), out_dir=str(out), **{**base, **kw})


def test_resume_after_interruption_matches_an_uninterrupted_run(data_dir, tmp_path):
    whole = train(config(data_dir, tmp_path / "a"))
    assert whole["step"] == 6
    first = train(config(data_dir, tmp_path / "b"), stop_after=3)  # the "kill": stops after step 3
    assert first["step"] == 3 and not (tmp_path / "b" / "checkpoints" / "step-6").exists()
    second = train(config(data_dir, tmp_path / "b"))
    assert second["step"] == 6
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-6" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # Running again after the end does nothing more.
    assert train(config(data_dir, tmp_path / "b"))["step"] == 6


def test_loss_falls_and_every_part_is_logged(data_dir, tmp_path):
    summary = train(
        config(
            data_dir,
            tmp_path / "run",
            steps=30,
            checkpoint_every=30,
            eval_every=10,
            log_every=1,
            lr=3e-3,
            warmup_steps=3,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"heatmap/implausibility", "score/overall", "tokens"} <= set(steps[0])
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    assert len(dev) == 3 and summary["best_dev_loss"] == pytest.approx(min(dev))
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_mismatched_rows_are_skipped_and_counted(data_dir, tmp_path):
    import shutil

    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    rows = [json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()]
    rows[0]["prompt"] += " extra words"
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = train(config(d, tmp_path / "run", steps=1, checkpoint_every=1, eval_every=1))
    assert summary["skipped"] == 1 and summary["train_examples"] == 23


def test_train_command(data_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "data_dir": str(data_dir),
                "out_dir": str(tmp_path / "o"),
                "steps": 2,
                "batch_size": 4,
                "device": "cpu",
                "checkpoint_every": 2,
                "eval_every": 2,
            }
        )
    )
    assert main(["train", "--config", str(cfg), "--steps", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1
    assert (tmp_path / "o" / "checkpoints" / "step-1" / "config.json").is_file()
    # the map-loss flags reach the saved model; a malformed per-map factor is refused before training
    flags = ["--heatmap-loss", "bce", "--heatmap-weight", "misalignment=2.5", "--out-dir", str(tmp_path / "w")]
    assert main(["train", "--config", str(cfg), "--steps", "1", *flags]) == 0
    saved = json.loads((tmp_path / "w" / "best" / "config.json").read_text())
    assert (saved["heatmap_loss"], saved["heatmap_weights"]) == ("bce", {"misalignment": 2.5})
    for bad in ("misalignment", "misalignment=x", "=2"):
        assert main(["train", "--config", str(cfg), "--heatmap-weight", bad, "--out-dir", str(tmp_path / "x")]) == 2
        assert "--heatmap-weight wants MAP=FACTOR" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_loss_weight_overrides_reach_the_saved_model_and_bad_ones_are_refused(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "ok", steps=3, empty_heatmap_weight=2.5, heatmap_loss_weight=7.0))
    saved = json.loads((tmp_path / "ok" / "best" / "config.json").read_text())
    assert (saved["empty_heatmap_weight"], saved["heatmap_loss_weight"]) == (2.5, 7.0)
    with pytest.raises(ValueError, match=r"field empty_heatmap_weight: expected float >= 0, got -1\.0"):
        train(config(data_dir, tmp_path / "bad", empty_heatmap_weight=-1.0))
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before any step ran


def test_itm_override_builds_the_head_and_a_saved_model_without_one_refuses_it(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "itm", steps=2, itm_loss_weight=0.5))
    saved = json.loads((tmp_path / "itm" / "best" / "config.json").read_text())
    assert saved["itm_loss_weight"] == 0.5
    assert any(line.get("itm", 0) > 0 for line in map(json.loads, (tmp_path / "itm" / "log.jsonl").open()))
    train(config(data_dir, tmp_path / "plain", steps=1))
    with pytest.raises(ValueError, match="saved without an ITM head"):
        train(config(data_dir, tmp_path / "again", preset=str(tmp_path / "plain" / "best"), itm_loss_weight=1.0))
    # a saved model's overrides are checked
    with pytest.raises(ValueError, match="field itm_negatives: expected int >= 0, got -2"):
        train(config(data_dir, tmp_path / "again", preset=str(tmp_path / "plain" / "best"), itm_negatives=-2))
    resumed = config(data_dir, tmp_path / "again", preset=str(tmp_path / "plain" / "best"), steps=1, itm_negatives=3)
    train(resumed)
    assert json.loads((tmp_path / "again" / "best" / "config.json").read_text())["itm_negatives"] == 3


def test_channels_last_training_matches_the_default_layout(data_dir, tmp_path, monkeypatch):
    from rahf.model import HeadRunner

    seen: list[bool] = []
    call = HeadRunner.__call__
    monkeypatch.setattr(
        HeadRunner, "__call__", lambda self, head, grid: seen.append(self.channels_last) or call(self, head, grid)
    )
    train(config(data_dir, tmp_path / "a", steps=2, checkpoint_every=2, eval_every=2))
    assert seen and not any(seen)
    seen.clear()
    train(config(data_dir, tmp_path / "b", steps=2, checkpoint_every=2, eval_every=2, channels_last=True))
    assert True in seen  # the training steps ran the heads channels-last (dev loss keeps the default layout)
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-2" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-2" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3, msg=k)
