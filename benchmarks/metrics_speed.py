"""Speed of the evaluation suite on a test-split-sized batch, with the reference-style AUC-Judd loop beside it.

955 map pairs of 384² (the RichHF-18K test split's size at the model resolution), ~10 % fixation pixels.
The reference-style loop (one pass over the whole map per fixation pixel, as in the public reimplementation,
without its random jitter) runs on a few maps and is reported per map; the ratio is per-map time against ours,
and the values are compared to 1e-6 on those maps.

Usage: python benchmarks/metrics_speed.py [--maps 955] [--loop-maps 3] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import cpu_facts, write_section  # noqa: E402
from rahf.metrics import auc_judd, heatmap_metrics  # noqa: E402


def judd_reference_style(pred: np.ndarray, gt: np.ndarray) -> float:
    s, f = pred.ravel(), gt.ravel() > 0
    values = np.sort(s[f])[::-1]
    n_fix, n = len(values), s.size
    tp, fp = np.zeros(n_fix + 2), np.zeros(n_fix + 2)
    tp[-1] = fp[-1] = 1.0
    for i in range(n_fix):
        above = (s >= values[i]).sum()
        tp[i + 1] = (i + 1) / n_fix
        fp[i + 1] = (above - (i + 1)) / (n - n_fix)
    return float(np.trapezoid(tp, fp))


def make_maps(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random predictions and blob-shaped ground truths with ~10 % positive pixels (some empty)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    pred = np.empty((n, size, size), np.float32)
    gt = np.zeros((n, size, size), np.float32)
    for i in range(n):
        cx, cy = rng.random(2)
        pred[i] = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05) * 0.7 + rng.random((size, size)) * 0.3
        if i % 10 == 0:
            continue  # ~10 % of samples have an empty ground truth, as in the test split
        for _ in range(3):
            bx, by = rng.random(2)
            gt[i][((xx - bx) ** 2 + (yy - by) ** 2) < 0.115**2] += 1.0 / 3  # three annotators' disks, averaged
    return pred, gt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=int, default=955)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--loop-maps", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    pred, gt = make_maps(args.maps, args.size, seed=0)
    positive = float((gt > 0).mean())
    t = time.perf_counter()
    row = heatmap_metrics(pred, gt)
    suite = time.perf_counter() - t
    nonempty = np.flatnonzero(gt.reshape(len(gt), -1).max(axis=1) > 0)
    t = time.perf_counter()
    ours = auc_judd(pred[nonempty], gt[nonempty])
    ours_per_map = (time.perf_counter() - t) / len(nonempty)
    picks = nonempty[: args.loop_maps]
    t = time.perf_counter()
    ref = [judd_reference_style(pred[i], gt[i]) for i in picks]
    loop_per_map = (time.perf_counter() - t) / len(picks)
    max_diff = float(np.max(np.abs(np.array(ref) - ours[: len(picks)])))
    facts = cpu_facts()
    lines = [
        f"### evaluation suite — {facts['cpu']}, numpy {np.__version__}, one process",
        "",
        f"{args.maps} map pairs of {args.size}², {positive:.1%} positive pixels, {len(nonempty)} with a non-empty "
        "ground truth.",
        "",
        "| what | time | per map |",
        "|---|---:|---:|",
        f"| whole heatmap suite (MSE, MSE GT=0, CC, KLD, SIM, NSS, AUC-Judd) | {suite:.1f} s | "
        f"{suite / args.maps * 1e3:.1f} ms |",
        f"| AUC-Judd, ours (sort + binary search) | {ours_per_map * len(nonempty):.1f} s | "
        f"{ours_per_map * 1e3:.2f} ms |",
        f"| AUC-Judd, reference-style loop ({len(picks)} maps) | {loop_per_map * len(nonempty) / 60:.1f} min "
        f"(extrapolated) | {loop_per_map * 1e3:.0f} ms |",
        "",
        f"AUC-Judd speed-up: **{loop_per_map / ours_per_map:.0f}×** per map; largest difference from the loop on "
        f"the compared maps: {max_diff:.1e}. Suite values: AUC-Judd {row['auc_judd']:.4f}, CC {row['cc']:.4f}, "
        f"NSS {row['nss']:.3f}.",
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    print(
        json.dumps(
            {
                "python": platform.python_version(),
                "suite_s": suite,
                "ours_ms": ours_per_map * 1e3,
                "loop_ms": loop_per_map * 1e3,
                "max_diff": max_diff,
            }
        )
    )
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "metrics", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
