"""Training: the loss falls, every part is logged, a killed run resumes to the same weights, bad rows are counted."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.model import RAHFModel
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
    first = train(config(data_dir, tmp_path / "b"), stop_after=4)  # the "kill": stops after step 4
    assert first["step"] == 4 and not (tmp_path / "b" / "checkpoints" / "step-6").exists()
    state_file = tmp_path / "b" / "checkpoints" / "step-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]  # a checkpoint as written before the harness (the demo model's cached run) resumes too
    state_file.write_text(json.dumps(state))
    second = train(config(data_dir, tmp_path / "b"))  # resumes from step 3: step 4 runs again
    assert second["step"] == 6
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-6" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # bit-identical, not merely close
        assert torch.equal(a[k], b[k]), k
    # the log of the resumed run is the uninterrupted run's: the killed run's step-4 rows were dropped
    assert (tmp_path / "b" / "log.jsonl").read_text() == (tmp_path / "a" / "log.jsonl").read_text()
    # Running again after the end does nothing more.
    assert train(config(data_dir, tmp_path / "b"))["step"] == 6


# The loss log of a run recorded before training moved onto the shared harness (23 examples in batches of 5, so
# the batch rule matters: 4 full batches an epoch, micro-batch 4 opens epoch 1). Across CPUs and thread counts
# these agree to ~1e-7.
RECORDED = {
    "loss": [7.8744833883829415, 7.252985809114762, 6.62607584008947, 6.066126907244325],
    "dev_loss": [6.003219683965047, 5.832470337549846],
}


@pytest.mark.slow
def test_loss_log_matches_the_run_recorded_before_the_harness(tmp_path_factory, tmp_path):
    data = synthetic_split_folder(tmp_path_factory, "synth23", {"train": 23, "dev": 6}, seed=0)
    train(config(data, tmp_path / "run", steps=4, batch_size=5, grad_accum=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 4]
    for key, want in RECORDED.items():
        # rel 1e-4: the same run differs by about 1e-5 between CPU instruction sets (AVX-512 against AVX2) after 4
        # steps; a changed batch order, loss weighting or accumulation moves these losses by 1e-2 or more
        assert [r[key] for r in rows if key in r] == pytest.approx(want, rel=1e-4, abs=0), key


@pytest.mark.slow
def test_config_dump_and_progress_bar(data_dir, tmp_path, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    cfg = config(data_dir, tmp_path / "run", steps=2, checkpoint_every=1, keep_checkpoints=1)
    train(cfg)
    assert "2/2" in tty.getvalue() and "loss=" in tty.getvalue()
    dumped = tmp_path / "run" / "train_config.json"
    assert json.loads(dumped.read_text()) == dataclasses.asdict(cfg)
    assert TrainConfig.from_json(dumped) == cfg  # the dump reads back as the same config
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-2"]  # keep the newest 1
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["config"] == dataclasses.asdict(cfg) and state["step"] == 2
    quiet = Tty()
    monkeypatch.setattr(sys, "stderr", quiet)
    train(config(data_dir, tmp_path / "quiet", steps=1, progress=False))
    assert quiet.getvalue() == ""


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


def test_gate_override_builds_the_gates_and_a_saved_model_without_them_refuses_it(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "gate", steps=2, gate_loss_weight=0.5))
    saved = json.loads((tmp_path / "gate" / "best" / "config.json").read_text())
    assert saved["gate_loss_weight"] == 0.5
    lines = [json.loads(line) for line in (tmp_path / "gate" / "log.jsonl").open()]
    assert any(line.get("gate/implausibility", 0) > 0 and line.get("gate/misalignment", 0) > 0 for line in lines)
    train(config(data_dir, tmp_path / "plain", steps=1))
    with pytest.raises(ValueError, match="saved without presence gates"):
        train(config(data_dir, tmp_path / "again", preset=str(tmp_path / "plain" / "best"), gate_loss_weight=1.0))


def test_word_head_override_builds_the_head_and_a_saved_model_without_it_refuses_it(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "words", steps=2, word_loss_weight=0.5))
    saved = json.loads((tmp_path / "words" / "best" / "config.json").read_text())
    assert saved["word_loss_weight"] == 0.5
    lines = [json.loads(line) for line in (tmp_path / "words" / "log.jsonl").open()]
    assert any(line.get("words", 0) > 0 for line in lines)
    train(config(data_dir, tmp_path / "plain", steps=1))
    with pytest.raises(ValueError, match="saved without a word head"):
        train(config(data_dir, tmp_path / "again", preset=str(tmp_path / "plain" / "best"), word_loss_weight=1.0))


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


def test_prefetched_batches_train_the_same_bits(data_dir, tmp_path, monkeypatch):
    import threading

    import rahf.train as rt

    threads: list[str] = []
    make = rt.batch_inputs
    monkeypatch.setattr(
        rt, "batch_inputs", lambda *a, **k: threads.append(threading.current_thread().name) or make(*a, **k)
    )
    # itm on: each batch also draws its edited-prompt negatives, and the dev evaluation (step 3) tokenizes
    kw = {"steps": 5, "itm_loss_weight": 1.0, "itm_swaps": [["red", "blue", "green"]]}
    train(config(data_dir, tmp_path / "a", **kw))
    assert threads and all(t == "MainThread" for t in threads)  # a CPU run makes its batches itself
    threads.clear()
    train(config(data_dir, tmp_path / "b", prefetch=True, **kw))
    made_ahead = [t for t in threads if t.startswith("prefetch")]
    assert len(made_ahead) >= 5  # steps 2.. and the one after the last were made on the prefetch thread
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-5" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-5" / "model.safetensors"))
    for k in a:  # bit-identical: the same batches in the same order
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "a" / "log.jsonl").read_text() == (tmp_path / "b" / "log.jsonl").read_text()


def test_output_spread_is_zero_for_a_constant_output_only():
    from rahf.train import output_spread

    constant = torch.full((5, 4), 0.3, dtype=torch.float64)  # five examples, one 4-pixel map each, all equal
    varying = torch.tensor([[0.0], [1.0], [0.0], [1.0]], dtype=torch.float64)  # a score: 0, 1, 0, 1 (std 0.5)
    sums = {
        "map": [constant.sum(0), (constant**2).sum(0)],
        "score": [varying.sum(0), (varying**2).sum(0)],
    }
    spread = output_spread({"map": sums["map"]}, 5) | output_spread({"score": sums["score"]}, 4)
    assert spread["map"] == pytest.approx(0.0, abs=1e-9)
    assert spread["score"] == pytest.approx(0.5)


def test_training_reports_outputs_collapsed_on_the_dev_split(data_dir, tmp_path):
    # Two steps from random init: the heads still give (nearly) the same output for every image, and the default
    # threshold reports all six, with a warning naming them and their spreads.
    with pytest.warns(RuntimeWarning, match="outputs collapsed to constants on the dev split: aesthetics spread"):
        summary = train(config(data_dir, tmp_path / "a", steps=2, eval_every=2))
    names = {*HEATMAP_NAMES, *SCORE_NAMES}
    assert set(summary["collapsed_outputs"]) == names
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    dev = [r for r in rows if "dev_loss" in r]
    assert set(dev[-1]["dev_spread"]) == names and set(dev[-1]["collapsed"]) == names
    assert all(0.0 < v < 1e-3 for v in dev[-1]["dev_spread"].values())
    # A threshold of 0 reports nothing for the same run.
    summary = train(config(data_dir, tmp_path / "b", steps=2, eval_every=2, collapse_spread=0.0))
    assert summary["collapsed_outputs"] == []


def test_the_shipped_model_is_not_collapsed_on_the_synthetic_dev_split(data_dir):
    from rahf.model import RAHFModel
    from rahf.processor import RAHFProcessor
    from rahf.train import dev_loss, load_split
    from rahf.zoo import SHIPPED_DIR

    model, processor = RAHFModel.from_pretrained(SHIPPED_DIR), RAHFProcessor.from_pretrained(SHIPPED_DIR)
    spread: dict[str, float] = {}
    dev_loss(model, processor, load_split(data_dir, "dev", processor), 8, torch.device("cpu"), spread=spread)
    assert set(spread) == {*HEATMAP_NAMES, *SCORE_NAMES}
    assert min(spread.values()) > 5e-3, spread  # five times the default collapse threshold and more


def test_score_reads_prompt_is_built_from_a_preset_and_cannot_change_on_a_saved_model(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "reads", steps=2, score_reads_prompt=True))
    saved = json.loads((tmp_path / "reads" / "best" / "config.json").read_text())
    assert saved["score_reads_prompt"] is True
    weights = RAHFModel.from_pretrained(tmp_path / "reads" / "best").score_heads["alignment"].prompt_weight
    assert float(weights.abs().max()) > 0  # trained away from its zero init
    with pytest.raises(ValueError, match="saved with score_reads_prompt=True"):
        train(config(data_dir, tmp_path / "again", preset=str(tmp_path / "reads" / "best"), score_reads_prompt=False))


def test_itm_pool_is_built_from_a_preset_saved_and_cannot_change_on_a_saved_model(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "pool", steps=2, itm_loss_weight=1.0, itm_pool="mean_max"))
    model = RAHFModel.from_pretrained(tmp_path / "pool" / "best")
    assert model.config.itm_pool == "mean_max" and model.itm_head[0].in_features == 2 * model.config.text["d_model"]
    with pytest.raises(ValueError, match="saved with itm_pool='mean_max'"):
        train(config(data_dir, tmp_path / "again", preset=str(tmp_path / "pool" / "best"), itm_pool="mean"))


def test_itm_swaps_add_one_edited_negative_per_prompt_and_reach_the_saved_model(data_dir, tmp_path, capsys):
    from rahf.data.synthetic import SWAP_CLASSES
    from rahf.processor import RAHFProcessor
    from rahf.train import batch_inputs, load_split

    classes = [list(c) for c in SWAP_CLASSES]
    train(config(data_dir, tmp_path / "s", steps=2, itm_loss_weight=1.0, itm_swaps=classes))
    model = RAHFModel.from_pretrained(tmp_path / "s" / "best")
    assert model.config.itm_swaps == tuple(map(tuple, classes))
    processor = RAHFProcessor.from_pretrained(tmp_path / "s" / "best")
    data = load_split(data_dir, "train", processor)
    _, ids, _, labels = batch_inputs(model, processor, data, torch.arange(4), (0, 1))
    _, _, _, again = batch_inputs(model, processor, data, torch.arange(4), (0, 1))
    assert labels.swap_rows.tolist() == list(range(4))  # every synthetic prompt has a colour to swap
    assert torch.equal(labels.swap_ids, again.swap_ids)  # seeded: the same edits on a rerun (exact resume)
    for row, edit in zip(labels.swap_rows.tolist(), labels.swap_ids, strict=True):
        own = processor.tokenizer.decode(ids[row], skip_special_tokens=True).split()
        new = processor.tokenizer.decode(edit, skip_special_tokens=True).split()
        assert len(own) == len(new) and sum(a != b for a, b in zip(own, new)) == 1
    with torch.no_grad():
        out = model(*[t for t in batch_inputs(model, processor, data, torch.arange(4))[:3]], labels=labels)
    assert out.itm_targets.tolist() == [1] * 4 + [0] * 4 + [0] * 4  # own, shifted, then edited pairings
    # the command line takes the world's classes by name or from a file, and refuses a malformed file
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(data_dir),
                "--out-dir",
                str(tmp_path / "c"),
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--itm-loss-weight",
                "1",
                "--itm-swaps",
                "synthetic",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "c" / "best" / "config.json").read_text())["itm_swaps"] == classes
    bad = tmp_path / "bad.json"
    bad.write_text('["red", "blue"]')
    assert main(["train", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "d"), "--itm-swaps", str(bad)]) == 2
    assert "want a JSON list of lists of words" in capsys.readouterr().err


def test_weight_average_leaves_training_alone_keeps_best_and_resumes_exactly(data_dir, tmp_path):
    plain = train(config(data_dir, tmp_path / "plain"))
    whole = train(config(data_dir, tmp_path / "ema", ema_decay=0.5))
    assert plain["step"] == whole["step"] == 6

    def weights(folder):
        return load_file(str(folder / "model.safetensors"))

    live = weights(tmp_path / "ema" / "checkpoints" / "step-6")
    # the average never feeds back: the live weights are those of the run without it, bit for bit
    assert all(torch.equal(live[k], v) for k, v in weights(tmp_path / "plain" / "checkpoints" / "step-6").items())
    best_step = json.loads((tmp_path / "ema" / "best" / "trainer_state.json").read_text())["step"]
    average = load_file(str(tmp_path / "ema" / "checkpoints" / f"step-{best_step}" / "weight_average.safetensors"))
    best = weights(tmp_path / "ema" / "best")
    assert all(torch.equal(best[k], v) for k, v in average.items())  # best/ holds the average, not the live weights
    live_then = weights(tmp_path / "ema" / "checkpoints" / f"step-{best_step}")
    assert max(float((best[k] - live_then[k]).abs().max()) for k in average) > 1e-4
    # its dev loss is the average's, so it differs from the plain run's at the same step
    dev = [json.loads(line)["dev_loss"] for line in (tmp_path / "ema" / "log.jsonl").open() if "dev_loss" in line]
    dev_plain = [
        json.loads(line)["dev_loss"] for line in (tmp_path / "plain" / "log.jsonl").open() if "dev_loss" in line
    ]
    assert len(dev) == len(dev_plain) == 2 and dev != dev_plain
    # killed after step 4 and resumed from step 3: the same average and the same best/ as the whole run
    train(config(data_dir, tmp_path / "part", ema_decay=0.5), stop_after=4)
    train(config(data_dir, tmp_path / "part", ema_decay=0.5))
    for name in ("checkpoints/step-6/weight_average.safetensors", "best/model.safetensors"):
        a, b = load_file(str(tmp_path / "ema" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # a run started without the average cannot resume with one: the checkpoint has none to continue
    train(config(data_dir, tmp_path / "switch"), stop_after=3)
    with pytest.raises(ValueError, match="without a weight average"):
        train(config(data_dir, tmp_path / "switch", ema_decay=0.5))
    with pytest.raises(ValueError, match="ema_decay"):
        train(config(data_dir, tmp_path / "bad", ema_decay=1.0))


def test_gradient_norm_is_logged_and_clipping_changes_the_run(data_dir, tmp_path):
    def rows(out):
        return [json.loads(line) for line in (out / "log.jsonl").open() if '"loss"' in line]

    train(config(data_dir, tmp_path / "plain"))
    norms = [r["grad_norm"] for r in rows(tmp_path / "plain")]
    assert len(norms) == 6 and all(math.isfinite(n) and n > 0 for n in norms)
    low = min(norms) / 10  # below every step's norm: every step is clipped
    train(config(data_dir, tmp_path / "clip", max_grad_norm=low))
    clipped = [r["grad_norm"] for r in rows(tmp_path / "clip")]
    assert clipped[0] == norms[0]  # step 1: the same weights and batch, so the same norm before clipping
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(tmp_path / "clip" / "checkpoints" / "step-6" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "clip" / "train_config.json").read_text())["max_grad_norm"] == low
    with pytest.raises(ValueError, match="max_grad_norm"):
        train(config(data_dir, tmp_path / "bad", max_grad_norm=-1.0))
    assert not (tmp_path / "bad").exists()  # refused before anything is written
