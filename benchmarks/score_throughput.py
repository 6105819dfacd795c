"""Throughput and peak memory of ``RAHFScorer.score``, side by side with a reference-style run, as ratios.

Each configuration runs in a fresh child process, so its peak memory is its own (CPU: peak RSS of the process,
weights included; CUDA: ``torch.cuda.max_memory_allocated``). Models are at random init (seed 0): speed and
memory do not depend on the weights.

Output sets:
  all      — 4 scores, 2 heatmaps, keyword sequence (everything)
  impl     — 4 scores + the implausibility heatmap (what repair needs)
  scores   — 4 scores only (what selection needs)
  ref-all  — the reference-style run: everything, heads in NCHW, keyword decoding capped at 100 new tokens
             (the public reimplementation's setting) instead of our per-prompt budget.

Usage:
  python benchmarks/score_throughput.py                      # CPU fp32, rahf-tiny + richhf-base, writes BENCHMARKS.md
  python benchmarks/score_throughput.py --device cuda --dtype bf16
  python benchmarks/score_throughput.py --models rahf-tiny --batch-sizes 1,4 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a photo of a red cat sitting on a blue mat next to a golden lamp, 4k, detailed",
    "an astronaut riding a horse on the moon, digital art",
    "three green apples on a wooden table",
    "a castle on a hill at sunset, oil painting",
]
OUTPUT_SETS = {
    "all": {"heatmaps": None, "keywords": True, "scores_only": False},
    "impl": {"heatmaps": ("implausibility",), "keywords": False, "scores_only": False},
    "scores": {"heatmaps": (), "keywords": False, "scores_only": True},
    "ref-all": {"heatmaps": None, "keywords": True, "scores_only": False},
}
MARKER = "RESULT_JSON="


# ---------------------------------------------------------------------------------------------------------
# Child: one configuration, one process
# ---------------------------------------------------------------------------------------------------------


def run_child(spec: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rahf.presets import build_rahf
    from rahf.scorer import RAHFScorer

    torch.set_num_threads(spec["threads"])
    model, processor = build_rahf(spec["model"], seed=0)
    reference_style = spec["outputs"] == "ref-all"
    if reference_style:
        model.config.max_keyword_tokens = 100
    scorer = RAHFScorer(
        model,
        processor,
        device=spec["device"],
        dtype=spec["dtype"],
        batch_size=spec["batch"],
        channels_last=not reference_style,
        head_chunk=None if reference_style else 2,
    )
    if reference_style:  # decode to the 100-token cap like the reference, whatever the prompt length
        processor.keyword_budgets = lambda text, limit: [limit] * text.input_ids.shape[0]
    images, prompts = make_inputs(model.config.image_size, spec["batch"])
    opts = OUTPUT_SETS[spec["outputs"]]

    def once():
        return scorer.score(prompts, images, **opts)

    def sync():
        if spec["device"].startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        once()
    if spec["warmup_batch_1"]:  # full-size models: one single-image call warms kernels and allocator cheaply
        scorer.score(prompts[:1], images[:1], **opts)
    sync()
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        results = once()
        sync()
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    out = {
        **spec,
        "seconds_per_batch": seconds,
        "images_per_s": spec["batch"] / seconds,
        "seconds_per_image": seconds / spec["batch"],
        "parameters": model.num_parameters(),
    }
    if spec["device"].startswith("cuda"):
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if spec["count_flops"]:
        one = RAHFScorer(
            model,
            processor,
            device=spec["device"],
            dtype=spec["dtype"],
            batch_size=1,
            channels_last=not reference_style,
        )
        with FlopCounterMode(display=False) as counter:
            one.score(prompts[:1], images[:1], **opts)
        out["gflop_per_image"] = counter.get_total_flops() / 1e9
    if spec["compare_fp32"] and spec["dtype"] != "fp32":
        ref = RAHFScorer(model, processor, device=spec["device"], dtype="fp32", batch_size=spec["batch"])
        base = ref.score(prompts, images, **opts)
        out["max_score_diff_vs_fp32"], out["max_heatmap_diff_vs_fp32"] = max_diffs(results, base)
    return out


def make_inputs(size: int, n: int, seed: int = 0) -> tuple[list, list[str]]:
    """``n`` random RGB images of size × size (seeded) and ``n`` realistic prompts (``PROMPTS`` in turn)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return images, [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def max_diffs(results: list, base: list) -> tuple[float, float | None]:
    """Largest |difference| of any score, and of any heatmap pixel (None without heatmaps), between two lists of
    ``RichFeedback`` for the same inputs (compared pairwise, as far as the shorter list goes)."""
    import numpy as np

    score = max(abs(a.scores[k] - b.scores[k]) for a, b in zip(results, base) for k in a.scores)
    maps = [float(np.abs(a.heatmaps[k] - b.heatmaps[k]).max()) for a, b in zip(results, base) for k in a.heatmaps]
    return float(score), (max(maps) if maps else None)


# ---------------------------------------------------------------------------------------------------------
# Parent: machine facts, the grid of configurations, the table
# ---------------------------------------------------------------------------------------------------------


def cpu_facts() -> dict:
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("unknown", "", "x86_64"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": name, "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "cores": os.cpu_count()}


def measure_peaks(threads: int) -> dict:
    """fp32 GFLOP/s of a 2048² matmul and of a 3×3 conv (192 ch, 384², channels-last): the hardware's ceiling."""
    code = f"""
import time, torch, json
torch.set_num_threads({threads})
def best(f, n=3):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)
with torch.inference_mode():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = 2 * 2048**3 / best(lambda: a @ b) / 1e9
    conv = torch.nn.Conv2d(192, 192, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(1, 192, 384, 384).contiguous(memory_format=torch.channels_last)
    cv = 2 * 384 * 384 * 192 * 192 * 9 / best(lambda: conv(x)) / 1e9
print(json.dumps({{"matmul_gflops": mm, "conv_gflops": cv}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_env(threads: int, env_extra: dict[str, str] | None = None, code: Path = ROOT) -> dict[str, str]:
    """The environment of a benchmark child: offline hub, ``threads`` OpenMP threads, no Prefect settings of ours.
    ``code`` (default: this repository; another revision's extracted tree, say) comes first on ``PYTHONPATH``; what
    the caller had there (packages installed with ``--target``, say) stays after it."""
    path = os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    for name in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_PROFILE"):
        env.pop(name, None)
    env.update(env_extra or {})
    return env


def launch_child_results(
    script: str, spec: dict, timeout: float | None = None, env_extra: dict[str, str] | None = None
) -> tuple[list[dict], str | None]:
    """Run ``script --child SPEC``; every RESULT_JSON line it printed, and why it stopped early (None if it did
    not): a child killed at ``timeout`` seconds or one that failed still gives the results it printed before."""
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    env = child_env(spec["threads"], env_extra)
    # with a timeout the child leads a process group of its own, so the kill also ends its helpers (compile
    # workers, say) instead of leaving them running
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env, "cwd": ROOT}
    proc = subprocess.Popen(cmd, **pipes, start_new_session=timeout is not None)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        error = None if proc.returncode == 0 else f"exit {proc.returncode}: {stderr[-3000:]}"
        if error is None and MARKER not in stdout:
            error = f"no result printed: {stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        error = f"killed at its {timeout:.0f} s budget"
    found = [json.loads(ln[len(MARKER) :]) for ln in stdout.splitlines() if ln.startswith(MARKER)]
    return found, error


def launch_child(script: str, spec: dict, env_extra: dict[str, str] | None = None) -> dict:
    """Run ``script --child SPEC`` in a fresh process with ``spec["threads"]`` threads; its RESULT_JSON line.

    Every benchmark measures in a child so that thread settings, imports and peak RSS start clean. Prefect
    variables of the parent are dropped, so a child that uses Prefect talks to its own temporary server only.
    """
    found, error = launch_child_results(script, spec, env_extra=env_extra)
    if found:
        return found[0]
    raise RuntimeError(f"child failed for {spec}:\n{error}")


def launch(spec: dict) -> dict:
    return launch_child(__file__, spec)


def grid(args) -> list[dict]:
    specs = []
    for model in args.models.split(","):
        big = model != "rahf-tiny" and args.device == "cpu"
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            sets = ["ref-all", "all", "impl", "scores"]
            if big and batch > args.max_reference_batch:
                sets.remove("ref-all")  # the slow baseline at the largest batch adds minutes and no information
            for outputs in sets:
                specs.append(
                    {
                        "model": model,
                        "outputs": outputs,
                        "batch": batch,
                        "device": args.device,
                        "dtype": args.dtype,
                        "threads": args.threads,
                        "warmup": 0 if big else 1,
                        "warmup_batch_1": big,
                        "repeats": 1 if big else 3,
                        "count_flops": batch == 1,
                        "compare_fp32": args.dtype != "fp32",
                    }
                )
    return specs


def table(rows: list[dict], facts: dict, peaks: dict | None, args) -> str:
    refs = sorted((r["batch"], r["model"], r["seconds_per_image"]) for r in rows if r["outputs"] == "ref-all")

    def baseline(model: str, batch: int) -> float | None:
        """The reference-style time at the largest measured batch not above this one."""
        found = [t for b, m, t in refs if m == model and b <= batch]
        return found[-1] if found else None

    flops = {(r["model"], r["outputs"]): r.get("gflop_per_image") for r in rows if r["batch"] == 1}
    device = facts["cpu"] if args.device == "cpu" else args.device
    lines = [
        f"### score throughput — {device}, {args.device} {args.dtype}, {args.threads} threads",
        "",
        f"torch {facts['torch']}, random-init weights (seed 0), random {{64, 384}}² RGB images, realistic prompts. "
        "Speed-up: reference-style s/image at the same batch (at the largest measured batch below it where the "
        "slow baseline was not run) divided by this row's s/image. GFLOP/s: FLOPs counted by torch's "
        "FlopCounterMode at batch 1 × images/s. Full-size rows: one timed call after a one-image warm-up; "
        "tiny rows: best of 3 after a warm-up.",
    ]
    if peaks:
        lines.append(
            f"Hardware ceiling here, fp32: 2048² matmul {peaks['matmul_gflops']:.0f} GFLOP/s, 3×3 conv "
            f"192 ch 384² channels-last {peaks['conv_gflops']:.0f} GFLOP/s."
        )
    lines += [
        "",
        "| model | outputs | batch | s/image | images/s | speed-up vs ref-style | peak GB | GFLOP/image "
        "| achieved GFLOP/s |" + (" max |Δscore| vs fp32 | max |Δheatmap| vs fp32 |" if args.dtype != "fp32" else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.dtype != "fp32" else ""),
    ]
    for r in rows:
        base = baseline(r["model"], r["batch"])
        speed = f"{base / r['seconds_per_image']:.2f}×" if base else "–"
        gf = flops.get((r["model"], r["outputs"]))
        achieved = f"{gf * r['images_per_s']:.0f}" if gf else "–"
        gf_text = f"{gf:.1f}" if gf else "–"
        row = (
            f"| {r['model']} | {r['outputs']} | {r['batch']} | {r['seconds_per_image']:.3f} | "
            f"{r['images_per_s']:.2f} | {speed} | {r['peak_gb']:.2f} | {gf_text} | {achieved} |"
        )
        if args.dtype != "fp32":
            hd = r.get("max_heatmap_diff_vs_fp32")
            row += f" {r.get('max_score_diff_vs_fp32', float('nan')):.4f} | {'–' if hd is None else f'{hd:.4f}'} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def publish(key: str, body: str, facts: dict, write: bool) -> None:
    """Print a benchmark's markdown section and its facts as one JSON line; write the section into BENCHMARKS.md."""
    print(body)
    print(json.dumps({"python": platform.python_version(), **facts}))
    if write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", key, body)


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section between markers for this key, leaving the rest of the file alone."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}{end}\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--models", default="rahf-tiny,richhf-base")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--max-reference-batch",
        type=int,
        default=4,
        help="on CPU, run the slow reference-style baseline of full-size models up to this batch",
    )
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--from-json", help="rebuild the table from a results JSON written by an earlier run")
    args = p.parse_args()
    if args.child:
        print(MARKER + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        body = table(saved["rows"], saved["facts"], saved["peaks"], args)
        print(body)
        if not args.no_write:
            write_section(Path(args.out), f"score-{args.device}-{args.dtype}", body)
        return 0

    import torch

    facts = {**cpu_facts(), "torch": torch.__version__}
    if args.device == "cpu" and args.dtype == "bf16" and not facts["native_bf16"]:
        print(f"note: {facts['cpu']} has no native bf16 (avx512_bf16/AMX): bf16 runs emulated, far slower than fp32")
    peaks = measure_peaks(args.threads) if args.device == "cpu" else None
    if peaks:
        print(f"ceiling: matmul {peaks['matmul_gflops']:.0f} GFLOP/s, conv {peaks['conv_gflops']:.0f} GFLOP/s")
    rows = []
    for spec in grid(args):
        r = launch(spec)
        rows.append(r)
        print(
            f"{r['model']:12s} {r['outputs']:8s} batch {r['batch']:3d}: {r['seconds_per_image']:.3f} s/image, "
            f"{r['images_per_s']:.2f} images/s, peak {r['peak_gb']:.2f} GB"
            + (f", {r['gflop_per_image']:.1f} GFLOP/image" if r.get("gflop_per_image") else ""),
            flush=True,
        )
    body = table(rows, facts, peaks, args)
    print(body)
    if not args.no_write:
        key = f"score-{args.device}-{args.dtype}"
        write_section(Path(args.out), key, body)
        (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
        (ROOT / "benchmarks" / "results" / f"{key}.json").write_text(
            json.dumps({"facts": facts, "peaks": peaks, "rows": rows}, indent=2)
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
