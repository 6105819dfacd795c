"""Peak memory of a short RAHF training run against the number of training examples (maps stored at 512²).

Writes two split folders once (1,000 and 16,000 training examples by default, 16 dev examples each), in the
RichHF-18K schema with both maps at 512 × 512 like the real dataset. To keep disk and time small, the examples
cycle through a pool of 32 rendered synthetic-world examples (64 px images, their maps upscaled to 512²): every
record is its own record (own uid, own row), only the bytes repeat. Each run is a child process of its own that
trains ``rahf-tiny`` for a few steps (batch 4, one dev evaluation, one checkpoint) and reports its peak RSS
(``ru_maxrss``, Python and libraries included). ``--before REV`` also runs the training code of an earlier git
revision (extracted with ``git archive``) on the smaller folders, for a before-vs-after comparison.

Usage: python benchmarks/train_memory.py [--sizes 1000,16000] [--before REV --before-sizes 1000,2000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "RESULT_JSON="
POOL, DEV, MAP_SIZE, STEPS, BATCH = 32, 16, 512, 4, 4


def write_folder(folder: Path, n: int, pool: list) -> None:
    """``n`` training and DEV dev records cycling through ``pool`` (features, prompt, image name)."""
    from rahf.data.tfrecord import encode_example, write_records

    for split, count in (("train", n), ("dev", DEV)):
        rows = []

        def records(split: str = split, count: int = count, rows: list = rows):
            for i in range(count):
                features, prompt, image = pool[i % len(pool)]
                uid = f"{split}-{i:06d}"
                rows.append(json.dumps({"uid": uid, "image": image, "prompt": prompt}) + "\n")
                yield encode_example({**features, "filename": [f"{split}/{uid}.png".encode()]})

        write_records(folder / f"{split}.tfrecord", records())
        (folder / f"{split}.jsonl").write_text("".join(rows))


def make_pool(folder: Path) -> list:
    """POOL synthetic examples: (RichHF features with 512² maps, prompt, image path relative to a split folder)."""
    import numpy as np

    from rahf.data.richhf import example_features
    from rahf.data.synthetic import generate

    (folder / "pool").mkdir(parents=True, exist_ok=True)
    pool = []
    for j, sample in enumerate(generate(POOL, size=64, seed=0, split="pool")):
        ex = sample.example
        factor = MAP_SIZE // ex.heatmaps["implausibility"].shape[0]
        ex.heatmaps = {k: np.kron(v, np.ones((factor, factor), np.float32)) for k, v in ex.heatmaps.items()}
        sample.image.save(folder / "pool" / f"{j}.png")
        pool.append((example_features(ex), sample.prompt, f"../pool/{j}.png"))
    return pool


# ---------------------------------------------------------------------------------------------------------
# Child: one training run, one process
# ---------------------------------------------------------------------------------------------------------


def run_child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import rahf.train as rt

    cfg = rt.TrainConfig(
        data_dir=spec["data"],
        out_dir=spec["out"],
        preset="rahf-tiny",
        steps=STEPS,
        batch_size=BATCH,
        warmup_steps=1,
        checkpoint_every=STEPS,
        eval_every=STEPS,
        log_every=1,
        device="cpu",
    )
    t = time.perf_counter()
    summary = rt.train(cfg)
    return {
        **spec,
        "code": str(Path(rt.__file__).resolve().parents[1]),
        "train_examples": summary["train_examples"],
        "total_s": time.perf_counter() - t,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }


def launch(spec: dict, code: Path) -> dict:
    from benchmarks.score_throughput import child_env

    env = child_env(spec["threads"], code=code)
    res = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=code
    )
    for line in res.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    raise RuntimeError(f"child failed for {spec}:\n{res.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="1000,16000")
    p.add_argument("--before", default=None, help="git revision whose training code is measured too")
    p.add_argument("--before-sizes", default="1000,2000")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.child:
        print(MARKER + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.score_throughput import cpu_facts, publish

    sizes = [int(x) for x in args.sizes.split(",")]
    before_sizes = [int(x) for x in args.before_sizes.split(",")] if args.before else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        tmp_path = Path(tmp)
        pool = make_pool(tmp_path)
        for n in sorted(set(sizes) | set(before_sizes)):
            t = time.perf_counter()
            write_folder(tmp_path / f"n{n}", n, pool)
            mib = (tmp_path / f"n{n}" / "train.tfrecord").stat().st_size / 2**20
            print(f"wrote {n} examples ({mib:.1f} MiB of TFRecord) in {time.perf_counter() - t:.1f} s", flush=True)
        runs = [("after", ROOT, n) for n in sizes]
        if args.before:
            old = tmp_path / "before"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True)
            with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
                tar.extractall(old, filter="data")
            runs += [("before", old, n) for n in before_sizes]
        for label, code, n in runs:
            spec = {"n": n, "data": str(tmp_path / f"n{n}"), "out": str(tmp_path / f"run-{label}-{n}")}
            row = launch({**spec, "threads": args.threads, "label": label}, code)
            rows.append(row)
            print(f"{label:6s} {n:6d} examples: peak RSS {row['peak_mib']:.0f} MiB, {row['total_s']:.1f} s", flush=True)
    import torch

    facts = cpu_facts()
    after = {r["n"]: r for r in rows if r["label"] == "after"}
    before = {r["n"]: r for r in rows if r["label"] == "before"}
    lo, hi = min(after), max(after)
    ratio = after[hi]["peak_mib"] / after[lo]["peak_mib"]
    table = [
        f"| {'lazy (this code)' if r['label'] == 'after' else f'eager ({args.before})'} | {r['n']:,} | "
        f"**{r['peak_mib']:.0f}** | {r['total_s']:.1f} |"
        for r in rows
    ]
    lines = [
        f"### training memory — {facts['cpu']}, cpu fp32, {args.threads} threads, torch {torch.__version__}",
        "",
        f"`rahf-tiny`, {STEPS} steps of batch {BATCH}, one dev evaluation ({DEV} examples) and one checkpoint; "
        f"both maps of every record stored at {MAP_SIZE}² (8-bit PNG, as in RichHF-18K), images 64 px. One child "
        "process per row; peak RSS (`ru_maxrss`), MiB; seconds: the whole `train()` call, indexing included.",
        "",
        "| training code | train examples | peak RSS, MiB | seconds |",
        "|---|---:|---:|---:|",
        *table,
        "",
        f"Lazy: {hi:,} / {lo:,} examples (×{hi / lo:g}): peak memory **×{ratio:.3f}** "
        f"(goal ≤ ×1.10: {'met' if ratio <= 1.10 else 'not met'}).",
    ]
    if len(before) >= 2:
        b_lo, b_hi = min(before), max(before)
        slope = (before[b_hi]["peak_mib"] - before[b_lo]["peak_mib"]) / (b_hi - b_lo)
        at_hi = before[b_lo]["peak_mib"] + slope * (hi - b_lo)
        lines[-1] += (
            f" Eager: {slope * 1024:.0f} KiB more per example, so {hi:,} examples would need about "
            f"{at_hi / 1024:.1f} GiB (extrapolated; not run) against {after[hi]['peak_mib'] / 1024:.2f} GiB lazy."
        )
    body = "\n".join(lines) + "\n"
    publish(
        "train-memory", body, {"torch": torch.__version__, "threads": args.threads, "results": rows}, not args.no_write
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
