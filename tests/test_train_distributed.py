"""Training on several processes: disjoint shards of one seeded order, one writer, the maths of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rahf.model import RAHFModel
from rahf.presets import build_rahf
from rahf.processor import RAHFProcessor
from rahf.train import (
    TrainConfig,
    batch_inputs,
    dev_loss,
    load_split,
    loss_terms,
    micro_batch_index,
    rank_batch_index,
    rank_loss,
    train,
)
from tests.conftest import synthetic_split_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_split_folder(tmp_path_factory, "synth-ddp", {"train": 24, "dev": 6}, seed=3)


def test_rank_batches_partition_the_global_batch():
    for k in range(12):
        parts = [rank_batch_index(k, 23, 3, seed=5, rank=r, world=3) for r in range(3)]
        assert [len(p) for p in parts] == [3, 3, 3]
        assert torch.equal(torch.cat(parts), micro_batch_index(k, 23, 9, 5))  # disjoint slices of one global batch
    for k in range(5):  # one process: exactly the order training always had
        assert torch.equal(rank_batch_index(k, 23, 4, seed=5, rank=0, world=1), micro_batch_index(k, 23, 4, 5))
    with pytest.raises(ValueError, match=r"5 training examples, fewer than one global batch of 6 \(3 × 2 processes\)"):
        rank_batch_index(0, 5, 3, seed=0, rank=1, world=2)
    with pytest.raises(ValueError, match=r"rank 2 outside 0\.\.1"):
        rank_batch_index(0, 50, 3, seed=0, rank=2, world=2)


def test_loss_terms_recombine_a_split_batch_into_the_whole_batch_loss(data_dir):
    overrides = {
        "empty_heatmap_weight": 2.0,  # normalised by the batch's weight sum: batch-dependent
        "heatmap_weights": {"misalignment": 2.5},
        "score_loss_weight": 0.7,
        "token_loss_weight": 1.3,  # a mean over the batch's target tokens: batch-dependent
        "gate_loss_weight": 0.4,  # presence gates: a mean over samples
        "word_loss_weight": 0.6,  # the word head: a mean over the batch's word tokens: batch-dependent
    }
    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides=overrides)
    model.train()
    data = load_split(data_dir, "train", processor)

    def run(index: torch.Tensor):
        px, ids, mask, labels = batch_inputs(model, processor, data, index)
        out = model(px, ids, mask, labels=labels)
        return out, loss_terms(model.config, labels, out)

    index = torch.arange(8)
    full, full_terms = run(index)
    assert set(full_terms) == set(full.loss_parts)
    total = sum(coef * full.loss_parts[k] for k, (coef, _) in full_terms.items())
    torch.testing.assert_close(total, full.loss)  # the coefficients are the model's own
    halves = [run(index[:4]), run(index[4:])]
    counts = {k: sum(terms[k][1] for _, terms in halves) for k in full_terms}
    for k in full.loss_parts:
        recombined = sum(out.loss_parts[k] * terms[k][1] / counts[k] for out, terms in halves)
        assert recombined.item() == pytest.approx(full.loss_parts[k].item(), rel=1e-5, abs=1e-7), k
    naive = sum(out.loss_parts["tokens"] for out, _ in halves) / 2
    assert abs((naive - full.loss_parts["tokens"]).item()) > 1e-4  # the plain mean of halves would be wrong
    per_rank = [rank_loss(out.loss_parts, terms, counts, world=2) for out, terms in halves]
    assert (sum(per_rank) / 2).item() == pytest.approx(full.loss.item(), rel=1e-5)  # what DDP averaging computes
    # and so are the gradients: the mean of the per-process gradients is the whole batch's gradient
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(full.loss, params, allow_unused=True)
    got = [torch.autograd.grad(loss, params, allow_unused=True) for loss in per_rank]
    for w, g0, g1 in zip(want, *got, strict=True):
        if w is not None:
            torch.testing.assert_close((g0 + g1) / 2, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()) + 1e-9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_of_the_same_global_batch(data_dir, tmp_path):
    common = {
        "data_dir": str(data_dir),
        "steps": 3,
        "grad_accum": 2,
        "lr": 2e-3,
        "warmup_steps": 1,
        "checkpoint_every": 3,
        "eval_every": 3,
        "log_every": 1,
        "device": "cpu",
        "empty_heatmap_weight": 1.5,
    }
    cfg = tmp_path / "two.json"
    cfg.write_text(json.dumps({**common, "out_dir": str(tmp_path / "two"), "batch_size": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    res = subprocess.run(
        [*launch, "-m", "richfeedback", "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    summaries = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # printed by the main process only
    assert (summaries[0]["processes"], summaries[0]["global_batch"], summaries[0]["step"]) == (2, 4, 3)
    one = train(TrainConfig(**common, out_dir=str(tmp_path / "one"), batch_size=4))
    assert (one["processes"], one["global_batch"]) == (1, 4)

    # only the main process wrote: one row per step, nothing left half-written
    rows = {name: [json.loads(x) for x in (tmp_path / name / "log.jsonl").open()] for name in ("one", "two")}
    assert [r["step"] for r in rows["two"] if "loss" in r] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "best",
        "checkpoints",
        "log.jsonl",
        "train_config.json",
    ]
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-3"]

    # the same losses (every part) and the same weights as one process of the same global batch
    steps = {name: [r for r in rows[name] if "loss" in r] for name in rows}
    for a, b in zip(steps["one"], steps["two"], strict=True):
        assert a.keys() == b.keys()
        for k in a:  # after two updates the weights' float noise (below) moves a part by up to about 5e-5 of itself
            assert b[k] == pytest.approx(a[k], rel=2e-4, abs=1e-5), (a["step"], k)
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "step-3" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-3" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    # Float noise in the summed gradients flips the sign of near-zero ones, and AdamW then steps such a weight by
    # up to lr either way: a few elements (28 to 290 of 783,718 on an AMD EPYC host, more with more threads) differ
    # by up to 1.5 lr after 3 steps; the bulk agrees to about 1e-7. Gradients of a missing rank or of another batch
    # split move most weights by about lr.
    diffs = torch.cat([(wb[k] - wa[k]).abs().flatten() for k in wa])
    assert float(diffs.max()) <= 3 * 2 * 2e-3  # 3 steps of at most lr (2e-3) each way
    assert float((diffs > 3e-4).float().mean()) < 1e-2
    assert float(diffs.median()) < 1e-5
    assert any(not torch.equal(wa[k], build_rahf("rahf-tiny", seed=0)[0].state_dict()[k]) for k in wa)  # it trained

    # the dev loss of two processes is the dev loss of batches of 2, shared between them
    saved = tmp_path / "two" / "checkpoints" / "step-3"
    model, processor = RAHFModel.from_pretrained(saved), RAHFProcessor.from_pretrained(saved)
    assert model.config.empty_heatmap_weight == 1.5
    want = dev_loss(model, processor, load_split(data_dir, "dev", processor), 2, torch.device("cpu"))
    logged = [r["dev_loss"] for r in rows["two"] if "dev_loss" in r]
    assert logged == [pytest.approx(want, rel=1e-5)]


def test_a_half_written_checkpoint_is_not_resumed_from(tmp_path):
    from rahf.train import last_checkpoint

    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-12").mkdir()
    (tmp_path / "checkpoints" / "step-15.tmp").mkdir()  # a save killed before its rename
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-12"
    assert last_checkpoint(tmp_path / "nothing") is None
