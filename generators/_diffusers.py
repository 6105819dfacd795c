"""What the diffusers backends share: device and dtype, one ``torch.Generator`` per image, LoRA identity, and the
paste-back that keeps pixels outside an inpainting mask exactly as they were."""

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
from rahf.oom import run_in_batches  # halves a batch that runs out of GPU memory
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


_LORA_PARTS = {".lora_A.": "down", ".lora.down.": "down", ".lora_B.": "up", ".lora.up.": "up"}
_LORA_PARTS[".lora_magnitude_vector"] = "magnitude"


def _lora_layer(key: str) -> tuple[str, str] | None:
    """(module path, factor) of a LoRA state-dict key, e.g. ``("unet.a.to_q", "down")``; None for other keys."""
    for marker, factor in _LORA_PARTS.items():
        if marker in key:
            return key[: key.index(marker)], factor
    return None


def _shape_error(module: torch.nn.Module, part: str, shape: tuple[int, ...]) -> str | None:
    """Why a LoRA factor of ``shape`` cannot sit on ``module`` (a Linear or Conv2d), or None when it fits."""
    if isinstance(module, torch.nn.Linear):
        n_in, n_out = module.in_features, module.out_features
    elif isinstance(module, torch.nn.Conv2d):
        n_in, n_out = module.in_channels, module.out_channels
    else:
        return None  # other layer kinds: the name match is all we check
    if part == "down" and len(shape) >= 2 and shape[1] != n_in:
        return f"its down factor has shape {list(shape)} but the layer takes {n_in} inputs"
    if part == "up" and shape and shape[0] != n_out:
        return f"its up factor has shape {list(shape)} but the layer gives {n_out} outputs"
    return None


def check_adapter_fits(
    state_dict: dict[str, torch.Tensor], targets: dict[str, torch.nn.Module], adapter: str, generator: str
) -> int:
    """The number of LoRA layers of ``state_dict`` that fit ``targets`` (prefix -> module, e.g. ``{"unet": unet}``).

    Raises ``ValueError`` naming the adapter and the generator when any layer names a module the generator does not
    have (or a layer of another shape), or when no layer fits at all: diffusers would only warn and load nothing.
    """
    layers: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for key, value in state_dict.items():
        found = _lora_layer(key)
        if found is not None:
            layers.setdefault(found[0], []).append((found[1], tuple(value.shape)))
    if not layers:
        raise ValueError(f"adapter {adapter} does not fit generator {generator}: it holds no LoRA weights")
    missing, wrong = [], []
    for path, parts in sorted(layers.items()):
        prefix, _, inner = path.partition(".")
        try:
            module = targets[prefix].get_submodule(inner)
        except (KeyError, AttributeError):
            missing.append(path)
            continue
        why = next((e for part, shape in parts if (e := _shape_error(module, part, shape))), None)
        if why:
            wrong.append(f"{path}: {why}")
    fits = len(layers) - len(missing) - len(wrong)
    if missing or wrong:
        detail = f"{len(missing)} name no module of it (e.g. {missing[0]})" if missing else ""
        if wrong:
            detail += ("; " if detail else "") + f"{len(wrong)} have the wrong shape (e.g. {wrong[0]})"
        raise ValueError(
            f"adapter {adapter} does not fit generator {generator} (its models: {', '.join(sorted(targets))}): "
            f"{fits} of {len(layers)} LoRA layers fit; {detail}"
        )
    return fits


def count_lora_layers(modules: dict[str, torch.nn.Module]) -> int:
    """How many peft LoRA layers sit in ``modules`` (0 before any adapter is loaded)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for module in modules.values() for m in module.modules())


class DiffusersGenerator(Generator):
    """Common body of the aMUSEd and Stable Diffusion backends; subclasses build ``self.pipe`` (text-to-image) and
    ``self.inpaint_pipe`` (sharing every component except the scheduler) and say how to call them.

    Text-to-image runs in batches of ``batch_size`` images; a batch that runs out of GPU memory is retried at half
    the size with freshly seeded generators (so every image is the one its seed gives at that size), and
    ``batch_size`` then holds the size generation settled on (``requested_batch_size`` the one asked for)."""

    backend: str = ""
    #: images per pipeline call (the default; ``batch_size=`` of the constructor overrides it)
    batch_size: int = 8

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
        batch_size: int | None = None,
    ):
        batch_size = type(self).batch_size if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = self.requested_batch_size = batch_size
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

    def _lora_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        """The adapter's weights with keys as diffusers will load them (``unet.``/``transformer.`` prefixes)."""
        raise NotImplementedError

    def _lora_targets(self) -> dict[str, torch.nn.Module]:
        """Key prefix -> the model an adapter's layers of that prefix go into."""
        raise NotImplementedError

    def _text_to_image(self, prompts: list[str], generators: list[torch.Generator]) -> list[Image.Image]:
        """One image per prompt, in one batch (``generate`` splits the work into batches)."""
        raise NotImplementedError

    def _inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, generator: torch.Generator) -> Image.Image:
        raise NotImplementedError

    # -- the interface -----------------------------------------------------------------------------------------

    def load_lora(self, folder: str | Path) -> DiffusersGenerator:
        """Load a LoRA adapter (diffusers format, ``pytorch_lora_weights.safetensors``) on top; its content hash
        enters the identity. One adapter at a time. An adapter made for another model (layer names or shapes that
        this generator does not have) raises ``ValueError`` before anything is loaded."""
        folder = Path(folder)
        if not (folder / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(f"{folder} holds no pytorch_lora_weights.safetensors")
        if self.adapter_hash is not None:
            raise ValueError("an adapter is already loaded; build a fresh generator for another one")
        targets = self._lora_targets()
        check_adapter_fits(self._lora_state_dict(folder), targets, str(folder), self.identity.label())
        before = count_lora_layers(targets)
        self._load_lora(folder)
        if count_lora_layers(targets) == before:  # the check above should make this impossible; never load nothing
            raise ValueError(f"adapter {folder} loaded no LoRA layer into generator {self.identity.label()}")
        self.adapter_hash = content_hash(folder / "pytorch_lora_weights.safetensors")
        self.identity = GeneratorIdentity(self.backend, self.model, self.revision, self.adapter_hash)
        return self

    def params(self, task: str) -> dict[str, Any]:
        return {"task": task, "size": self.size, "dtype": str(self.dtype).removeprefix("torch."), **self.call_kwargs}

    def _settle(self, batch_size: int) -> None:
        self.batch_size = batch_size

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
        images: list[Image.Image] = [None] * len(seeds)  # type: ignore[list-item]

        def run(start: int, stop: int) -> None:
            # new generators on every try: a batch that failed has already drawn noise from the ones it was given
            made = self._text_to_image(flat[start:stop], [self._generator(s) for s in seeds[start:stop]])
            if len(made) != stop - start:
                raise RuntimeError(f"the pipeline returned {len(made)} images for {stop - start} prompts")
            images[start:stop] = made

        run_in_batches(run, len(seeds), self.batch_size, device=self.device, what="generation", on_settle=self._settle)
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
