"""What bounded batch scoring costs and saves: one 6000×6000 image with and without the size cap, and a batch of
small images written per chunk (durable as it goes) vs in one piece.

Each case runs ``rahf.batch.score_items`` with ``rahf-tiny`` (random init, fp32) in a fresh child process, which
reports its wall time and peak RSS. Writes the "score-bounds" section of BENCHMARKS.md.

    python benchmarks/score_bounds.py [--threads 2] [--batch 64] [--no-write]
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
BIG_SIDE = 6000


def _write_inputs(folder: Path, batch: int) -> None:
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, BIG_SIDE, dtype=np.float32)
    big = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (BIG_SIDE, 1)), np.tile(ramp[:, None], BIG_SIDE)], -1)
    Image.fromarray(big.astype(np.uint8)).save(folder / "big.png")
    rng = np.random.default_rng(0)
    for i in range(batch):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"small-{i}.png")


def run_child(spec: dict) -> dict:
    """Score the case's items into a fresh folder; seconds of the ``score_items`` call and peak RSS (MiB)."""
    import torch

    from rahf.batch import ScoreItem, score_items
    from rahf.scorer import RAHFScorer

    torch.set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    names = ["big.png"] if spec["case"].startswith("big") else [f"small-{i}.png" for i in range(spec["batch"])]
    items = [ScoreItem(folder / n, "a red circle in the middle") for n in names]
    scorer = RAHFScorer.from_pretrained("rahf-tiny", device="cpu", batch_size=16)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rows = score_items(scorer, items, out, max_side=spec["max_side"], chunk_size=spec["chunk_size"])
        seconds = time.perf_counter() - start
    if any("error" in r for r in rows):
        raise RuntimeError(f"an item failed: {rows}")
    return {**spec, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from benchmarks.score_throughput import MARKER, cpu_facts, launch_child, publish

    if args.child:
        print(MARKER + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    cases = [
        ("big, capped (--max-side 1024)", {"case": "big-capped", "max_side": 1024, "chunk_size": 32}),
        ("big, uncapped (--max-side 0)", {"case": "big-uncapped", "max_side": None, "chunk_size": 32}),
        (f"{args.batch} × 256 px, chunks of 32", {"case": "batch-chunked", "max_side": 1024, "chunk_size": 32}),
        (f"{args.batch} × 256 px, one chunk", {"case": "batch-whole", "max_side": 1024, "chunk_size": args.batch}),
    ]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        _write_inputs(Path(folder), args.batch)
        for label, spec in cases:
            spec = {**spec, "folder": folder, "batch": args.batch, "threads": args.threads}
            results.append((label, launch_child(__file__, spec)))
    base = {r["case"].split("-")[0]: r for _, r in results if r["case"] in ("big-uncapped", "batch-whole")}
    facts = cpu_facts()
    lines = [
        f"### bounded batch scoring — {facts['cpu']}, cpu fp32, {args.threads} threads",
        "",
        "`score_items` with `rahf-tiny`, overlays on, each case in a fresh process (peak RSS includes the model and "
        "torch). Ratios against the uncapped big image and against the one-chunk batch, same run.",
        "",
        "| case | s | peak RSS MiB | time ratio | RSS ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in results:
        ref = base[r["case"].split("-")[0]]
        lines.append(
            f"| {label} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r['seconds'] / ref['seconds']:.3f}× "
            f"| {r['peak_rss_mib'] / ref['peak_rss_mib']:.3f}× |"
        )
    publish("score-bounds", "\n".join(lines) + "\n", {"threads": args.threads, **facts}, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
