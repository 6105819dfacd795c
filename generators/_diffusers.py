"""What the diffusers backends share: device and dtype, one ``torch.Generator`` per image, LoRA identity, and the
paste-back that keeps pixels outside an inpainting mask exactly as they were (DESIGN §3–4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from generators.base import (
    GeneratedImage,
    Generator,
    GeneratorIdentity,
    check_inpaint_inputs,
    content_hash,
    content_hash_image,
    resolve_seeds,
)
from rahf.scorer import resolve_dtype  # one dtype vocabulary: fp32, bf16, fp16


def paste_back(original: Image.Image, candidate: Image.Image, mask: Image.Image) -> Image.Image:
    """``candidate`` where ``mask`` > 0 (blended by mask/255), ``original`` bit for bit where ``mask`` == 0."""
    if candidate.size != original.size:
        candidate = candidate.resize(original.size, Image.BICUBIC)
    a = np.asarray(mask, np.float32)[..., None] / 255.0
    old = np.asarray(original, np.float32)
    new = np.asarray(candidate.convert("RGB"), np.float32)
    out = np.where(a > 0, old * (1 - a) + new * a, old)
    return Image.fromarray(np.rint(out).astype(np.uint8))


class DiffusersGenerator(Generator):
    """Common body of the aMUSEd and Stable Diffusion backends; subclasses build ``self.pipe`` (text-to-image) and
    ``self.inpaint_pipe`` (sharing every component except the scheduler) and say how to call them."""

    backend: str = ""

    def __init__(
        self,
        pipe: Any,
        inpaint_pipe: Any,
        model: str,
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        call_kwargs: dict[str, Any] | None = None,
        size: int | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.pipe = pipe.to(self.device)
        self.inpaint_pipe = inpaint_pipe.to(self.device)
        if self.dtype != torch.float32:  # tiny presets are built in fp32; loaded weights arrive in their dtype
            self.pipe.to(dtype=self.dtype)
            self.inpaint_pipe.to(dtype=self.dtype)
        for p in (self.pipe, self.inpaint_pipe):
            p.set_progress_bar_config(disable=True)
        self.call_kwargs = dict(call_kwargs or {})
        self.size = size or self.default_size()
        self.model = model
        self.revision = revision
        self.adapter_hash: str | None = None
        self.identity = GeneratorIdentity(self.backend, model, revision, None)

    # -- subclass hooks ----------------------------------------------------------------------------------------

    def default_size(self) -> int:
        raise NotImplementedError

    def _load_lora(self, folder: Path) -> None:
        raise NotImplementedError

    def _text_to_image(self, prompts: list[str], generators: list[torch.Generator]) -> list[Image.Image]:
        raise NotImplementedError

    def _inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, generator: torch.Generator) -> Image.Image:
        raise NotImplementedError

    # -- the interface -----------------------------------------------------------------------------------------

    def load_lora(self, folder: str | Path) -> DiffusersGenerator:
        """Load a LoRA adapter (diffusers format, ``pytorch_lora_weights.safetensors``) on top; its content hash
        enters the identity. One adapter at a time."""
        folder = Path(folder)
        if not (folder / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(f"{folder} holds no pytorch_lora_weights.safetensors")
        if self.adapter_hash is not None:
            raise ValueError("an adapter is already loaded; build a fresh generator for another one")
        self._load_lora(folder)
        self.adapter_hash = content_hash(folder / "pytorch_lora_weights.safetensors")
        self.identity = GeneratorIdentity(self.backend, self.model, self.revision, self.adapter_hash)
        return self

    def params(self, task: str) -> dict[str, Any]:
        return {"task": task, "size": self.size, "dtype": str(self.dtype).removeprefix("torch."), **self.call_kwargs}

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def generate(
        self, prompts: Sequence[str], num_images_per_prompt: int = 8, seeds: Sequence[int] | None = None
    ) -> list[GeneratedImage]:
        prompts = list(prompts)
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("every prompt must be a non-empty string")
        seeds = resolve_seeds(len(prompts), num_images_per_prompt, seeds)
        flat = [prompts[i // num_images_per_prompt] for i in range(len(seeds))]
        images = self._text_to_image(flat, [self._generator(s) for s in seeds])
        params = self.params("text-to-image")
        return [GeneratedImage(im, p, s, self.identity, params) for im, p, s in zip(images, flat, seeds)]

    def inpaint(
        self, image: Image.Image, mask: Image.Image, prompt: str, n: int, seeds: Sequence[int] | None = None
    ) -> list[GeneratedImage]:
        seeds = check_inpaint_inputs(image, mask, n, seeds)
        params = {**self.params("inpaint"), "image": content_hash_image(image), "mask": content_hash_image(mask)}
        out = []
        for s in seeds:
            cand = self._inpaint(image, mask, prompt, self._generator(s))
            out.append(GeneratedImage(paste_back(image, cand, mask), prompt, s, self.identity, params))
        return out
