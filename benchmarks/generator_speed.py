"""Speed of the tiny generator presets: text-to-image and inpainting images/s, side by side with the synthetic world.

Three backends, each built once in this process: the synthetic world (``SyntheticGenerator()``, numpy only, always
on the CPU), ``amused-tiny`` and ``sd-tiny`` (random init, their preset call: 4 steps, 64 px). ``generate`` makes
one prompt × 8 seeds; ``inpaint`` makes 4 candidates for a 24×24 box in the middle of a 64 px image the same
backend generated (the synthetic world needs its own image: its scene travels in the image's text chunk). Each
call is made once as a warm-up, then ``--repeats`` times; images/s come from the median call. The ratio columns
compare each backend with the synthetic world in the same run, and an inpainted candidate with a generated image.

Usage: python benchmarks/generator_speed.py [--repeats 5] [--device cpu|cuda] [--dtype fp32] [--threads 2]
       [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import cpu_facts, publish  # noqa: E402

PROMPT = "two red circles at the left and a blue square at the bottom"
BATCH = 8  # one prompt × 8 seeds
CANDIDATES = 4  # inpainting candidates per call
BOX = 24  # side of the square inpainting mask, pixels


def build(name: str, device: str, dtype: str):
    """The generator of a preset name (the synthetic world ignores device and dtype)."""
    if name == "synthetic":
        from generators.synthetic import SyntheticGenerator

        return SyntheticGenerator()
    if name == "amused-tiny":
        from generators.amused import AmusedGenerator

        return AmusedGenerator.from_preset("amused-tiny", device=device, dtype=dtype)
    from generators.stable_diffusion import StableDiffusionGenerator

    return StableDiffusionGenerator.from_preset("sd-tiny", device=device, dtype=dtype)


def box_mask(size: int, box: int) -> Image.Image:
    """(size, size) mode-L mask, 255 in a centred box × box square, 0 elsewhere."""
    mask = Image.new("L", (size, size), 0)
    lo = (size - box) // 2
    mask.paste(255, (lo, lo, lo + box, lo + box))
    return mask


def median_seconds(fn, repeats: int, device: str) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""

    def timed() -> float:
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed()
    return statistics.median(timed() for _ in range(repeats))


def measure(name: str, args, batch: int = BATCH, candidates: int = CANDIDATES) -> dict:
    """Build ``name`` and time ``generate`` (one prompt × ``batch`` seeds) and ``inpaint`` (``candidates``);
    ``args`` holds device, dtype and repeats."""
    t = time.perf_counter()
    gen = build(name, args.device, args.dtype)
    build_s = time.perf_counter() - t
    seeds = list(range(batch))
    images = gen.generate([PROMPT], batch, seeds=seeds)
    gen_s = median_seconds(lambda: gen.generate([PROMPT], batch, seeds=seeds), args.repeats, args.device)
    image = images[0].image  # the generated image object itself (the synthetic world reads its scene)
    mask = box_mask(image.width, BOX)
    inpaint_s = median_seconds(
        lambda: gen.inpaint(image, mask, PROMPT, candidates, seeds=list(range(candidates))), args.repeats, args.device
    )
    return {
        "generator": name,
        "size": image.width,
        "call": dict(getattr(gen, "call_kwargs", {})),
        "build_s": build_s,
        "generate_s": gen_s,
        "generate_ips": batch / gen_s,
        "inpaint_s": inpaint_s,
        "inpaint_ips": candidates / inpaint_s,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generators", default="synthetic,amused-tiny,sd-tiny")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    results = []
    for name in args.generators.split(","):
        r = measure(name, args)
        results.append(r)
        print(
            f"{name:12s} generate {r['generate_ips']:8.1f} images/s, inpaint {r['inpaint_ips']:8.1f} candidates/s",
            flush=True,
        )
    base = {r["generator"]: r for r in results}.get("synthetic")
    facts = cpu_facts()
    rows = []
    for r in results:
        steps = r["call"].get("num_inference_steps", "–")
        vs_gen = f"{r['generate_ips'] / base['generate_ips']:.3f}×" if base else "–"
        vs_inp = f"{r['inpaint_ips'] / base['inpaint_ips']:.3f}×" if base else "–"
        rows.append(
            f"| {r['generator']} | {steps} | {r['size']} px | {r['build_s']:.1f} | **{r['generate_ips']:.1f}** | "
            f"{vs_gen} | **{r['inpaint_ips']:.1f}** | {vs_inp} | {r['generate_ips'] / r['inpaint_ips']:.2f}× |"
        )
    lines = [
        f"### tiny generators — {facts['cpu']}, {args.device} {args.dtype}, {args.threads} threads, "
        f"torch {torch.__version__}",
        "",
        f"`generate`: one prompt × {BATCH} seeds per call; `inpaint`: {CANDIDATES} candidates for a {BOX}×{BOX} box "
        f"in the middle of the backend's own generated image. Median of {args.repeats} calls after a warm-up call. "
        "Diffusion presets at random init with their preset call (guidance on: the denoiser sees each image twice "
        "a step); the synthetic world renders with numpy on the CPU whatever the device. Ratios: this row's "
        "images/s over the synthetic world's, and the time of one inpainted candidate over one generated image.",
        "",
        "| generator | steps | image | build s | generate images/s | vs synthetic | inpaint candidates/s | "
        "vs synthetic | inpaint / generate, s per image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    body = "\n".join(lines) + "\n"
    publish(
        "generators",
        body,
        {
            "torch": torch.__version__,
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "results": results,
        },
        not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
