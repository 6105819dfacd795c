"""aMUSEd (masked image-token transformer) behind the generator interface: text-to-image and inpainting.

Presets: ``amused-tiny`` (built offline from configs at random init: a 3-block VQ-GAN, so 64 px → 16×16 tokens, a
1-layer U-ViT, a 2-layer CLIP text encoder and the offline byte-level tokenizer) and the real checkpoints
``amused/amused-256`` and ``amused/amused-512`` (12 steps, guidance 10), loaded by hub id or local folder.

aMUSEd lives in ``diffusers.pipelines.deprecated`` since 2026 and is kept working by pinning diffusers (0.42.1 in
pyproject) and by our tests. Its scheduler samples tokens with one ``torch.Generator`` for a whole batch, so to keep
"the same seed gives the same image whatever the batch" each image is sampled on its own. Its inpainting pipeline
binarises the mask on the token grid; the repair step dilates masks to at least one token cell (``cell_size``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from generators._diffusers import DiffusersGenerator, resolve_dtype
from generators.clip_tokenizer import build_offline_clip_tokenizer, tiny_text_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import AmusedInpaintPipeline, AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from diffusers.loaders import AmusedLoraLoaderMixin
from transformers import CLIPTextModelWithProjection

REAL_IDS = {"amused-256": "amused/amused-256", "amused-512": "amused/amused-512"}
DEFAULT_CALL = {"num_inference_steps": 12, "guidance_scale": 10.0}


def tiny_components(seed: int = 0, codebook_size: int = 64) -> dict[str, Any]:
    """Every aMUSEd component at random init, seeded; 64 px images, 16×16 tokens."""
    torch.manual_seed(seed)
    vqvae = VQModel(
        act_fn="silu",
        block_out_channels=[16, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=codebook_size,
        sample_size=64,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=False,
    )
    transformer = UVit2DModel(
        hidden_size=32,
        use_bias=False,
        hidden_dropout=0.0,
        cond_embed_dim=32,  # == the text encoder's projection_dim
        micro_cond_encode_dim=2,
        micro_cond_embed_dim=10,  # == 5 * micro_cond_encode_dim
        encoder_hidden_size=32,  # == the text encoder's hidden_size
        vocab_size=codebook_size + 1,  # the last id is the mask token
        codebook_size=codebook_size,
        in_channels=16,
        block_out_channels=32,
        num_res_blocks=1,
        downsample=True,
        upsample=True,
        block_num_heads=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        attention_dropout=0.0,
        intermediate_size=64,
        layer_norm_eps=1e-6,
        ln_elementwise_affine=True,
        sample_size=16,
    )
    text_encoder = CLIPTextModelWithProjection(tiny_text_config(projection_dim=32))  # cond_embed_dim
    return {
        "vqvae": vqvae,
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": build_offline_clip_tokenizer(77),
        "scheduler": AmusedScheduler(mask_token_id=codebook_size),
    }


def _pipelines(components: dict[str, Any]) -> tuple[Any, Any]:
    """Text-to-image and inpainting pipelines over the same modules, each with its own scheduler (building the
    inpainting pipeline changes its scheduler's masking schedule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = AmusedPipeline(**components)
        inpaint_components = {**components, "scheduler": AmusedScheduler.from_config(components["scheduler"].config)}
        return pipe, AmusedInpaintPipeline(**inpaint_components)


class AmusedGenerator(DiffusersGenerator):
    """aMUSEd text-to-image and inpainting; build with :meth:`from_preset` or :meth:`from_pretrained`."""

    backend = "amused"
    batch_size = 1  # the scheduler samples a batch with one generator: images are made one at a time

    @classmethod
    def from_preset(cls, name: str = "amused-tiny", *, seed: int = 0, **kwargs: Any) -> AmusedGenerator:
        """``amused-tiny`` offline at random init, or ``amused-256`` / ``amused-512`` (hub weights)."""
        if name == "amused-tiny":
            pipe, inpaint = _pipelines(tiny_components(seed))
            kwargs.setdefault("call_kwargs", {"num_inference_steps": 4, "guidance_scale": 2.0})
            return cls(pipe, inpaint, f"amused-tiny@seed{seed}", **kwargs)
        if name in REAL_IDS:
            return cls.from_pretrained(REAL_IDS[name], **kwargs)
        raise ValueError(f"unknown aMUSEd preset {name!r}; choose amused-tiny or one of {sorted(REAL_IDS)}")

    @classmethod
    def from_pretrained(
        cls, model: str | Path, *, revision: str | None = None, dtype: str = "fp32", **kwargs: Any
    ) -> AmusedGenerator:
        """Load a saved pipeline from a hub id or a local folder (``save_pretrained`` layout)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AmusedPipeline.from_pretrained(str(model), revision=revision, dtype=resolve_dtype(dtype))
        pipe, inpaint = _pipelines(dict(loaded.components))
        kwargs.setdefault("call_kwargs", dict(DEFAULT_CALL))
        return cls(pipe, inpaint, str(model), revision=revision, dtype=dtype, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        self.pipe.save_pretrained(str(folder))

    def default_size(self) -> int:
        return int(self.pipe.transformer.config.sample_size) * self.pipe.vae_scale_factor

    @property
    def cell_size(self) -> int:  # one token of the VQ grid, in pixels
        return int(self.pipe.vae_scale_factor)

    def _lora_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        return AmusedLoraLoaderMixin.lora_state_dict(str(folder))[0]

    def _lora_targets(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.pipe.transformer}

    def _load_lora(self, folder: Path) -> None:
        state_dict, alphas = AmusedLoraLoaderMixin.lora_state_dict(str(folder))
        AmusedLoraLoaderMixin.load_lora_into_transformer(state_dict, alphas, self.pipe.transformer)

    def _text_to_image(self, prompts: list[str], generators: list[torch.Generator]) -> list[Image.Image]:
        out = []
        for prompt, g in zip(prompts, generators):  # one image per call: the scheduler has one generator
            res = self.pipe(prompt=prompt, height=self.size, width=self.size, generator=g, **self.call_kwargs)
            out.append(res.images[0])
        return out

    def _inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, generator: torch.Generator) -> Image.Image:
        res = self.inpaint_pipe(prompt=prompt, image=image, mask_image=mask, generator=generator, **self.call_kwargs)
        return res.images[0]
