"""The within-prompt ranking loss: grouped synthetic splits, grouped batches, the pairwise loss and its training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.names import SCORE_NAMES
from rahf.data.synthetic import generate
from rahf.model import ranking_pairs, within_prompt_rank_loss
from rahf.presets import build_rahf
from rahf.train import (
    TrainConfig,
    batch_inputs,
    grouped_epoch_order,
    load_split,
    loss_terms,
    micro_batch_index,
    prompt_groups,
    rank_batch_index,
    rank_loss,
    train,
)
from tests.conftest import synthetic_split_folder


@pytest.fixture(scope="module")
def grouped_dir(tmp_path_factory):
    return synthetic_split_folder(tmp_path_factory, "grouped", {"train": 32, "dev": 8}, seed=1, per_prompt=4)


def test_grouped_split_shares_prompts_in_runs_and_keeps_the_single_prompt_split_unchanged():
    grouped = list(generate(10, seed=2, per_prompt=4))
    prompts = [s.prompt for s in grouped]
    assert prompts[0:4] == [prompts[0]] * 4 and prompts[4:8] == [prompts[4]] * 4 and prompts[8:] == [prompts[8]] * 2
    assert len({prompts[0], prompts[4], prompts[8]}) == 3
    # each image of a group is its own scene: different pixels, and the flaws differ across the group somewhere
    pixels = [np.asarray(s.image).tobytes() for s in grouped[:4]]
    assert len(set(pixels)) == 4
    assert len({s.example.scores["overall"] for s in grouped}) > 3
    # a prefix is reproducible, and per_prompt=1 is the original split (a prompt drawn per sample)
    assert [s.prompt for s in generate(6, seed=2, per_prompt=4)] == prompts[:6]
    single = [s.prompt for s in generate(12, seed=2)]
    assert len(set(single)) >= 10
    with pytest.raises(ValueError, match="per_prompt must be >= 1"):
        next(generate(1, per_prompt=0))


def test_rank_loss_values():
    groups = torch.tensor([0, 0, 0, 1, 1])
    target = torch.tensor([0.9, 0.5, 0.505, 0.2, 0.8])
    pairs = ranking_pairs(target, groups, min_gap=0.01)
    # ordered pairs (better, worse) of the same prompt only; 0.5 vs 0.505 is a tie under the gap
    assert {(int(i), int(j)) for i, j in pairs.nonzero()} == {(0, 1), (0, 2), (4, 3)}
    constant = within_prompt_rank_loss(torch.full((5,), 0.3), target, groups, 0.05, 0.01)
    assert constant.item() == pytest.approx(math.log(2), abs=1e-6)
    right = within_prompt_rank_loss(target.clone(), target, groups, 0.05, 0.01)
    wrong = within_prompt_rank_loss(1 - target, target, groups, 0.05, 0.01)
    # right: softplus(-0.4/0.05), softplus(-0.395/0.05), softplus(-0.6/0.05), averaged
    expected = float(np.mean([math.log1p(math.exp(-d / 0.05)) for d in (0.4, 0.395, 0.6)]))
    assert right.item() == pytest.approx(expected, rel=1e-5) and right.item() < 0.001
    assert wrong.item() > 7.0
    # no pair: zero, with a graph so that backward still works
    pred = torch.tensor([0.1, 0.2], requires_grad=True)
    none = within_prompt_rank_loss(pred, torch.tensor([0.5, 0.9]), torch.tensor([0, 1]), 0.05, 0.01)
    none.backward()
    assert none.item() == 0.0 and torch.equal(pred.grad, torch.zeros(2))


def test_grouped_batches_hold_whole_runs_of_one_prompt():
    prompts = [f"p{i // 4}" for i in range(32)] + ["lone a", "lone b"]
    n = len(prompts)
    order = grouped_epoch_order(prompts, group=2, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(n))  # a permutation: every example once per epoch
    for k in range(n // 4):  # batches of 4 = two runs of 2
        batch = micro_batch_index(k, n, 4, 3, prompts, 2).tolist()
        runs = [batch[0:2], batch[2:4]]
        for run in runs:  # a run is two images of one prompt, or the two lone prompts packed together
            assert prompts[run[0]] == prompts[run[1]] or {prompts[i] for i in run} == {"lone a", "lone b"}, batch
    assert torch.equal(micro_batch_index(5, n, 4, 3, prompts, 2), micro_batch_index(5, n, 4, 3, prompts, 2))
    assert not torch.equal(grouped_epoch_order(prompts, 2, 3, 1), order)  # a new order each epoch
    assert torch.equal(micro_batch_index(3, n, 4, 3), micro_batch_index(3, n, 4, 3, prompts, 1))  # group 1: as before
    with pytest.raises(ValueError, match="batch_size 6 is not a multiple of prompt_group 4"):
        rank_batch_index(0, n, 6, 0, 0, 1, prompts, 4)
    assert prompt_groups(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


def test_rank_parts_recombine_across_processes(grouped_dir):
    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides={"rank_loss_weight": 1.3})
    model.train()
    data = load_split(grouped_dir, "train", processor)

    def run(index):
        px, ids, mask, labels = batch_inputs(model, processor, data, index)
        out = model(px, ids, mask, labels=labels)
        return out, loss_terms(model.config, labels, out)

    index = torch.arange(8)  # two prompts of four images; each process holds one prompt's four
    full, full_terms = run(index)
    assert {f"rank/{n}" for n in SCORE_NAMES} <= set(full.loss_parts)
    total = sum(coef * full.loss_parts[k] for k, (coef, _) in full_terms.items())
    torch.testing.assert_close(total, full.loss)
    halves = [run(index[:4]), run(index[4:])]
    counts = {k: sum(terms[k][1] for _, terms in halves) for k in full_terms}
    assert counts["rank/overall"] > 0
    per_rank = [rank_loss(out.loss_parts, terms, counts, world=2) for out, terms in halves]
    assert (sum(per_rank) / 2).item() == pytest.approx(full.loss.item(), rel=1e-5)


def test_the_rank_loss_alone_learns_to_order_images_of_one_prompt(grouped_dir):
    """Only the ranking loss on: a few steps on one batch of two prompts × four images order them."""
    zero = {"score_loss_weight": 0.0, "heatmap_loss_weight": 0.0, "token_loss_weight": 0.0, "rank_loss_weight": 1.0}
    model, processor = build_rahf("rahf-tiny", seed=0, config_overrides=zero)
    model.train()
    data = load_split(grouped_dir, "train", processor)
    px, ids, mask, labels = batch_inputs(model, processor, data, torch.arange(8))
    assert labels.groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        out = model(px, ids, mask, labels=labels)
        assert set(out.loss_parts) >= {"rank/overall", "rank/plausibility"}
        losses.append(out.loss_parts["rank/overall"].item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert losses[0] == pytest.approx(math.log(2), abs=0.1)
    assert losses[-1] < 0.35, losses


def test_training_logs_the_rank_parts_of_grouped_batches(grouped_dir, tmp_path):
    import json

    cfg = TrainConfig(
        data_dir=str(grouped_dir),
        out_dir=str(tmp_path / "run"),
        preset="rahf-tiny",
        steps=3,
        batch_size=8,
        checkpoint_every=3,
        eval_every=3,
        log_every=1,
        device="cpu",
        progress=False,
        prompt_group=4,
        rank_loss_weight=1.0,
    )
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    # every batch holds two prompts of four: pairs exist, so the parts sit near ln 2 at random init, not at 0
    for r in steps:
        assert 0.4 < r["rank/overall"] < 1.0, r


def test_synth_command_writes_groups_of_one_prompt(tmp_path):
    import json

    from richfeedback.cli import main

    assert (
        main(["synth", "--out", str(tmp_path), "--train", "6", "--dev", "0", "--test", "0", "--per-prompt", "3"]) == 0
    )
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(prompts) == 6 and prompts[:3] == [prompts[0]] * 3 and prompts[3:] == [prompts[3]] * 3
    assert prompts[0] != prompts[3]
