"""Stable Diffusion behind the generator interface: text-to-image and inpainting.

Presets: ``sd-tiny`` (built offline from configs at random init: a 4-block VAE, so 64 px → 8×8 latents as in the
real model's 8-pixel cells, a 2-level UNet, a 2-layer CLIP text encoder and the offline byte-level tokenizer),
``sd-turbo`` (``stabilityai/sd-turbo``, 1–4 steps, guidance 0) and any hub id or local folder. Inpainting uses a
dedicated inpainting checkpoint when given one (``stable-diffusion-v1-5/stable-diffusion-inpainting``, a 9-channel
UNet); otherwise the text-to-image UNet through ``StableDiffusionInpaintPipeline``'s 4-channel path.

Images are generated in batches with one ``torch.Generator`` per image (the initial noise of image i depends only on
its seed); batched and single runs agree to float rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel

from generators._diffusers import DiffusersGenerator, resolve_dtype
from generators.clip_tokenizer import build_offline_clip_tokenizer, tiny_text_config

REAL_IDS = {
    "sd-turbo": "stabilityai/sd-turbo",
    "sd-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}
CALLS = {
    "sd-tiny": {"num_inference_steps": 4, "guidance_scale": 3.0},
    "stabilityai/sd-turbo": {"num_inference_steps": 2, "guidance_scale": 0.0},
}
DEFAULT_CALL = {"num_inference_steps": 25, "guidance_scale": 7.5}
_NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """Every Stable Diffusion component at random init, seeded; 64 px images, 8×8×4 latents."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(tiny_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": build_offline_clip_tokenizer(77),
        "scheduler": scheduler,
    }


def _pipelines(components: dict[str, Any], inpaint_components: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Text-to-image and inpainting pipelines; without a dedicated inpainting model they share every module but
    the scheduler."""
    parts = {k: v for k, v in components.items() if k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    pipe = StableDiffusionPipeline(**parts, **_NO_SAFETY)
    if inpaint_components is None:
        inpaint_components = {**parts, "scheduler": type(parts["scheduler"]).from_config(parts["scheduler"].config)}
    inpaint_parts = {k: v for k, v in inpaint_components.items() if k in parts}
    return pipe, StableDiffusionInpaintPipeline(**inpaint_parts, **_NO_SAFETY)


class StableDiffusionGenerator(DiffusersGenerator):
    """Stable Diffusion text-to-image and inpainting; build with :meth:`from_preset` or :meth:`from_pretrained`."""

    backend = "stable-diffusion"

    @classmethod
    def from_preset(cls, name: str = "sd-tiny", *, seed: int = 0, **kwargs: Any) -> StableDiffusionGenerator:
        """``sd-tiny`` offline at random init, or ``sd-turbo`` (hub weights)."""
        if name == "sd-tiny":
            pipe, inpaint = _pipelines(tiny_components(seed))
            kwargs.setdefault("call_kwargs", dict(CALLS["sd-tiny"]))
            return cls(pipe, inpaint, f"sd-tiny@seed{seed}", **kwargs)
        if name in REAL_IDS:
            return cls.from_pretrained(REAL_IDS[name], **kwargs)
        raise ValueError(f"unknown Stable Diffusion preset {name!r}; choose sd-tiny or one of {sorted(REAL_IDS)}")

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        inpaint_model: str | Path | None = None,
        revision: str | None = None,
        dtype: str = "fp32",
        **kwargs: Any,
    ) -> StableDiffusionGenerator:
        """Load from a hub id or local folder; ``inpaint_model`` names a dedicated inpainting checkpoint."""
        torch_dtype = resolve_dtype(dtype)
        loaded = StableDiffusionPipeline.from_pretrained(str(model), revision=revision, dtype=torch_dtype)
        inpaint_parts = None
        if inpaint_model is not None:
            ip = StableDiffusionInpaintPipeline.from_pretrained(str(inpaint_model), dtype=torch_dtype)
            inpaint_parts = dict(ip.components)
        pipe, inpaint = _pipelines(dict(loaded.components), inpaint_parts)
        kwargs.setdefault("call_kwargs", dict(CALLS.get(str(model), DEFAULT_CALL)))
        return cls(pipe, inpaint, str(model), revision=revision, dtype=dtype, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        self.pipe.save_pretrained(str(folder))

    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor

    @property
    def cell_size(self) -> int:  # one latent cell, in pixels
        return int(self.pipe.vae_scale_factor)

    def _lora_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        return self.pipe.lora_state_dict(str(folder))[0]

    def _lora_targets(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder}

    def _load_lora(self, folder: Path) -> None:
        self.pipe.load_lora_weights(str(folder))  # the inpainting pipeline shares the UNet unless it has its own
        if self.inpaint_pipe.unet is not self.pipe.unet:
            self.inpaint_pipe.load_lora_weights(str(folder))

    def _text_to_image(self, prompts: list[str], generators: list[torch.Generator]) -> list[Image.Image]:
        res = self.pipe(prompt=prompts, height=self.size, width=self.size, generator=generators, **self.call_kwargs)
        return list(res.images)

    def _inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, generator: torch.Generator) -> Image.Image:
        res = self.inpaint_pipe(
            prompt=prompt,
            image=image,
            mask_image=mask,
            height=image.height // 8 * 8,
            width=image.width // 8 * 8,
            generator=generator,
            **self.call_kwargs,
        )
        return res.images[0]
