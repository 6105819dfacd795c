"""The training harness: one batch-order rule, optimizer groups, checkpoint folders (safetensors, whole or absent,
keep-last-k), exact resume of its loop, the config dump, the log and the progress bar."""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.harness import (
    AVERAGE_FILE,
    Prefetcher,
    TrainingRun,
    WeightAverage,
    accumulate_step,
    adamw,
    batches_per_epoch,
    biases_and_norms,
    check_grad_norm,
    checkpoint_steps,
    epoch_batch_index,
    last_checkpoint,
    make_accelerator,
    param_groups,
    show_progress,
)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@dataclass
class ToyConfig:
    out_dir: str
    steps: int = 6
    lr: float = 0.05
    seed: int = 1
    tags: tuple[str, ...] = ("a", "b")


def test_one_batch_rule_for_rahf_training_and_lora_finetuning():
    from finetune.lora import batch_index
    from rahf.train import micro_batch_index

    for n, b in ((10, 4), (23, 5), (24, 4), (3, 4)):
        per_epoch = batches_per_epoch(n, b)
        assert per_epoch == max(1, n // b)  # full batches only: the last partial batch of an epoch is dropped
        for k in range(3 * per_epoch):
            want = epoch_batch_index(k, n, b, seed=7)
            assert torch.equal(micro_batch_index(k, n, b, 7), want)
            assert torch.equal(batch_index(k, n, b, 7), want)
            assert len(want) == min(b, n)
        for epoch in range(3):  # an epoch: distinct examples, n mod b of them sit out
            drawn = torch.cat([epoch_batch_index(epoch * per_epoch + j, n, b, 7) for j in range(per_epoch)])
            assert len(set(drawn.tolist())) == len(drawn) == per_epoch * min(b, n)
    # 10 examples in batches of 4: two batches an epoch, so batch 2 is the first of epoch 1 (a full batch of 4)
    assert len(epoch_batch_index(2, 10, 4, 0)) == 4
    assert not torch.equal(epoch_batch_index(0, 10, 4, 0), epoch_batch_index(2, 10, 4, 0))
    with pytest.raises(ValueError, match="need n >= 1"):
        epoch_batch_index(0, 0, 4, 0)


def test_optimizer_groups_are_built_one_way():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    one = param_groups(model, 0.01)
    assert len(one) == 1 and one[0]["weight_decay"] == 0.01
    assert [id(p) for p in one[0]["params"]] == [id(p) for p in model.parameters() if p.requires_grad]
    two = param_groups(model, 0.01, biases_and_norms)
    assert [g["weight_decay"] for g in two] == [0.01, 0.0]
    assert [tuple(p.shape) for p in two[0]["params"]] == [(4, 3), (2, 4)]
    assert [tuple(p.shape) for p in two[1]["params"]] == [(4,), (4,), (4,)]
    opt = adamw(model, 1e-3, 0.0)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.0)


def _toy_run(out: Path, *, steps: int = 6, stop_after=None, keep_last=None, stream=None, progress=True, fail_at=None):
    """A small model with dropout (the RNG matters) trained by the harness loop; returns (run, model, step)."""
    cfg = ToyConfig(str(out), steps=steps)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = adamw(model, cfg.lr, 0.01, biases_and_norms)
    run = TrainingRun(out, cfg, config_file="toy_config.json", keep_last=keep_last, progress=progress, stream=stream)
    run.start()
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    y = x.sum(dim=1, keepdim=True)
    step = 0
    resumed = run.resume(opt)
    if resumed is not None:
        path, state = resumed
        model.load_state_dict(load_file(str(path / "weights.safetensors")))
        step = state["step"]
    else:
        torch.manual_seed(cfg.seed)

    def train_step(i: int) -> dict:
        if i == fail_at:
            raise RuntimeError("killed")
        index = epoch_batch_index(i, len(x), 4, cfg.seed)
        loss = torch.nn.functional.mse_loss(model(x[index]), y[index])
        loss.backward()
        opt.step()
        opt.zero_grad()
        return {"loss": float(loss.detach())}

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))

    step = run.loop(
        step,
        cfg.steps,
        train_step,
        log_every=1,
        checkpoint_every=2,
        checkpoint=lambda s: run.save(s, write, opt, {"note": "toy"}),
        stop_after=stop_after,
    )
    return run, model, step


def test_a_killed_loop_resumes_to_bit_identical_weights_and_the_same_log(tmp_path):
    _, whole, step = _toy_run(tmp_path / "whole")
    assert step == 6
    _, _, step = _toy_run(tmp_path / "part", stop_after=3)  # stops after step 3; last checkpoint: step 2
    assert step == 3 and last_checkpoint(tmp_path / "part").name == "step-2"
    with pytest.raises(RuntimeError, match="killed"):  # a crash inside step 5 of the resumed run
        _toy_run(tmp_path / "part", fail_at=4)
    assert last_checkpoint(tmp_path / "part").name == "step-4"
    _, resumed, step = _toy_run(tmp_path / "part")
    assert step == 6
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the rows the killed runs wrote after their last checkpoint were dropped when they resumed
    assert (tmp_path / "part" / "log.jsonl").read_text() == (tmp_path / "whole" / "log.jsonl").read_text()
    assert [json.loads(line)["step"] for line in (tmp_path / "whole" / "log.jsonl").open()] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_safetensors_whole_and_the_newest_k_are_kept(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-8.0123456789ab.tmp").mkdir(parents=True)  # a save killed before its rename
    (out / "checkpoints" / "step-9.tmp").mkdir()  # the same, left by an earlier version
    run, _, _ = _toy_run(out, keep_last=2)
    assert [s for s, _ in checkpoint_steps(out)] == [4, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]  # temps swept
    folder = out / "checkpoints" / "step-6"
    assert sorted(p.name for p in folder.iterdir()) == [
        "optimizer.safetensors",
        "trainer_state.json",
        "weights.safetensors",
    ]
    tensors = load_file(str(folder / "optimizer.safetensors"))
    assert "rng/torch" in tensors and any(k.endswith("/exp_avg") for k in tensors)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["step"], state["note"]) == (6, "toy")
    assert len(state["optimizer"]["param_groups"]) == 2
    assert state["config"] == {"out_dir": str(out), "steps": 6, "lr": 0.05, "seed": 1, "tags": ["a", "b"]}
    # the config dump beside the checkpoints: the resolved config, readable back into the dataclass
    dumped = json.loads((out / "toy_config.json").read_text())
    assert ToyConfig(**{**dumped, "tags": tuple(dumped["tags"])}) == run.config
    assert dumped == json.loads(json.dumps(dataclasses.asdict(run.config)))
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        TrainingRun(out, run.config, config_file="x.json", keep_last=0)


def test_progress_bar_only_on_a_terminal_and_when_asked(tmp_path):
    tty = Tty()
    _toy_run(tmp_path / "a", stream=tty)
    shown = tty.getvalue()
    assert "6/6" in shown and "loss=" in shown and "train" in shown
    for stream, progress, name in ((io.StringIO(), True, "b"), (Tty(), False, "c")):
        _toy_run(tmp_path / name, stream=stream, progress=progress)
        assert stream.getvalue() == ""
    assert show_progress(True, Tty()) and not show_progress(True, io.StringIO()) and not show_progress(False, Tty())


def test_prefetcher_makes_the_next_item_ahead_and_never_two_at_once():
    import threading
    import time

    running, made = [], []
    lock = threading.Lock()

    def make(k: int) -> int:
        with lock:
            running.append(k)
            assert len(running) == 1, "two make() calls overlapped"
        time.sleep(0.01)
        made.append((k, threading.current_thread().name))
        with lock:
            running.remove(k)
        if k == 7:
            raise ValueError("corrupt item 7")
        return k * k

    with Prefetcher(make) as ahead:
        assert [ahead.get(k) for k in (0, 1, 2)] == [0, 1, 4]
        assert ahead.get(5) == 25  # not the prefetched 3: it is waited for, dropped, and 5 is made now
        ahead.wait()
        assert made[-1] == (6, made[-1][1]) and made[-1][1].startswith("prefetch")
        assert ahead.get(6) == 36  # made ahead
        with pytest.raises(ValueError, match="corrupt item 7"):
            ahead.get(7)  # an error made ahead surfaces at the get of its item
    assert [k for k, _ in made] == [0, 1, 2, 3, 5, 6, 7]  # nothing is made ahead after an error
    assert made[0][1] == "MainThread" and all(t.startswith("prefetch") for k, t in made if k in (1, 2, 3, 6, 7))
    plain = Prefetcher(make, enabled=False)
    made.clear()
    assert [plain.get(k) for k in (0, 1)] == [0, 1] and [t for _, t in made] == ["MainThread"] * 2


def test_weight_average_follows_its_formula_swaps_in_and_out_and_round_trips(tmp_path):
    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)  # only trainable parameters are averaged
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg = WeightAverage(model, decay=0.9)
    expected = torch.ones(1, 2)
    for n, value in enumerate([3.0, -1.0, 5.0, 2.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        avg.update(model)
        keep = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13, 5/14: the warm-up term, below 0.9
        expected = keep * expected + (1 - keep) * value
    assert avg.updates == 4 and set(avg.average) == {"weight"}
    assert torch.allclose(avg.average["weight"], expected)
    with pytest.raises(RuntimeError, match="inside"), avg.applied(model) as m:  # live weights come back after it
        assert torch.allclose(m.weight, expected)
        raise RuntimeError("inside")
    assert torch.equal(model.weight, torch.full((1, 2), 2.0))
    avg.save(tmp_path)
    other = WeightAverage(model, decay=0.9)  # starts from the live weights, then takes the saved average
    other.load(tmp_path)
    assert other.updates == 4 and torch.equal(other.average["weight"], avg.average["weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without a weight average"):
        other.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="not this model's"):
        WeightAverage(torch.nn.Linear(2, 3), 0.9).load(tmp_path)  # weight and bias against weight alone
    assert (tmp_path / AVERAGE_FILE).is_file()
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(model, bad)


def test_accumulate_step_measures_the_gradient_norm_and_clips_only_when_asked():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def model_and_grad():  # the same model each time, and its gradient of the loss below by plain autograd
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        loss = (model(x) ** 2).sum() * 5
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return model, grads, float(torch.sqrt(sum((g**2).sum() for g in grads)))

    def stepped(max_norm: float, accum: int = 1):
        model, grads, norm = model_and_grad()
        start = [p.detach().clone() for p in model.parameters()]
        accelerator = make_accelerator("cpu", "no", accum)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        norms = [
            accumulate_step(accelerator, model, optimizer, lambda: ((model(x) ** 2).sum() * 5, None), max_norm)[2]
            for _ in range(accum)
        ]
        return norms, start, [p.detach() for p in model.parameters()], grads, norm

    norms, start, params, grads, norm = stepped(0.0)
    assert norm > 1.0 and norms == [pytest.approx(norm, rel=1e-6)]  # measured, before any clipping
    # without a threshold the gradients keep their bits: the step is a plain backward and SGD step, exactly
    plain, *_ = model_and_grad()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1)
    ((plain(x) ** 2).sum() * 5).backward()
    sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(params, plain.parameters(), strict=True))
    assert any(not torch.equal(p, s) for p, s in zip(params, start, strict=True))
    norms, start, params, grads, norm = stepped(0.5)
    assert norms == [pytest.approx(norm, rel=1e-6)]  # the norm logged is the one before clipping
    applied = torch.sqrt(sum((((s - p) / 0.1) ** 2).sum() for p, s in zip(params, start, strict=True)))
    assert float(applied) == pytest.approx(0.5, rel=1e-4)  # the step used gradients of norm 0.5
    for p, s, g in zip(params, start, grads, strict=True):
        torch.testing.assert_close(s - p, 0.1 * g * 0.5 / norm, rtol=1e-4, atol=1e-7)  # same direction
    # two micro-batches of one step: only the one that steps measures (the mean of two equal gradients)
    norms, *_, norm = stepped(0.0, accum=2)
    assert norms[0] is None and norms[1] == pytest.approx(norm, rel=1e-6)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_grad_norm must be a finite number >= 0"):
            check_grad_norm(bad)
