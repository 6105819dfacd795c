"""Training RAHF on RichHF-18K-schema data (the real dataset or the synthetic world), with accelerate.

A data folder holds, per split, ``<split>.tfrecord`` (RichHF-18K schema), ``<split>.jsonl`` rows with ``uid``,
``image`` (path relative to the folder) and ``prompt``, and the images. ``richfeedback synth`` writes exactly that.

The loop, top to bottom: build the model from a preset (or a saved folder) -> load the splits -> for each
optimizer step, take ``grad_accum`` micro-batches in an order fixed by (seed, epoch) -> log every loss part ->
every ``eval_every`` steps measure the dev loss and keep the best checkpoint -> every ``checkpoint_every`` steps
save a checkpoint. The loop, the config dump, the log and progress bar, the checkpoints, the batch order and the
accelerate set-up are the shared training harness's (:mod:`training.harness`). A killed run resumes from its last
checkpoint and ends with bit-identical weights to an uninterrupted run (on CPU): the data order is a function of
the step, and the checkpoint holds the model (safetensors), the optimizer state and the torch RNG state
(safetensors), the step (JSON), and with ``ema_decay`` > 0 the moving average of the weights (safetensors) that the
dev loss and ``best/`` use.

Splits are read lazily (:class:`rahf.data.richhf.RichHFSplit`): a batch is decoded when it is drawn, so memory
does not grow with the dataset. Under ``accelerate launch`` / ``torchrun`` every process takes a disjoint slice of
the same seeded global micro-batch, loss parts are weighted by their share of it (:func:`rank_loss`), and only
the main process writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file

from rahf.data.richhf import RichHFSplit, read_split
from rahf.model import (
    TRAINING_FIELDS,
    RAHFConfig,
    RAHFLabels,
    RAHFModel,
    RAHFOutput,
    empty_maps,
    ranking_pairs,
)
from rahf.presets import build_rahf
from rahf.processor import RAHFProcessor
from rahf.words import swap_word
from training.harness import (
    Prefetcher,
    TrainingRun,
    WeightAverage,
    accumulate_step,
    adamw,
    batches_per_epoch,
    check_grad_norm,
    due,
    epoch_batch_index,
    load_trainer_state,
    make_accelerator,
)
from training.harness import last_checkpoint as last_checkpoint  # re-exported: earlier importers use these names
from training.harness import pack_optimizer as pack_optimizer
from training.harness import save_checkpoint as _save_checkpoint_folder
from training.harness import unpack_optimizer as unpack_optimizer


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
    # > 0: keep an exponential moving average of the weights with this decay (e.g. 0.999); the dev loss and best/
    # use the average (step checkpoints keep the live weights and the average, to resume both)
    ema_decay: float = 0.0
    # > 0: scale the gradients down to this global L2 norm before each step (0: no clipping); the norm before
    # clipping is logged as grad_norm either way
    max_grad_norm: float = 0.0
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    channels_last: bool = False  # run the convolutional heads channels-last (faster on CPU; same maths)
    prefetch: bool | None = None  # next batch made in a background thread (None: on for an accelerator, off on CPU)
    heatmap_loss_weight: float | None = None  # override the model config's w_h (None: keep)
    score_loss_weight: float | None = None  # override w_s
    token_loss_weight: float | None = None  # override w_t
    empty_heatmap_weight: float | None = None  # override the extra weight on empty target maps
    itm_loss_weight: float | None = None  # override the image-text matching loss weight (> 0 adds its head)
    heatmap_loss: str | None = None  # override the per-pixel map loss: "mse" | "bce"
    heatmap_weights: dict[str, float] | None = None  # override the per-map factors on the heatmap loss weight
    itm_negatives: int | None = None  # override how many images per batch get an ITM negative (0: all)
    itm_swaps: list[list[str]] | None = None  # override the word classes of edited-prompt ITM negatives
    itm_target: str | None = None  # override the ITM target of an image's own prompt: "match" | "alignment"
    rank_loss_weight: float | None = None  # override the within-prompt ranking loss weight (> 0 turns it on)
    rank_temperature: float | None = None  # override its temperature
    rank_min_gap: float | None = None  # override the true-score gap below which a pair is a tie
    gate_loss_weight: float | None = None  # override the presence gates' loss weight (> 0 adds the gates)
    score_reads_prompt: bool | None = None  # score heads also read the pooled encoded prompt (presets only)
    itm_pool: str | None = None  # ITM head pooling, "mean" | "mean_max" (presets only)
    word_loss_weight: float | None = None  # override the word head's loss weight (> 0 adds the head)
    prompt_group: int = 1  # images of one prompt kept together in a batch (> 1 for the ranking loss)
    train_split: str = "train"
    dev_split: str = "dev"
    keep_checkpoints: int | None = None  # step checkpoints to keep (the newest; None: all)
    progress: bool = True  # a progress bar on stderr when it is a terminal (main process only)
    # an output whose spread over the dev split falls below this is reported as collapsed (a constant)
    collapse_spread: float = 1e-3

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
class TrainBatch:
    """Examples decoded at the model resolution."""

    pixels: torch.Tensor  # (B, 3, S, S) normalised
    heatmaps: dict[str, torch.Tensor]  # name -> (B, S, S) in [0, 1]
    scores: dict[str, torch.Tensor]  # name -> (B,)
    prompts: list[str]
    targets: list[str]  # keyword sequences ("a yellow_0 cat")
    word_labels: list[list[int]]  # per prompt word, 1 = aligned, 0 = misaligned (RichHF-18K)


class SplitData:
    """A split for training: a lazy :class:`RichHFSplit`, decoded one batch at a time at the model resolution.

    Nothing decoded is kept between batches, so memory does not grow with the split. ``pixels``, ``heatmaps``,
    ``scores`` and ``targets`` are the whole split decoded once and then kept — for small in-memory users (the
    baselines); training never reads them.
    """

    def __init__(self, records: RichHFSplit, processor: RAHFProcessor) -> None:
        self.records = records
        self.processor = processor
        self.skipped = records.skipped  # examples dropped because word and label counts differ

    def __len__(self) -> int:
        return len(self.records)

    @property
    def prompts(self) -> list[str]:
        return self.records.prompts

    def batch(self, index: torch.Tensor | Sequence[int]) -> TrainBatch:
        """The examples at ``index`` (in that order), read from disk and decoded now."""
        size = self.processor.image_size
        pixels, maps, scores, prompts, targets, words = [], {}, {}, [], [], []
        for rec in self.records.read(torch.as_tensor(index).tolist()):
            pixels.append(self.processor.preprocess_image(rec.image))
            for name, m in rec.example.heatmaps.items():
                maps.setdefault(name, []).append(_resize_map(m, size))
            for name, v in rec.example.scores.items():
                scores.setdefault(name, []).append(v)
            prompts.append(rec.prompt)
            targets.append(self.processor.keyword_target(rec.prompt, rec.example.word_labels))
            words.append(list(rec.example.word_labels))
        return TrainBatch(
            torch.stack(pixels),
            {k: torch.stack(v) for k, v in maps.items()},
            {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items()},
            prompts,
            targets,
            words,
        )

    @cached_property
    def _whole(self) -> TrainBatch:
        return self.batch(torch.arange(len(self)))

    @property
    def pixels(self) -> torch.Tensor:
        """(N, 3, S, S): the whole split, decoded on first use and kept."""
        return self._whole.pixels

    @property
    def heatmaps(self) -> dict[str, torch.Tensor]:
        """name -> (N, S, S): the whole split, decoded on first use and kept."""
        return self._whole.heatmaps

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """name -> (N,): the whole split, decoded on first use and kept."""
        return self._whole.scores

    @property
    def targets(self) -> list[str]:
        return self._whole.targets


def load_split(data_dir: str | Path, split: str, processor: RAHFProcessor) -> SplitData:
    """Index a split (lazily, see :class:`RichHFSplit`); examples whose prompt word count differs from the label
    count are skipped and counted. Raises ``ValueError`` when no example is usable."""
    records, skipped = read_split(data_dir, split)
    if not len(records):
        raise ValueError(f"{data_dir}/{split}: no usable examples ({skipped} skipped)")
    return SplitData(records, processor)


def _resize_map(m: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(m, np.float32))
    if t.shape != (size, size):
        t = F.interpolate(t[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return t.clamp(0, 1)


def batch_inputs(
    model: RAHFModel, processor: RAHFProcessor, data: SplitData, index: torch.Tensor, swap_seed: Sequence[int] = (0,)
):
    """Model inputs and labels for the examples at ``index``: (pixels, input_ids, attention_mask, labels).

    With ``config.itm_swaps`` and an ITM head, the labels carry each prompt's edited-prompt negative, drawn by a
    generator seeded with ``swap_seed`` (the same batch and seed give the same edits: resume is exact)."""
    batch = data.batch(index)
    if model.config.variant == "multi_head":
        text = processor.tokenize(batch.prompts)
    else:
        tasks = model.task_order(model.config.heatmap_names, model.config.score_names, True)
        text = processor.tokenize_tasks(batch.prompts, [model.config.task_prefixes[t] for t in tasks])
    labels = RAHFLabels(
        heatmaps=batch.heatmaps,
        scores=batch.scores,
        keyword_ids=processor.tokenize_targets(batch.targets),
        groups=prompt_groups(batch.prompts),
        word_targets=processor.word_targets(batch.prompts, batch.word_labels) if hasattr(model, "word_head") else None,
    )
    if model.config.itm_swaps and hasattr(model, "itm_head"):
        rng = np.random.default_rng([*swap_seed, 7919])
        edits = [swap_word(p, model.config.itm_swaps, rng) for p in batch.prompts]
        rows = [i for i, e in enumerate(edits) if e is not None]
        swapped = processor.tokenize([edits[i] for i in rows]) if rows else None
        labels.swap_rows = torch.tensor(rows, dtype=torch.int64)
        labels.swap_ids = swapped.input_ids if swapped else torch.zeros(0, 1, dtype=torch.int64)
        labels.swap_mask = swapped.attention_mask if swapped else torch.zeros(0, 1, dtype=torch.int64)
    return batch.pixels, text.input_ids, text.attention_mask, labels


def prompt_groups(prompts: Sequence[str]) -> torch.Tensor:
    """(B,) int64: the index of each prompt's first occurrence, so equal prompts share a value."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(p, len(first)) for p in prompts], dtype=torch.int64)


def grouped_epoch_order(prompts: Sequence[str], group: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of range(len(prompts)) in which the images of one prompt come in runs of up to ``group``.

    Each prompt's images are shuffled and cut into runs of ``group``; the shorter rests of all prompts are packed
    together into runs of ``group`` (mixed prompts); the runs are shuffled and concatenated. Fixed by (seed,
    epoch). Cut into consecutive batches of a multiple of ``group``, a batch holds whole runs, so the
    within-prompt ranking loss sees pairs of the same prompt in every batch.
    """
    return _grouped_epoch_order(tuple(prompts), group, seed, epoch)


@lru_cache(maxsize=1)  # batches are drawn epoch by epoch: one epoch's order is computed once
def _grouped_epoch_order(prompts: tuple[str, ...], group: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    members: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        members.setdefault(p, []).append(i)
    runs: list[torch.Tensor] = []
    pieces: list[torch.Tensor] = []  # the short rest of each prompt
    for index in members.values():
        shuffled = torch.tensor(index)[torch.randperm(len(index), generator=gen)]
        for run in shuffled.split(group):
            (runs if len(run) == group else pieces).append(run)
    if pieces:  # the short rests, shuffled and packed into runs of ``group`` too, so every run fills its slot
        rest = torch.cat([pieces[r] for r in torch.randperm(len(pieces), generator=gen).tolist()])
        runs += list(rest.split(group))
    order = torch.cat([runs[r] for r in torch.randperm(len(runs), generator=gen).tolist()])
    return order


def micro_batch_index(
    k: int, n: int, batch_size: int, seed: int, prompts: Sequence[str] | None = None, group: int = 1
) -> torch.Tensor:
    """Indices of global micro-batch ``k``: the harness's batch order (:func:`training.harness.epoch_batch_index`,
    full batches only), so the order is a function of k. With ``prompts`` and ``group`` > 1 the epoch's order
    is :func:`grouped_epoch_order` instead (same number of batches per epoch)."""
    if group <= 1 or prompts is None:
        return epoch_batch_index(k, n, batch_size, seed)
    per_epoch = batches_per_epoch(n, batch_size)
    epoch, j = divmod(k, per_epoch)
    return grouped_epoch_order(prompts, group, seed, epoch)[j * batch_size : (j + 1) * batch_size]


def rank_batch_index(
    k: int,
    n: int,
    batch_size: int,
    seed: int,
    rank: int,
    world: int,
    prompts: Sequence[str] | None = None,
    group: int = 1,
) -> torch.Tensor:
    """Process ``rank``'s ``batch_size`` indices of micro-batch ``k`` when ``world`` processes train together.

    Every process draws the same global micro-batch of ``batch_size × world`` (:func:`micro_batch_index`) and
    takes its own slice, so the slices are disjoint and ``world`` processes see exactly what one process with the
    global batch would. One process: :func:`micro_batch_index` itself.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    if group > 1 and batch_size % group:
        raise ValueError(f"batch_size {batch_size} is not a multiple of prompt_group {group}")
    if world == 1:
        return micro_batch_index(k, n, batch_size, seed, prompts, group)
    total = batch_size * world
    if n < total:
        raise ValueError(
            f"{n} training examples, fewer than one global batch of {total} ({batch_size} × {world} processes)"
        )
    return micro_batch_index(k, n, total, seed, prompts, group)[rank * batch_size : (rank + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------
# Losses across processes
# ---------------------------------------------------------------------------------------------------------


def loss_terms(config: RAHFConfig, labels: RAHFLabels, outputs: RAHFOutput) -> dict[str, tuple[float, torch.Tensor]]:
    """Per loss part: (its coefficient in the model's total loss, the count its batch mean divides by).

    Scores, and heatmaps without an empty-map weight, are means over samples (count = B); the token loss is a
    mean over target tokens; heatmaps with ``empty_heatmap_weight`` λ > 0 divide by Σ (1 + λ·[target empty]);
    the ITM loss is a mean over its (B + negatives) pairs. So part = Σ over a split batch of part_r · count_r /
    Σ count_r, which is what :func:`rank_loss` uses.
    """
    terms: dict[str, tuple[float, torch.Tensor]] = {}
    for key, part in outputs.loss_parts.items():
        kind, _, name = key.partition("/")
        if kind == "heatmap":
            target = labels.heatmaps[name]
            coef = config.heatmap_loss_weight * config.heatmap_weights.get(name, 1.0)
            if config.empty_heatmap_weight == 0.0:
                count = torch.tensor(float(target.shape[0]))
            else:
                empty = empty_maps(target)
                count = (1.0 + config.empty_heatmap_weight * empty.float()).sum()
        elif kind == "gate":
            coef, count = config.gate_loss_weight, torch.tensor(float(labels.heatmaps[name].shape[0]))
        elif kind == "score":
            coef, count = config.score_loss_weight, torch.tensor(float(labels.scores[name].shape[0]))
        elif kind == "rank" and labels.groups is not None:
            pairs = ranking_pairs(labels.scores[name].float(), labels.groups, config.rank_min_gap)
            coef, count = config.rank_loss_weight, pairs.sum().float()
        elif key == "tokens" and labels.keyword_ids is not None:
            coef, count = config.token_loss_weight, (labels.keyword_ids != -100).sum().float()
        elif key == "words" and labels.word_targets is not None:
            coef, count = config.word_loss_weight, (labels.word_targets >= 0).sum().float()
        elif key == "itm" and outputs.itm_logits is not None:
            coef, count = config.itm_loss_weight, torch.tensor(float(outputs.itm_logits.numel()))
        else:
            raise ValueError(f"no rule to weight the loss part {key!r} across processes")
        terms[key] = (float(coef), count.detach().to(part.device, torch.float64))
    return terms


def rank_loss(
    parts: dict[str, torch.Tensor], terms: dict[str, tuple[float, torch.Tensor]], totals: dict, world: int
) -> torch.Tensor:
    """This process's share of the global batch's loss: Σ coef · part · count · world / Σ_ranks count.

    Averaged over the ``world`` processes (what DDP does to gradients) it is the loss of the whole global batch,
    token loss and empty-map weights included. ``totals``: part -> count summed over the processes.
    """
    return sum(coef * parts[k] * (count * world / totals[k]).to(parts[k].dtype) for k, (coef, count) in terms.items())


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def _model_writer(model: RAHFModel, processor: RAHFProcessor):
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return write


def save_checkpoint(path: Path, model: RAHFModel, processor: RAHFProcessor, optimizer, step: int, best: float) -> None:
    """Model + processor (safetensors, JSON), optimizer tensors + torch RNG (safetensors), step and scalars (JSON);
    the folder appears whole or not at all (:func:`training.harness.save_checkpoint`)."""
    _save_checkpoint_folder(path, _model_writer(model, processor), optimizer, {"step": step, "best_dev_loss": best})


def load_checkpoint(path: Path, model: RAHFModel, optimizer) -> tuple[int, float]:
    """Restore model, optimizer and RNG from ``path``; returns (step, best dev loss)."""
    model.load_state_dict_strict(load_file(str(path / "model.safetensors")))
    meta = load_trainer_state(path, optimizer)
    return int(meta["step"]), float(meta["best_dev_loss"])


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def dev_loss(
    model: RAHFModel,
    processor: RAHFProcessor,
    data: SplitData,
    batch_size: int,
    device,
    accelerator: Accelerator | None = None,
    spread: dict[str, float] | None = None,
) -> float:
    """Mean over examples of the loss of consecutive batches of ``batch_size``.

    With an ``accelerator`` of several processes, process r evaluates batches r, r + world, ... and the sums are
    reduced, so every process returns the same number as one process would (same batches). A ``spread`` dict is
    filled with :func:`output_spread` of the predictions (over this process's share of the split).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    model.eval()
    total, n = 0.0, 0
    sums: dict[str, list[torch.Tensor]] = {}  # output -> [Σ x, Σ x², count] over examples
    for j, start in enumerate(range(0, len(data), batch_size)):
        if j % world != rank:
            continue
        index = torch.arange(start, min(start + batch_size, len(data)))
        px, ids, mask, labels = batch_inputs(model, processor, data, index, (start,))
        labels = _to(labels, device)
        out = model(px.to(device), ids.to(device), mask.to(device), labels=labels)
        total += float(out.loss) * len(index)
        n += len(index)
        if spread is not None:
            for name, value in {**out.scores, **out.heatmaps}.items():
                x = value.detach().double().flatten(1) if value.dim() > 1 else value.detach().double()[:, None]
                acc = sums.setdefault(name, [torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)] * 2)
                sums[name] = [acc[0] + x.sum(0), acc[1] + (x * x).sum(0)]
    model.train()
    if spread is not None:
        spread.update(output_spread(sums, n))
    if world > 1:
        total, n = accelerator.reduce(torch.tensor([total, n], dtype=torch.float64, device=device), "sum").tolist()
    return total / n


def output_spread(sums: dict[str, list[torch.Tensor]], n: int) -> dict[str, float]:
    """Per output, its standard deviation across examples (for a heatmap: per pixel, then averaged over pixels),
    from [Σ x, Σ x²] over ``n`` examples. 0 for an output that is the same for every input: a collapsed head."""
    out = {}
    for name, (s1, s2) in sums.items():
        var = (s2 / n - (s1 / n) ** 2).clamp_min(0.0)
        out[name] = float(var.sqrt().mean())
    return out


def _to(labels: RAHFLabels, device) -> RAHFLabels:
    return RAHFLabels(
        {k: v.to(device) for k, v in labels.heatmaps.items()},
        {k: v.to(device) for k, v in labels.scores.items()},
        labels.keyword_ids.to(device) if labels.keyword_ids is not None else None,
        labels.groups.to(device) if labels.groups is not None else None,
        labels.word_targets.to(device) if labels.word_targets is not None else None,
        *(t.to(device) if t is not None else None for t in (labels.swap_ids, labels.swap_mask, labels.swap_rows)),
    )


# Loss weights whose being > 0 adds a module to the model: weight -> (the module's attribute, how errors name it).
# A saved folder without the module cannot turn its weight on.
WEIGHTED_HEADS = {
    "itm_loss_weight": ("itm_head", "an ITM head"),
    "gate_loss_weight": ("heatmap_gates", "presence gates"),
    "word_loss_weight": ("word_head", "a word head"),
}


# RAHFConfig fields that shape the architecture and that a run from a preset may set (TrainConfig fields of the
# same name); a run that continues from a saved folder keeps the folder's and refuses another value.
ARCHITECTURE_FIELDS = ("score_reads_prompt", "itm_pool")


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) training; ``stop_after`` ends early after that many optimizer steps (tests of resume).

    Under ``accelerate launch`` / ``torchrun`` with several processes, ``batch_size`` is per process: each takes
    its slice of one seeded global micro-batch of ``batch_size × processes`` (:func:`rank_batch_index`), DDP
    averages the gradients of :func:`rank_loss`, and only the main process writes the configuration, the log and
    the checkpoints. Returns a summary: final step, best dev loss, seconds, examples, skipped example counts,
    processes and the global batch (per optimizer micro-step).
    """
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: no weight average), got {cfg.ema_decay}")
    check_grad_norm(cfg.max_grad_norm)
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision, cfg.grad_accum)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    run = TrainingRun(
        cfg.out_dir,
        cfg,
        config_file="train_config.json",
        main=main,
        keep_last=cfg.keep_checkpoints,
        progress=cfg.progress,
        desc="train",
    )
    run.start()
    overrides: dict[str, Any] = {n: getattr(cfg, n) for n in TRAINING_FIELDS if getattr(cfg, n) is not None}
    if Path(cfg.preset).is_dir():
        model, processor = RAHFModel.from_pretrained(cfg.preset), RAHFProcessor.from_pretrained(cfg.preset)
        for weight, (module, what) in WEIGHTED_HEADS.items():
            if overrides.get(weight, 0.0) > 0 and not hasattr(model, module):
                raise ValueError(f"{cfg.preset} was saved without {what}; {weight} must stay 0 for it")
        for name in ARCHITECTURE_FIELDS:
            if getattr(cfg, name) is not None and getattr(cfg, name) != getattr(model.config, name):
                raise ValueError(
                    f"{cfg.preset} was saved with {name}={getattr(model.config, name)!r}; "
                    "an architecture field cannot change when training continues from a folder"
                )
        # The config is rebuilt, not patched, so its checks (finite weights >= 0, ...) apply to the overrides.
        model.config = RAHFConfig.from_dict({**model.config.to_dict(), **overrides})
    else:  # the overrides are part of the config the model is built from (the ITM head exists only if w > 0)
        overrides |= {n: getattr(cfg, n) for n in ARCHITECTURE_FIELDS if getattr(cfg, n) is not None}
        model, processor = build_rahf(cfg.preset, variant=cfg.variant, seed=cfg.seed, config_overrides=overrides)
    train_data = load_split(cfg.data_dir, cfg.train_split, processor)
    dev_data = load_split(cfg.data_dir, cfg.dev_split, processor)
    train_prompts = train_data.prompts if cfg.prompt_group > 1 else None
    # refuse a split too small, or a batch that cannot hold whole prompt groups, now
    rank_batch_index(0, len(train_data), cfg.batch_size, cfg.seed, rank, world, train_prompts, cfg.prompt_group)
    model.train()
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)  # one group: every parameter decays
    step, best = 0, float("inf")
    resumed = run.resume(optimizer)
    if resumed is not None:
        path, state = resumed
        model.load_state_dict_strict(load_file(str(path / "model.safetensors")))
        step, best = int(state["step"]), float(state["best_dev_loss"])
    else:
        torch.manual_seed(cfg.seed)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    device = accelerator.device
    average = WeightAverage(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None  # on the device, after prepare
    if average is not None and resumed is not None:
        average.load(resumed[0])
    write_model = _model_writer(raw, processor)

    def write_checkpoint(folder: Path) -> None:  # the live weights, and the average to resume it
        write_model(folder)
        if average is not None:
            average.save(folder)

    def averaged():  # the model as it is evaluated and kept as best/: with the weight average in place, if any
        return average.applied(raw) if average is not None else contextlib.nullcontext(raw)

    def micro_batch(k: int):  # micro-batch k of this process: a function of k alone (exact resume, prefetch)
        index = rank_batch_index(
            k, len(train_data), cfg.batch_size, cfg.seed, rank, world, train_prompts, cfg.prompt_group
        )
        return batch_inputs(raw, processor, train_data, index, (cfg.seed, k, rank))

    batches = Prefetcher(micro_batch, enabled=cfg.prefetch if cfg.prefetch is not None else device.type != "cpu")

    def train_step(step: int) -> dict[str, Any]:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        parts_sum: dict[str, float] = {}
        norm = None
        for micro in range(cfg.grad_accum):
            k = step * cfg.grad_accum + micro
            px, ids, mask, labels = batches.get(k)
            labels = _to(labels, device)

            def compute(px=px, ids=ids, mask=mask, labels=labels) -> tuple[torch.Tensor, dict[str, float]]:
                outputs = model(
                    px.to(device), ids.to(device), mask.to(device), labels=labels, channels_last=cfg.channels_last
                )
                parts = {k: float(v.detach()) for k, v in outputs.loss_parts.items()}
                loss = outputs.loss
                if world > 1:  # each part weighted by its share of the global batch (see rank_loss)
                    terms = loss_terms(raw.config, labels, outputs)
                    counts = torch.stack([c for _, c in terms.values()]).to(device)
                    totals = dict(zip(terms, accelerator.reduce(counts, "sum"), strict=True))
                    loss = rank_loss(outputs.loss_parts, terms, totals, world)
                    parts = {k: parts[k] * float(c * world / totals[k]) for k, (_, c) in terms.items()}
                return loss, parts

            _, parts, norm = accumulate_step(accelerator, model, optimizer, compute, cfg.max_grad_norm)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
        if world > 1:  # the mean over processes of the weighted parts is the global batch's part
            mean = accelerator.reduce(torch.tensor(list(parts_sum.values()), dtype=torch.float64, device=device))
            parts_sum = dict(zip(parts_sum, (v / world for v in mean.tolist()), strict=True))
        if average is not None:
            average.update(raw)
        row = {"lr": lr_at(step, cfg), "loss": sum(parts_sum.values()), **parts_sum}
        return row | ({"grad_norm": norm} if norm is not None else {})

    def evaluate(step: int) -> None:
        nonlocal best
        if not due(step, cfg.eval_every, cfg.steps):
            return
        batches.wait()  # the dev batches use the processor the prefetch thread uses
        spread: dict[str, float] = {}
        with averaged():
            loss_dev = dev_loss(raw, processor, dev_data, cfg.batch_size, device, accelerator, spread)
        low = sorted(k for k, v in spread.items() if v < cfg.collapse_spread)
        run.log({"step": step, "dev_loss": loss_dev, "dev_spread": spread, **({"collapsed": low} if low else {})})
        collapsed[:] = low
        if low and main:
            warnings.warn(
                f"step {step}: outputs collapsed to constants on the dev split: "
                + ", ".join(f"{k} spread {spread[k]:.2g}" for k in low)
                + f" (below collapse_spread {cfg.collapse_spread:g}); the model does not tell these images apart",
                RuntimeWarning,
                stacklevel=2,
            )
        if loss_dev < best:  # the same on every process: the dev loss is reduced over them
            best = loss_dev
            with averaged():
                run.save(step, write_model, optimizer, {"best_dev_loss": best}, name="best")

    collapsed: list[str] = []  # outputs collapsed at the latest dev evaluation

    def checkpoint(step: int) -> None:
        batches.wait()  # the checkpoint writes the processor's tokenizer
        run.save(step, write_checkpoint, optimizer, {"best_dev_loss": best})

    started = time.perf_counter()
    step = run.loop(
        step,
        cfg.steps,
        train_step,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint=checkpoint,
        after_step=evaluate,
        stop_after=stop_after,
    )
    batches.close()  # (after an error the pool goes with this frame, and its thread exits)
    accelerator.wait_for_everyone()
    return {
        "step": step,
        "best_dev_loss": best,
        "seconds": time.perf_counter() - started,
        "train_examples": len(train_data),
        "collapsed_outputs": collapsed,
        "skipped": train_data.skipped + dev_data.skipped,
        "processes": world,
        "global_batch": cfg.batch_size * world,
        "main_process": main,
    }
