"""Speed and peak memory of LoRA finetuning (``finetune.lora.finetune``) on the tiny presets.

``amused-tiny`` and ``sd-tiny`` (random init), batch 4, rank 4 (alpha 4, the attention projections), on a folder of
8 synthetic-world images (64 px) exported with ``finetune.dataset.export_dataset``. Steps/s is the summary's
``step / seconds``: the optimizer loop and its last checkpoint, without building the generator or encoding the
folder. Every configuration runs in a child process of its own, so its peak memory is its own (CPU: the process's
peak RSS, ``ru_maxrss``, Python and libraries included; CUDA: ``torch.cuda.max_memory_allocated``). Beside each
run, a child that builds the same generator and encodes the same folder but does not train gives the baseline:
the ratio is what finetuning costs on top of holding the model.

Usage: python benchmarks/lora_speed.py [--steps 30] [--device cpu|cuda] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import MARKER, cpu_facts, launch_child, publish  # noqa: E402

PRESETS = ("amused-tiny", "sd-tiny")
BATCH, RANK, IMAGES = 4, 4, 8


def make_folder(folder: Path, n: int) -> str:
    """Export ``n`` synthetic-world images (n / 2 prompts × 2 seeds, with their true scores) as a finetuning folder."""
    from common.records import ImageRecord
    from finetune.dataset import export_dataset
    from generators.base import encode_png
    from generators.synthetic import SyntheticGenerator
    from rahf.data.synthetic import sample_prompts

    records = []
    for g in SyntheticGenerator().generate(sample_prompts(n // 2, seed=0), 2):
        path = folder / "src" / f"{g.id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(g.image))
        rec = ImageRecord.from_generated(g, str(path))
        rec.scores = dict(g.truth["scores"])
        records.append(rec)
    export_dataset(records, str(folder / "data"))
    return str(folder / "data")


def peak_mib(device: str) -> float:
    """Peak memory of this process so far, MiB: CUDA allocations or the CPU process's peak RSS."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------
# Child: one configuration, one process
# ---------------------------------------------------------------------------------------------------------


def run_child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "baseline":  # the generator and the encoded folder, as finetune holds them, no training
        from finetune.lora import _AmusedTask, _StableDiffusionTask, fixed_loss, load_folder
        from generators import build_generator

        gen = build_generator(spec["preset"], device=spec["device"])
        images, prompts = load_folder(spec["data"])
        task_cls = _AmusedTask if gen.backend == "amused" else _StableDiffusionTask
        fixed_loss(task_cls(gen, images, prompts, torch.device(spec["device"])), len(images), seed=0)
        return {**spec, "peak_mib": peak_mib(spec["device"])}
    from finetune.lora import LoraTrainConfig, finetune

    cfg = LoraTrainConfig(
        spec["data"],
        spec["out"],
        generator=spec["preset"],
        rank=RANK,
        alpha=float(RANK),
        steps=spec["steps"],
        batch_size=BATCH,
        checkpoint_every=spec["steps"],
        log_every=spec["steps"],
        device=spec["device"],
    )
    t = time.perf_counter()
    summary = finetune(cfg)
    total = time.perf_counter() - t
    losses = summary["losses"]
    k = max(1, len(losses) // 5)
    return {
        **spec,
        "step": summary["step"],
        "seconds": summary["seconds"],
        "steps_per_s": summary["step"] / summary["seconds"],
        "total_s": total,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "peak_mib": peak_mib(spec["device"]),
    }


# ---------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------


def launch(spec: dict) -> dict:
    return launch_child(__file__, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.child:
        print(MARKER + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-speed-") as tmp:
        data = make_folder(Path(tmp), IMAGES)
        for preset in args.presets.split(","):
            common = {"preset": preset, "data": data, "device": args.device, "threads": args.threads}
            run = launch({**common, "mode": "train", "steps": args.steps, "out": str(Path(tmp) / preset)})
            base = launch({**common, "mode": "baseline"})
            run["baseline_mib"] = base["peak_mib"]
            rows.append(run)
            print(
                f"{preset:12s} {run['steps_per_s']:.2f} steps/s, peak {run['peak_mib']:.0f} MiB "
                f"(without training {base['peak_mib']:.0f} MiB)",
                flush=True,
            )
    facts = cpu_facts()
    device = facts["cpu"] if args.device == "cpu" else torch.cuda.get_device_name(0)
    memory = "peak RSS" if args.device == "cpu" else "max allocated"
    first = rows[0]
    table = [
        f"| {r['preset']} | {r['step']} | {r['seconds']:.1f} | **{r['steps_per_s']:.2f}** | "
        f"{r['steps_per_s'] * BATCH:.1f} | {r['steps_per_s'] / first['steps_per_s']:.2f}× | "
        f"**{r['peak_mib']:.0f}** | {r['baseline_mib']:.0f} | {r['peak_mib'] / r['baseline_mib']:.2f}× | "
        f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |"
        for r in rows
    ]
    lines = [
        f"### LoRA finetuning — {device}, {args.device} fp32, {args.threads} threads, torch {torch.__version__}",
        "",
        f"Batch {BATCH}, rank {RANK} (alpha {RANK}, `to_q`/`to_k`/`to_v`/`to_out.0`), lr 1e-4, {args.steps} steps on "
        f"{IMAGES} synthetic-world images of 64 px; one child process per row. Steps/s: the summary's step / "
        f"seconds (the optimizer loop and the final checkpoint). Memory: {memory}, MiB; the baseline child builds the "
        "generator, encodes the folder and evaluates the fixed loss as finetuning does, but adds no adapter and takes "
        "no step. Loss: mean of the first and last fifth of the steps.",
        "",
        f"| generator | steps | seconds | steps/s | images/s | vs {first['preset']} | peak MiB | baseline MiB | "
        "peak / baseline | loss first → last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *table,
    ]
    body = "\n".join(lines) + "\n"
    publish(
        "lora",
        body,
        {"torch": torch.__version__, "device": args.device, "threads": args.threads, "results": rows},
        not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
