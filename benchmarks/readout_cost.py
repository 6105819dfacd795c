"""What the read-out costs at scoring time: the demo model with and without it, side by side, as ratios.

The read-out (``rahf/readout.py``) reads the heatmaps, so a scores-only call with it also runs the map heads; the
full call (scores, both maps, keywords) only adds the read-out's arithmetic. Both scorers load the shipped demo
model (``rahf/demo_model``) and score the same synthetic images in the same process, alternating, best of
``--repeats`` per setting.

Usage: python benchmarks/readout_cost.py [--images 64] [--batch-size 16] [--repeats 3] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import cpu_facts, write_section  # noqa: E402


def timings(images: int, batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """{"scores only" | "everything": {"heads": images/s, "read-out": images/s}} on the shipped demo model."""
    import numpy as np

    from rahf.data.synthetic import render
    from rahf.scorer import RAHFScorer
    from rahf.zoo import SHIPPED_DIR

    samples = [render(np.random.default_rng([0, i]), size=64) for i in range(images)]
    prompts, pictures = [s.prompt for s in samples], [s.image for s in samples]
    scorers = {
        "heads": RAHFScorer.from_pretrained(SHIPPED_DIR, batch_size=batch_size, score_readout=False),
        "read-out": RAHFScorer.from_pretrained(SHIPPED_DIR, batch_size=batch_size),
    }
    if scorers["read-out"].score_readout is None:
        raise SystemExit(f"{SHIPPED_DIR} has no read-out to time")
    calls = {"scores only": {"scores_only": True}, "everything": {}}
    best = {c: {s: float("inf") for s in scorers} for c in calls}
    for _ in range(repeats):
        for call, kwargs in calls.items():
            for name, scorer in scorers.items():
                start = time.perf_counter()
                scorer.score(prompts, pictures, **kwargs)
                best[call][name] = min(best[call][name], time.perf_counter() - start)
    return {c: {s: images / t for s, t in row.items()} for c, row in best.items()}


def markdown(rates: dict[str, dict[str, float]], images: int, batch_size: int, threads: int) -> str:
    lines = [
        f"Demo model (`rahf-tiny-p4`), {images} synthetic 64 px images, batch {batch_size}, {threads} torch "
        f"threads, CPU fp32 ({cpu_facts()['cpu']}); images per second, best of the repeats:",
        "",
        "| call | heads | with the read-out | read-out / heads |",
        "|---|---:|---:|---:|",
    ]
    for call, row in rates.items():
        lines.append(f"| {call} | {row['heads']:.1f} | {row['read-out']:.1f} | {row['read-out'] / row['heads']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="synthetic images scored per call")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per setting (the best is kept)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = markdown(timings(args.images, args.batch_size, args.repeats), args.images, args.batch_size, args.threads)
    print(text, end="")
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "readout", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
