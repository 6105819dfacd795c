"""Score-guided sampling for Stable Diffusion (the paper's second use of RAHF scores, Fig. 8c-d).

At every denoising step the predicted clean latent x̂₀ is decoded by the VAE, RAHF scores the image, and the
gradient of that score with respect to the current latent steers the noise prediction, in the classifier-guidance
form::

    ε̃ = ε − w · σ_t · ∇_{x_t} score(decode(x̂₀(x_t, ε)))

with σ_t = √(1 − ᾱ_t) for ᾱ-parametrised schedulers (DDIM, DDPM, PNDM, ...) and x̂₀ = (x_t − σ_t ε) / √ᾱ_t; for
σ-parametrised schedulers (Euler) x̂₀ = x_t − σ_t ε and the same correction applies in σ units. ``weight = 0``
gives the unguided sampler exactly. One ``torch.Generator`` per image; the score gradient of each image depends on
that image only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from generators.base import GeneratedImage, resolve_seeds


@dataclass
class GuidanceConfig:
    """Every knob of score guidance."""

    score: str = "aesthetics"  # the RAHF score to raise
    weight: float = 50.0  # w: guidance strength (0 = unguided)
    start_fraction: float = 0.0  # guide only after this fraction of the steps (early steps are mostly noise)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if not 0.0 <= self.start_fraction < 1.0:
            raise ValueError(f"start_fraction must lie in [0, 1), got {self.start_fraction}")


def _sigma_alpha(scheduler, t: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(σ_t, √ᾱ_t) for ᾱ schedulers; (σ_t, None) for σ (Euler-type) schedulers."""
    if getattr(scheduler, "sigmas", None) is not None and scheduler.init_noise_sigma != 1.0:
        return scheduler.sigmas[i], None
    abar = scheduler.alphas_cumprod[int(t)]
    return (1 - abar).sqrt(), abar.sqrt()


def guided_generate(
    gen,
    scorer,
    prompts: Sequence[str],
    num_images_per_prompt: int = 1,
    seeds: Sequence[int] | None = None,
    config: GuidanceConfig | None = None,
) -> list[GeneratedImage]:
    """Score-guided Stable Diffusion samples.

    Args:
        gen: a :class:`generators.stable_diffusion.StableDiffusionGenerator` (its steps and CFG scale are used).
        scorer: a :class:`rahf.scorer.RAHFScorer` on the same device.
        prompts, num_images_per_prompt, seeds: as in ``Generator.generate``.
    """
    config = config or GuidanceConfig()
    if gen.backend != "stable-diffusion":
        raise ValueError(f"score guidance needs a Stable Diffusion generator, got {gen.backend!r}")
    seeds = resolve_seeds(len(prompts), num_images_per_prompt, seeds)
    flat = [prompts[i // num_images_per_prompt] for i in range(len(seeds))]
    images = [_one(gen, scorer, p, s, config) for p, s in zip(flat, seeds)]
    params = {
        **gen.params("text-to-image"),
        "guidance": {"score": config.score, "weight": config.weight, "start_fraction": config.start_fraction},
    }
    return [GeneratedImage(im, p, s, gen.identity, params) for im, p, s in zip(images, flat, seeds)]


def _one(gen, scorer, prompt: str, seed: int, config: GuidanceConfig):
    pipe, device = gen.pipe, gen.device
    steps = int(gen.call_kwargs.get("num_inference_steps", 25))
    cfg_scale = float(gen.call_kwargs.get("guidance_scale", 7.5))
    do_cfg = cfg_scale > 1.0
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, device, 1, do_cfg)
    emb = torch.cat([uncond, cond]) if do_cfg else cond
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # own state: safe beside the pipeline
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator(device=device).manual_seed(int(seed))
    c, f = pipe.unet.config.in_channels, pipe.vae_scale_factor
    latents = torch.randn((1, c, gen.size // f, gen.size // f), generator=g, device=device, dtype=emb.dtype)
    latents = latents * scheduler.init_noise_sigma
    scale = pipe.vae.config.scaling_factor
    first_guided = int(config.start_fraction * len(scheduler.timesteps))
    for i, t in enumerate(scheduler.timesteps):
        guide = config.weight > 0 and i >= first_guided
        x = latents.detach().requires_grad_(guide)
        with torch.set_grad_enabled(guide):
            inp = scheduler.scale_model_input(torch.cat([x] * 2) if do_cfg else x, t)
            eps = pipe.unet(inp, t, encoder_hidden_states=emb).sample
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            if guide:
                sigma, sqrt_abar = _sigma_alpha(scheduler, t, i)
                x0 = (x - sigma * eps) / sqrt_abar if sqrt_abar is not None else x - sigma * eps
                image = (pipe.vae.decode(x0 / scale).sample / 2 + 0.5).clamp(0, 1)
                value = scorer.score_tensor([prompt], image, config.score).sum()
                (grad,) = torch.autograd.grad(value, x)
                eps = eps.detach() - config.weight * sigma * grad
        latents = scheduler.step(eps.detach(), t, latents.detach()).prev_sample
    with torch.no_grad():
        image = (pipe.vae.decode(latents / scale).sample / 2 + 0.5).clamp(0, 1)
    return pipe.image_processor.numpy_to_pil(image.permute(0, 2, 3, 1).float().cpu().numpy())[0]
