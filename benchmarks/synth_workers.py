"""Writing a synthetic split with one process and with several (``richfeedback synth --workers``), side by side.

Each row writes the same ``--n``-example train split (64 px, seed 0) into a fresh folder and is timed whole:
process start-up, rendering, image files, the TFRecord and the ``.jsonl``. The rows run in turn, ``--repeats``
times each (ABAB…), and the table gives the median; every folder's TFRecord and ``.jsonl`` are compared with
one process's, so a faster row that wrote other bytes would show ``no`` in the last column.

Usage: python benchmarks/synth_workers.py [--n 4000] [--workers 1,2] [--repeats 2] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import cpu_facts, publish  # noqa: E402
from rahf.data.synthetic import write_split  # noqa: E402

FILES = ("train.tfrecord", "train.jsonl")


def timed_write(folder: Path, n: int, workers: int) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    write_split(folder, "train", n, size=64, seed=0, workers=workers)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="examples of the split (default: 4000)")
    p.add_argument("--workers", default="1,2", help="comma-separated process counts (default: 1,2)")
    p.add_argument("--repeats", type=int, default=2, help="timed writes of each count, in turn (default: 2)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()[0]
    times: dict[int, list[float]] = {w: [] for w in counts}
    same: dict[int, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference"
        write_split(ref, "train", args.n, size=64, seed=0)
        for _ in range(args.repeats):
            for w in counts:
                folder = Path(tmp) / f"w{w}"
                times[w].append(timed_write(folder, args.n, w))
                same[w] = same.get(w, True) and all((folder / f).read_bytes() == (ref / f).read_bytes() for f in FILES)
    base = statistics.median(times[counts[0]])
    facts = cpu_facts()
    lines = [
        f"### {args.n:,}-example split, 64 px — {facts['cpu']}, {facts['cores']} cores",
        "",
        f"1-minute load average {load:.1f} when the run started (other work shares the cores). Median of "
        f"{args.repeats} writes each, taken in turn.",
        "",
        f"| processes | seconds | examples/s | speed-up vs {counts[0]} | same bytes |",
        "|---:|---:|---:|---:|---|",
    ]
    for w in counts:
        t = statistics.median(times[w])
        lines.append(f"| {w} | {t:.1f} | {args.n / t:.0f} | {base / t:.2f}× | {'yes' if same[w] else 'no'} |")
    publish("synth", "\n".join(lines) + "\n", {"n": args.n, "times": times}, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
