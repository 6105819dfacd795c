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
* The synthetic world: its finetuning step is the maximum-likelihood fit of its flaw rates to the selected images'
  ground truth (:meth:`generators.synthetic.SyntheticGenerator.fit`); saved as an adapter folder too.

A killed run resumes from its last checkpoint (LoRA weights, optimizer state and torch RNG in safetensors, step in
JSON) and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import io
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
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.dataset import read_image_bytes, read_metadata
from rahf.train import pack_optimizer, unpack_optimizer

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
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    prior_strength: float = 2.0  # synthetic world only: pseudo-trials toward the current flaw rates

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        for name in ("rank", "steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")

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


def _pixels(images: list[Image.Image], size: int, normalize: bool) -> torch.Tensor:
    """(N, 3, size, size) float: [0, 1], or [-1, 1] when ``normalize``."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) for im in images])
    x = torch.from_numpy(arr / 255.0).permute(0, 3, 1, 2).contiguous()
    return x * 2 - 1 if normalize else x


def batch_index(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Examples of optimizer step ``step``: consecutive slices of a permutation fixed by (seed, epoch)."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size : (k + 1) * batch_size]


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

    def __init__(self, gen, images: list[Image.Image], prompts: list[str], device: torch.device):
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
        return F.cross_entropy(logits.float(), labels, ignore_index=-100)


class _StableDiffusionTask:
    """Noise-prediction MSE on VAE latents."""

    def __init__(self, gen, images: list[Image.Image], prompts: list[str], device: torch.device):
        pipe = gen.pipe
        self.denoiser = pipe.unet
        self.scheduler = pipe.scheduler
        with torch.no_grad():
            px = _pixels(images, gen.size, normalize=True).to(device)
            dist = pipe.vae.encode(px).latent_dist
            self.latents = dist.mean * pipe.vae.config.scaling_factor  # the mean: deterministic, cacheable
            self.hidden = pipe.text_encoder(_prompt_ids(pipe, prompts, device))[0]

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
        return F.mse_loss(pred.float(), target.float())


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


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, step: int) -> None:
    """LoRA weights and optimizer tensors + torch RNG (safetensors), step (JSON); written to a temp dir, renamed."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_lora_state(model), str(tmp / "lora.safetensors"))
    tensors, scalars = pack_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer": scalars}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> int:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(path / "lora.safetensors")))
    meta = json.loads((path / "trainer_state.json").read_text())
    unpack_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    return int(meta["step"])


def last_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


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


def finetune(cfg: LoraTrainConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) a finetuning; ``stop_after`` ends early after that many optimizer steps (tests of resume).

    Returns a summary: step, first and last logged loss, seconds, examples, and the adapter folder.
    """
    from generators import build_generator

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.generator == "synthetic":
        return _fit_synthetic(cfg, out)
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu)
    device = accelerator.device
    gen = build_generator(cfg.generator, device=device)
    images, prompts = load_folder(cfg.data_dir)
    task_cls = _AmusedTask if gen.backend == "amused" else _StableDiffusionTask
    task = task_cls(gen, images, prompts, device)
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    step = 0
    resume = last_checkpoint(out)
    if resume is not None:
        step = load_checkpoint(resume, model, optimizer)
    before = fixed_loss(task, len(images), cfg.seed)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    task.denoiser = model
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - closed in finally
    started, done_now, losses = time.perf_counter(), 0, []
    try:
        while step < cfg.steps and (stop_after is None or done_now < stop_after):
            total = 0.0
            for micro in range(cfg.grad_accum):
                index = batch_index(step * cfg.grad_accum + micro, len(images), cfg.batch_size, cfg.seed)
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * cfg.grad_accum + micro)
                with accelerator.accumulate(model), accelerator.autocast():
                    loss = task.loss(index.to(device), g)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                total += float(loss.detach()) / cfg.grad_accum
            step += 1
            done_now += 1
            losses.append(total)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write(json.dumps({"step": step, "loss": total}) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(out / "checkpoints" / f"step-{step}", accelerator.unwrap_model(model), optimizer, step)
    finally:
        log.close()
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


def _fit_synthetic(cfg: LoraTrainConfig, out: Path) -> dict[str, Any]:
    """The synthetic world's finetuning: the MLE flaw rates of the selected images, saved as an adapter."""
    from generators.synthetic import SyntheticGenerator, ground_truth

    started = time.perf_counter()
    images, _ = load_folder(cfg.data_dir)
    base = SyntheticGenerator()
    fitted = base.fit([ground_truth(im) for im in images], prior_strength=cfg.prior_strength)
    fitted.save_adapter(out / ADAPTER_DIR)
    return {
        "step": cfg.steps,
        "losses": [],
        "seconds": time.perf_counter() - started,
        "examples": len(images),
        "adapter": str(out / ADAPTER_DIR),
        "flaws": fitted.flaws.to_dict(),
    }
