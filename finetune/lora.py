"""LoRA finetuning of a generator on a selected image folder (paper §5).

The data is the folder :func:`finetune.dataset.export_dataset` writes (``metadata.jsonl`` with ``file_name`` and
``text``). The loop, top to bottom: build the generator -> encode every image once with the frozen VQ-GAN / VAE
and every prompt once with the frozen text encoder -> add a peft LoRA adapter to the denoiser (aMUSEd's U-ViT or
SD's UNet) -> for each optimizer step take a batch in an order fixed by (seed, epoch) and compute the backend's
loss -> checkpoint every N steps -> save the adapter in the diffusers LoRA format
(``pytorch_lora_weights.safetensors``) that our backends and ``pipe.load_lora_weights`` read.

* aMUSEd: masked-token cross-entropy. Per image a mask ratio r = cos(π/2 · u), u ~ U(0, 1) (aMUSEd's cosine
  schedule); round(r · L) tokens (at least one) are replaced by the mask token and predicted.
* Stable Diffusion: noise-prediction MSE (or v-prediction, as the scheduler says) at a uniform random timestep.
* ``heatmap_weighting``: each example's loss is weighted per region by 1 − its RAHF implausibility heatmap (the
  folder's ``heatmaps/<id>.png``, :func:`finetune.dataset.export_dataset` with ``heatmap="implausibility"``),
  area-pooled to the denoiser's grid: aMUSEd weights each masked token's cross-entropy, SD each latent cell's
  squared error (all channels), and the loss is the weighted mean (a map of ones gives the unweighted loss; a
  region of weight 0 adds no gradient). Off by default.
* The synthetic world has no LoRA: its finetuning is a fit of its flaw rates, with its own config and function
  (:mod:`finetune.synthetic`); :func:`finetune` hands ``generator="synthetic"`` over to it.

The loop, the config dump (``finetune_config.json``), the log and progress bar, the checkpoints, the batch order
(full batches only, :func:`training.harness.epoch_batch_index`) and the accelerate set-up are the shared training
harness's (:mod:`training.harness`). A killed run resumes from its last checkpoint (LoRA weights, optimizer state
and torch RNG in safetensors, step in JSON) and ends with a bit-identical adapter to an uninterrupted run (on CPU).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from common.atomic import atomic_write_bytes
from finetune.dataset import read_image_bytes, read_metadata
from training.harness import (
    TrainingRun,
    accumulate_step,
    adamw,
    check_grad_norm,
    epoch_batch_index,
    load_trainer_state,
    make_accelerator,
)
from training.harness import last_checkpoint as last_checkpoint  # re-exported: earlier importers use this name
from training.harness import save_checkpoint as _save_checkpoint_folder

ADAPTER_DIR = "adapter"


@dataclass
class LoraTrainConfig:
    """Every knob of a LoRA finetuning run (JSON file or command-line flags)."""

    data_dir: str  # image folder with metadata.jsonl (local path or fsspec URL)
    out_dir: str  # checkpoints/, adapter/, log.jsonl
    generator: str = "amused-tiny"  # preset name, hub id or saved pipeline folder
    rank: int = 4  # LoRA rank r
    alpha: float = 4.0  # LoRA alpha (scale alpha / r)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections
    lr: float = 1e-4
    steps: int = 100  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1
    # > 0: scale the gradients down to this global L2 norm before each step (0: no clipping; grad_norm is logged)
    max_grad_norm: float = 0.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    prior_strength: float = 2.0  # generator "synthetic" only: passed on to finetune.synthetic.SyntheticFitConfig
    heatmap_weighting: bool = False  # weight the loss by 1 - the folder's implausibility heatmaps (module docstring)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        for name in ("rank", "steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        check_grad_norm(self.max_grad_norm)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> LoraTrainConfig:
        data = {**json.loads(Path(path).read_text()), **{k: v for k, v in overrides.items() if v is not None}}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown finetuning options {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def load_folder(data_dir: str) -> tuple[list[Image.Image], list[str]]:
    """Images (RGB, as stored) and prompts of an exported folder, in metadata order."""
    rows = read_metadata(data_dir)
    if not rows:
        raise ValueError(f"{data_dir}: metadata.jsonl has no rows; nothing to finetune on")
    images, prompts = [], []
    for row in rows:  # file names are checked to stay inside the folder (symlinks included)
        image = Image.open(io.BytesIO(read_image_bytes(data_dir, row["file_name"])))
        image.load()
        images.append(image)
        prompts.append(str(row["text"]))
    return images, prompts


def load_heatmaps(data_dir: str) -> list[np.ndarray]:
    """The (H, W) float maps in [0, 1] of an exported folder's ``heatmap`` column, in metadata order; raises
    ``ValueError`` naming the first row without one (export with ``heatmap="implausibility"``)."""
    out = []
    for row in read_metadata(data_dir):
        if not row.get("heatmap"):
            raise ValueError(f"{data_dir}: row {row['file_name']!r} has no heatmap (export with heatmap=...)")
        with Image.open(io.BytesIO(read_image_bytes(data_dir, row["heatmap"]))) as im:
            out.append(np.asarray(im.convert("L"), np.float32) / 255.0)
    return out


def heat_weights(heatmaps: list[np.ndarray], grid: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) float weights 1 − (each (H, W) map in [0, 1] area-pooled to ``grid``)."""
    pooled = [
        F.adaptive_avg_pool2d(torch.from_numpy(np.asarray(m, np.float32))[None, None], grid)[0, 0] for m in heatmaps
    ]
    return (1.0 - torch.stack(pooled)).clamp(0.0, 1.0)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(weights · values) / sum(weights) (0 when every weight is 0); weights broadcast to ``values``."""
    w = weights.expand_as(values).to(values.dtype)
    return (w * values).sum() / w.sum().clamp(min=torch.finfo(values.dtype).tiny)


def _pixels(images: list[Image.Image], size: int, normalize: bool) -> torch.Tensor:
    """(N, 3, size, size) float: [0, 1], or [-1, 1] when ``normalize``."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) for im in images])
    x = torch.from_numpy(arr / 255.0).permute(0, 3, 1, 2).contiguous()
    return x * 2 - 1 if normalize else x


def batch_index(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Examples of micro-batch ``step``: the harness's batch order, the same rule as RAHF training's (full batches
    of a permutation fixed by (seed, epoch); :func:`training.harness.epoch_batch_index`)."""
    return epoch_batch_index(step, n, batch_size, seed)


# ---------------------------------------------------------------------------------------------------------
# Backends: frozen encodings once, then the loss of a batch
# ---------------------------------------------------------------------------------------------------------


def _prompt_ids(pipe, prompts: list[str], device: torch.device) -> torch.Tensor:
    """(N, T) token ids padded to the tokenizer's length, as the pipelines encode prompts."""
    tok = pipe.tokenizer
    enc = tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt")
    return enc.input_ids.to(device)


class _AmusedTask:
    """Masked-token cross-entropy on the VQ tokens of the images."""

    def __init__(
        self,
        gen,
        images: list[Image.Image],
        prompts: list[str],
        device: torch.device,
        heatmaps: list[np.ndarray] | None = None,
    ):
        pipe = gen.pipe
        self.denoiser = pipe.transformer
        self.mask_id = int(pipe.scheduler.config.mask_token_id)
        self.size = gen.size
        with torch.no_grad():
            px = _pixels(images, gen.size, normalize=False).to(device)  # aMUSEd's VQ-GAN takes [0, 1]
            latents = pipe.vqvae.encode(px).latents
            _, _, (_, _, idx) = pipe.vqvae.quantize(latents)
            self.tokens = idx.reshape(len(images), latents.shape[-2], latents.shape[-1])
            out = pipe.text_encoder(_prompt_ids(pipe, prompts, device), return_dict=True, output_hidden_states=True)
            self.pooled, self.hidden = out.text_embeds, out.hidden_states[-2]
        self.weights = None if heatmaps is None else heat_weights(heatmaps, tuple(self.tokens.shape[-2:])).to(device)

    def loss(self, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        tokens = self.tokens[index]
        b, h, w = tokens.shape
        u = torch.rand(b, generator=g).to(tokens.device)
        n_mask = (torch.cos(u * math.pi / 2) * h * w).round().clamp(min=1)
        ranks = torch.rand(b, h * w, generator=g).argsort(dim=1).argsort(dim=1).to(tokens.device)
        masked = (ranks < n_mask[:, None]).reshape(b, h, w)
        inputs = torch.where(masked, torch.full_like(tokens, self.mask_id), tokens)
        micro = torch.tensor([self.size, self.size, 0, 0, 6.0], device=tokens.device, dtype=self.hidden.dtype)
        logits = self.denoiser(
            inputs,
            micro_conds=micro[None].expand(b, -1),
            pooled_text_emb=self.pooled[index],
            encoder_hidden_states=self.hidden[index],
        )  # (B, codebook, h, w)
        labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
        if self.weights is None:
            return F.cross_entropy(logits.float(), labels, ignore_index=-100)
        per_token = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")  # (B, h, w)
        return weighted_mean(per_token, self.weights[index] * masked)


class _StableDiffusionTask:
    """Noise-prediction MSE on VAE latents."""

    def __init__(
        self,
        gen,
        images: list[Image.Image],
        prompts: list[str],
        device: torch.device,
        heatmaps: list[np.ndarray] | None = None,
    ):
        pipe = gen.pipe
        self.denoiser = pipe.unet
        self.scheduler = pipe.scheduler
        with torch.no_grad():
            px = _pixels(images, gen.size, normalize=True).to(device)
            dist = pipe.vae.encode(px).latent_dist
            self.latents = dist.mean * pipe.vae.config.scaling_factor  # the mean: deterministic, cacheable
            self.hidden = pipe.text_encoder(_prompt_ids(pipe, prompts, device))[0]
        self.weights = None if heatmaps is None else heat_weights(heatmaps, tuple(self.latents.shape[-2:])).to(device)

    def loss(self, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        latents = self.latents[index]
        noise = torch.randn(latents.shape, generator=g).to(latents.device, latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(index),), generator=g).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = self.denoiser(noisy, t, encoder_hidden_states=self.hidden[index]).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        if self.weights is None:
            return F.mse_loss(pred.float(), target.float())
        per_cell = (pred.float() - target.float()) ** 2  # (B, C, h, w)
        return weighted_mean(per_cell, self.weights[index][:, None])


@torch.no_grad()
def fixed_loss(task: _AmusedTask | _StableDiffusionTask, n: int, seed: int, repeats: int = 4) -> float:
    """The loss over every example with masks / noise drawn from a fixed seed: comparable across a run."""
    was_training = task.denoiser.training
    task.denoiser.eval()
    g = torch.Generator().manual_seed(seed + 7)
    total = sum(float(task.loss(torch.arange(n), g)) for _ in range(repeats)) / repeats
    task.denoiser.train(was_training)
    return total


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _lora_writer(model: torch.nn.Module):
    def write(folder: Path) -> None:
        atomic_write_bytes(folder / "lora.safetensors", safetensors_bytes(_lora_state(model)))

    return write


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, step: int) -> None:
    """LoRA weights and optimizer tensors + torch RNG (safetensors), step (JSON); the folder appears whole or not at
    all (:func:`training.harness.save_checkpoint`)."""
    _save_checkpoint_folder(path, _lora_writer(model), optimizer, {"step": step})


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> int:
    """Restore the LoRA weights, the optimizer and the torch RNG from ``path``; returns the step."""
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(path / "lora.safetensors")))
    return int(load_trainer_state(path, optimizer)["step"])


def save_adapter(gen, model: torch.nn.Module, folder: Path) -> Path:
    """The adapter in the diffusers LoRA format (``pytorch_lora_weights.safetensors``)."""
    layers = _lora_state(model)
    if gen.backend == "amused":
        from diffusers.loaders import AmusedLoraLoaderMixin

        AmusedLoraLoaderMixin.save_lora_weights(str(folder), transformer_lora_layers=layers)
    else:
        type(gen.pipe).save_lora_weights(str(folder), unet_lora_layers=layers)
    return folder


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def finetune(
    cfg: LoraTrainConfig,
    stop_after: int | None = None,
    *,
    keep_checkpoints: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a finetuning; ``stop_after`` ends early after that many optimizer steps (tests of resume).
    ``keep_checkpoints`` keeps the newest k step checkpoints (None: all); ``progress=False`` hides the progress bar
    (shown only on a terminal anyway). Neither changes the result, so neither is part of the config.

    Returns a summary: step, the loss of every step run now, the fixed-seed loss before and after, seconds,
    examples, and the adapter folder (None until the last step). ``generator="synthetic"`` runs the synthetic
    world's fit instead (:func:`finetune.synthetic.fit_synthetic` with ``prior_strength``).
    """
    from generators import build_generator

    if cfg.generator == "synthetic":
        from finetune.synthetic import SyntheticFitConfig, fit_synthetic

        fitted = fit_synthetic(SyntheticFitConfig(cfg.data_dir, cfg.out_dir, prior_strength=cfg.prior_strength))
        return {"step": cfg.steps, "losses": [], **fitted}
    run = TrainingRun(
        cfg.out_dir,
        cfg,
        config_file="finetune_config.json",
        keep_last=keep_checkpoints,
        progress=progress,
        desc="finetune",
    )
    run.start()
    out = Path(cfg.out_dir)
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision, cfg.grad_accum)
    device = accelerator.device
    gen = build_generator(cfg.generator, device=device)
    images, prompts = load_folder(cfg.data_dir)
    task_cls = _AmusedTask if gen.backend == "amused" else _StableDiffusionTask
    task = task_cls(gen, images, prompts, device, load_heatmaps(cfg.data_dir) if cfg.heatmap_weighting else None)
    model = task.denoiser

    # -- LoRA on the denoiser; everything else frozen
    from peft import LoraConfig

    for module in gen.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model.add_adapter(
        LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(cfg.target_modules)
        )
    )
    optimizer = adamw(model, cfg.lr, weight_decay=0.0)  # the trainable (LoRA) parameters, no decay
    step = 0
    resumed = run.resume(optimizer)
    if resumed is not None:
        from peft.utils import set_peft_model_state_dict

        path, state = resumed
        set_peft_model_state_dict(model, load_file(str(path / "lora.safetensors")))
        step = int(state["step"])
    before = fixed_loss(task, len(images), cfg.seed)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    task.denoiser = model
    losses: list[float] = []

    def train_step(step: int) -> dict[str, Any]:
        total, norm = 0.0, None
        for micro in range(cfg.grad_accum):
            k = step * cfg.grad_accum + micro
            index = batch_index(k, len(images), cfg.batch_size, cfg.seed).to(device)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
            loss, _, norm = accumulate_step(
                accelerator, model, optimizer, lambda i=index, g=g: (task.loss(i, g), None), cfg.max_grad_norm
            )
            total += float(loss.detach()) / cfg.grad_accum
        losses.append(total)
        return {"loss": total} | ({"grad_norm": norm} if norm is not None else {})

    def checkpoint(step: int) -> None:
        run.save(step, _lora_writer(accelerator.unwrap_model(model)), optimizer)

    started = time.perf_counter()
    step = run.loop(
        step,
        cfg.steps,
        train_step,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint=checkpoint,
        stop_after=stop_after,
    )
    task.denoiser = accelerator.unwrap_model(model)
    after = fixed_loss(task, len(images), cfg.seed)
    adapter = None
    if step >= cfg.steps:
        adapter = save_adapter(gen, accelerator.unwrap_model(model), out / ADAPTER_DIR)
    return {
        "step": step,
        "losses": losses,
        "fixed_loss_before": before,
        "fixed_loss_after": after,
        "seconds": time.perf_counter() - started,
        "examples": len(images),
        "adapter": str(adapter) if adapter else None,
    }
