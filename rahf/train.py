"""Training RAHF on RichHF-18K-schema data (the real dataset or the synthetic world), with accelerate.

A data folder holds, per split, ``<split>.tfrecord`` (RichHF-18K schema), ``<split>.jsonl`` rows with ``uid``,
``image`` (path relative to the folder) and ``prompt``, and the images. ``richfeedback synth`` writes exactly that.

The loop, top to bottom: build the model from a preset (or a saved folder) -> load the splits -> for each
optimizer step, take ``grad_accum`` micro-batches in an order fixed by (seed, epoch) -> log every loss part ->
every ``eval_every`` steps measure the dev loss and keep the best checkpoint -> every ``checkpoint_every`` steps
save a checkpoint. A killed run resumes from its last checkpoint and ends with the same weights as an
uninterrupted run: the data order is a function of the step, and the checkpoint holds the model (safetensors),
the optimizer state and the torch RNG state (safetensors), and the step (JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from rahf.data.richhf import read_split
from rahf.model import TRAINING_FIELDS, RAHFConfig, RAHFLabels, RAHFModel
from rahf.presets import build_rahf
from rahf.processor import RAHFProcessor


@dataclass
class TrainConfig:
    """Every knob of a training run (JSON file or command-line flags)."""

    data_dir: str  # folder with <split>.tfrecord, <split>.jsonl and images
    out_dir: str  # checkpoints, best model, log.jsonl
    preset: str = "rahf-tiny"  # preset name, or a RAHF folder to continue from
    variant: str = "multi_head"  # multi_head | augmented_prompt (presets only)
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 10 % of lr
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    channels_last: bool = False  # run the convolutional heads channels-last (faster on CPU; same maths)
    heatmap_loss_weight: float | None = None  # override the model config's w_h (None: keep)
    score_loss_weight: float | None = None  # override w_s
    token_loss_weight: float | None = None  # override w_t
    empty_heatmap_weight: float | None = None  # override the extra weight on empty target maps
    itm_loss_weight: float | None = None  # override the image-text matching loss weight (> 0 adds its head)
    heatmap_loss: str | None = None  # override the per-pixel map loss: "mse" | "bce"
    heatmap_weights: dict[str, float] | None = None  # override the per-map factors on the heatmap loss weight
    itm_negatives: int | None = None  # override how many images per batch get an ITM negative (0: all)
    train_split: str = "train"
    dev_split: str = "dev"

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        data = {**json.loads(Path(path).read_text()), **{k: v for k, v in overrides.items() if v is not None}}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """A split as tensors at the model resolution, plus prompts and keyword targets."""

    pixels: torch.Tensor  # (N, 3, S, S) normalised
    heatmaps: dict[str, torch.Tensor]  # name -> (N, S, S) in [0, 1]
    scores: dict[str, torch.Tensor]  # name -> (N,)
    prompts: list[str]
    targets: list[str]  # keyword sequences ("a yellow_0 cat")
    skipped: int  # examples dropped because word and label counts differ

    def __len__(self) -> int:
        return len(self.prompts)


def load_split(data_dir: str | Path, split: str, processor: RAHFProcessor) -> SplitData:
    """Read a split; examples whose prompt word count differs from the label count are skipped and counted."""
    records, skipped = read_split(data_dir, split)
    size = processor.image_size
    pixels, maps, scores, prompts, targets = [], {}, {}, [], []
    for rec in records:
        pixels.append(processor.preprocess_image(rec.image))
        for name, m in rec.example.heatmaps.items():
            maps.setdefault(name, []).append(_resize_map(m, size))
        for name, v in rec.example.scores.items():
            scores.setdefault(name, []).append(v)
        prompts.append(rec.prompt)
        targets.append(processor.keyword_target(rec.prompt, rec.example.word_labels))
    if not prompts:
        raise ValueError(f"{data_dir}/{split}: no usable examples ({skipped} skipped)")
    return SplitData(
        torch.stack(pixels),
        {k: torch.stack(v) for k, v in maps.items()},
        {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()},
        prompts,
        targets,
        skipped,
    )


def _resize_map(m: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(m, np.float32))
    if t.shape != (size, size):
        t = F.interpolate(t[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return t.clamp(0, 1)


def batch_inputs(model: RAHFModel, processor: RAHFProcessor, data: SplitData, index: torch.Tensor):
    """Model inputs and labels for the examples at ``index``."""
    prompts = [data.prompts[i] for i in index.tolist()]
    if model.config.variant == "multi_head":
        text = processor.tokenize(prompts)
    else:
        tasks = model.task_order(model.config.heatmap_names, model.config.score_names, True)
        text = processor.tokenize_tasks(prompts, [model.config.task_prefixes[t] for t in tasks])
    labels = RAHFLabels(
        heatmaps={k: v[index] for k, v in data.heatmaps.items()},
        scores={k: v[index] for k, v in data.scores.items()},
        keyword_ids=processor.tokenize_targets([data.targets[i] for i in index.tolist()]),
    )
    return data.pixels[index], text.input_ids, text.attention_mask, labels


def micro_batch_index(k: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of global micro-batch ``k``: epochs are seeded permutations, so the order is a function of k."""
    per_epoch = max(1, n // batch_size)
    epoch, j = divmod(k, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[j * batch_size : (j + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def pack_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state and the torch RNG as (tensors for safetensors, JSON-able scalars); no pickle."""
    state = optimizer.state_dict()
    tensors = {"rng/torch": torch.get_rng_state()}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, st in state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state/{pid}/{key}"] = val.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = val
    return tensors, scalars


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Inverse of :func:`pack_optimizer`: restores the optimizer state and the torch RNG."""
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("state/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = val
    for pid, extra in scalars["state"].items():
        state.setdefault(int(pid), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])


def save_checkpoint(path: Path, model: RAHFModel, processor: RAHFProcessor, optimizer, step: int, best: float) -> None:
    """Model (safetensors), optimizer tensors + torch RNG (safetensors), step and scalars (JSON); atomic."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tensors, scalars = pack_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "best_dev_loss": best, "optimizer": scalars}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(path: Path, model: RAHFModel, optimizer) -> tuple[int, float]:
    """Restore model, optimizer and RNG from ``path``; returns (step, best dev loss)."""
    model.load_state_dict_strict(load_file(str(path / "model.safetensors")))
    meta = json.loads((path / "trainer_state.json").read_text())
    unpack_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    return int(meta["step"]), float(meta["best_dev_loss"])


def last_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def dev_loss(model: RAHFModel, processor: RAHFProcessor, data: SplitData, batch_size: int, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        px, ids, mask, labels = batch_inputs(model, processor, data, index)
        labels = _to(labels, device)
        out = model(px.to(device), ids.to(device), mask.to(device), labels=labels)
        total += float(out.loss) * len(index)
        n += len(index)
    model.train()
    return total / n


def _to(labels: RAHFLabels, device) -> RAHFLabels:
    return RAHFLabels(
        {k: v.to(device) for k, v in labels.heatmaps.items()},
        {k: v.to(device) for k, v in labels.scores.items()},
        labels.keyword_ids.to(device) if labels.keyword_ids is not None else None,
    )


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training; ``stop_after`` ends early after that many optimizer steps (tests of resume).

    Returns a summary: final step, best dev loss, seconds, skipped example counts.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu)
    overrides: dict[str, Any] = {n: getattr(cfg, n) for n in TRAINING_FIELDS if getattr(cfg, n) is not None}
    if Path(cfg.preset).is_dir():
        model, processor = RAHFModel.from_pretrained(cfg.preset), RAHFProcessor.from_pretrained(cfg.preset)
        if overrides.get("itm_loss_weight", 0.0) > 0 and not hasattr(model, "itm_head"):
            raise ValueError(f"{cfg.preset} was saved without an ITM head; itm_loss_weight must stay 0 for it")
        # The config is rebuilt, not patched, so its checks (finite weights >= 0, ...) apply to the overrides.
        model.config = RAHFConfig.from_dict({**model.config.to_dict(), **overrides})
    else:  # the overrides are part of the config the model is built from (the ITM head exists only if w > 0)
        model, processor = build_rahf(cfg.preset, variant=cfg.variant, seed=cfg.seed, config_overrides=overrides)
    train_data = load_split(cfg.data_dir, cfg.train_split, processor)
    dev_data = load_split(cfg.data_dir, cfg.dev_split, processor)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best = 0, float("inf")
    resume = last_checkpoint(out)
    if resume is not None:
        step, best = load_checkpoint(resume, model, optimizer)
    else:
        torch.manual_seed(cfg.seed)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    device = accelerator.device
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - closed in finally
    started, done_now = time.perf_counter(), 0
    try:
        while step < cfg.steps and (stop_after is None or done_now < stop_after):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            parts_sum: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                index = micro_batch_index(step * cfg.grad_accum + micro, len(train_data), cfg.batch_size, cfg.seed)
                px, ids, mask, labels = batch_inputs(raw, processor, train_data, index)
                with accelerator.accumulate(model), accelerator.autocast():
                    outputs = model(
                        px.to(device),
                        ids.to(device),
                        mask.to(device),
                        labels=_to(labels, device),
                        channels_last=cfg.channels_last,
                    )
                    accelerator.backward(outputs.loss)
                    optimizer.step()
                    optimizer.zero_grad()
                for k, v in outputs.loss_parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            step += 1
            done_now += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = {"step": step, "lr": lr_at(step - 1, cfg), "loss": sum(parts_sum.values()), **parts_sum}
                log.write(json.dumps(entry) + "\n")
                log.flush()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                loss = dev_loss(raw, processor, dev_data, cfg.batch_size, device)
                log.write(json.dumps({"step": step, "dev_loss": loss}) + "\n")
                log.flush()
                if loss < best:
                    best = loss
                    save_checkpoint(out / "best", raw, processor, optimizer, step, best)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(out / "checkpoints" / f"step-{step}", raw, processor, optimizer, step, best)
    finally:
        log.close()
    return {
        "step": step,
        "best_dev_loss": best,
        "seconds": time.perf_counter() - started,
        "train_examples": len(train_data),
        "skipped": train_data.skipped + dev_data.skipped,
    }
