"""What Prefect costs the feedback loop, and how generate-and-score scales with the number of images.

(a) The feedback loop through the Prefect flow ``flows.loop.feedback_loop`` against the same stages of
``flows.stages`` called directly in the same order with the same arguments (generate and score -> select ->
finetune -> compare -> repair -> manifest), on the synthetic world scored by ``rahf-tiny`` at random init, N prompts
× 8 images, selection threshold plausibility 0.0. Every run is a child process of its own (no model cache carries
over) writing into a fresh run folder; both import ``flows.loop`` (and so Prefect) before timing. The Prefect child
gets its own ``PREFECT_HOME`` in a temporary folder and the temporary API server the command line starts
(``flows.server``); it first runs a trivial flow, which starts that server, then the same flow again (the fixed
cost of one flow run with the server up); both are reported apart and not counted.
Direct and Prefect runs alternate ``--repeats`` times, after ``--warmup`` pairs that are reported but not counted
(the first runs on a machine read Python, torch and Prefect from a cold disk cache); the medians give the overhead
(goal ≤ 10 %).

(b) ``flows.stages.generate_and_score`` (synthetic world + rahf-tiny, batch 16) at each of ``--sizes`` images
(prompts × 8 seeds), each in a child process with a fresh run folder: seconds (models loaded before timing) and
the process's peak RSS (``ru_maxrss``). Goals: peak memory flat (largest / smallest size ≤ 1.10) and time linear
(seconds per image the same at both sizes).

Usage: python benchmarks/flow_overhead.py [--prompts 12] [--repeats 3] [--warmup 1] [--sizes 1000,10000] [--device cpu]
       [--threads 2] [--no-write]
(a) and (b) are separate sections of BENCHMARKS.md; ``--repeats 0`` measures (b) alone, ``--sizes ""`` (a) alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import MARKER, cpu_facts, launch_child, publish  # noqa: E402

PER_PROMPT = 8
BATCH = 16
RAHF = "rahf-tiny"
SELECTION = {"thresholds": {"plausibility": 0.0}}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------
# Children: one run, one process
# ---------------------------------------------------------------------------------------------------------


def loop_direct(root: str, prompts: list[str], device: str) -> None:
    """The stages of ``feedback_loop`` in its order, with the arguments it passes (its defaults included)."""
    from flows import stages
    from flows.config import LoopConfig

    config = LoopConfig.from_dict(_config(device))
    generated = stages.generate_and_score(root, prompts, config)
    selected = stages.select_finetune_data(root, config, ids=generated.ids)
    tuned = stages.finetune_generator(root, selected.dataset, config)
    stages.compare_checkpoints(root, prompts, config, lora_b=tuned.adapter)
    stages.repair_images(root, config, ids=generated.ids)
    stages.write_manifest(root, generated.ids)


def _config(device: str) -> dict:
    """The loop's config (the dict form the flow takes): the defaults, this benchmark's model and sizes."""
    return {"generator": "synthetic", "rahf": RAHF, "per_prompt": PER_PROMPT, "selection": SELECTION, "device": device}


def child_loop(spec: dict) -> dict:
    from rahf.data.synthetic import sample_prompts

    prompts = sample_prompts(spec["prompts"], seed=0)
    root = spec["root"]
    if spec["mode"] == "direct":
        # flows.loop (so flows.stages and Prefect) imported before timing, as the Prefect child does: the modules
        # both runs load (HTTP clients, jinja2, yaml, ... about 0.25 s here) are loaded outside the timing in both
        import flows.loop  # noqa: F401

        t = time.perf_counter()
        loop_direct(root, prompts, spec["device"])
        return {**spec, "seconds": time.perf_counter() - t}
    from prefect import flow

    from flows.loop import feedback_loop
    from flows.server import use_temporary_server

    use_temporary_server()  # the temporary server as `richfeedback loop` sets it up (flows.server)

    @flow(name="server-start")
    def trivial() -> int:
        return 1

    t = time.perf_counter()
    trivial()  # the first flow of the process starts the temporary API server
    startup = time.perf_counter() - t
    t = time.perf_counter()
    trivial()  # an empty flow with the server up: the fixed cost of one flow run
    empty = time.perf_counter() - t
    t = time.perf_counter()
    feedback_loop(root, prompts, config=_config(spec["device"]))
    return {**spec, "seconds": time.perf_counter() - t, "startup_s": startup, "empty_flow_s": empty}


def child_scale(spec: dict) -> dict:
    from flows import stages
    from flows.config import LoopConfig
    from rahf.data.synthetic import sample_prompts

    prompts = sample_prompts(spec["images"] // PER_PROMPT, seed=0)
    stages.load_generator("synthetic", None, spec["device"])  # models loaded (and cached) before timing
    stages.load_scorer(RAHF, spec["device"], BATCH)
    loaded = peak_rss_mib()
    t = time.perf_counter()
    config = LoopConfig(
        generator="synthetic", rahf=RAHF, per_prompt=PER_PROMPT, batch_size=BATCH, device=spec["device"]
    )
    report = stages.generate_and_score(spec["root"], prompts, config)
    seconds = time.perf_counter() - t
    return {
        **spec,
        "seconds": seconds,
        "scored": len(report.scored),
        "failed": len(report.failed),
        "loaded_mib": loaded,
        "peak_mib": peak_rss_mib(),
    }


def run_child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    return child_loop(spec) if spec["kind"] == "loop" else child_scale(spec)


# ---------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------


def launch(spec: dict, env_extra: dict[str, str] | None = None) -> dict:
    return launch_child(__file__, spec, env_extra)


def measure_loop(args, tmp: Path) -> tuple[list[dict], list[dict]]:
    """(direct runs, Prefect runs), alternating, each in a fresh run folder and child process."""
    direct, prefect = [], []
    for i in range(-args.warmup, args.repeats):
        for mode in ("direct", "prefect") if i % 2 == 0 else ("prefect", "direct"):
            root = tmp / f"loop-{mode}-{i}"
            spec = {"kind": "loop", "mode": mode, "prompts": args.prompts, "root": str(root)}
            spec.update(device=args.device, threads=args.threads)
            extra = {}
            if mode == "prefect":
                home = tmp / f"prefect-home-{i}"
                home.mkdir()
                extra = {"PREFECT_HOME": str(home)}
            r = launch(spec, extra)
            shutil.rmtree(root, ignore_errors=True)
            if i >= 0:
                (direct if mode == "direct" else prefect).append(r)
            startup = f" (server start-up {r['startup_s']:.1f} s, not counted)" if mode == "prefect" else ""
            run = f"run {i + 1}" if i >= 0 else "warm-up (not counted)"
            print(f"loop {mode:8s} {run}: {r['seconds']:.1f} s{startup}", flush=True)
    return direct, prefect


def measure_scale(args, tmp: Path) -> list[dict]:
    rows = []
    for n in args.sizes:
        root = tmp / f"scale-{n}"
        r = launch({"kind": "scale", "images": n, "root": str(root), "device": args.device, "threads": args.threads})
        shutil.rmtree(root, ignore_errors=True)
        rows.append(r)
        print(f"generate_and_score {n:6d} images: {r['seconds']:.1f} s, peak RSS {r['peak_mib']:.0f} MiB", flush=True)
    return rows


def _join(runs: list[dict], key: str) -> str:
    return ", ".join(f"{r[key]:.2f}" for r in runs)


def loop_lines(direct: list[dict], prefect: list[dict], args) -> list[str]:
    d = statistics.median(r["seconds"] for r in direct)
    p = statistics.median(r["seconds"] for r in prefect)
    startup = statistics.median(r["startup_s"] for r in prefect)
    empty = statistics.median(r["empty_flow_s"] for r in prefect)
    overhead = p / d - 1
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(direct, prefect, strict=True)]
    paired = statistics.median(ratios) - 1
    from flows.config import LoopConfig

    cfg = LoopConfig()
    return [
        f"**(a) Feedback loop**, {args.prompts} prompts × {PER_PROMPT} images (synthetic world, {RAHF} at random "
        "init, selection threshold plausibility 0.0, the loop's defaults otherwise (`flows.config.LoopConfig`): "
        f"comparison at {cfg.compare.per_prompt} images a prompt, repair of at most {cfg.repair_limit} images below "
        f"plausibility {cfg.repair_below}). Median of {args.repeats} runs each, alternating, after {args.warmup} "
        "warm-up pair(s) not counted; every run a child "
        "process with a fresh run folder.",
        "",
        "| how | median s | runs, s |",
        "|---|---:|---|",
        f"| stages called directly | {d:.2f} | {_join(direct, 'seconds')} |",
        f"| Prefect flow `feedback_loop` | {p:.2f} | {_join(prefect, 'seconds')} |",
        f"| temporary server start-up (first flow of a process; not counted above) | {startup:.2f} | "
        f"{_join(prefect, 'startup_s')} |",
        f"| an empty flow, server up (not counted above) | {empty:.2f} | {_join(prefect, 'empty_flow_s')} |",
        "",
        f"Prefect / direct: **{p / d:.3f}×**, overhead **{overhead:+.1%}** ({p - d:+.2f} s; goal ≤ 10 %: "
        f"{'met' if overhead <= 0.10 else 'not met'}).",
        "",
        f"Each repeat runs the two back to back, so the machine's drift between repeats cancels in their ratio: "
        f"Prefect / direct of the {len(ratios)} pairs {', '.join(f'{r:.3f}' for r in ratios)}; median "
        f"**{paired:+.1%}**.",
    ]


def scale_lines(rows: list[dict]) -> list[str]:
    table = [
        f"| {r['images']} | {r['scored']} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.1f} | "
        f"{r['seconds'] / r['images'] * 1e3:.1f} | {r['loaded_mib']:.0f} | **{r['peak_mib']:.0f}** |"
        for r in rows
    ]
    lines = [
        f"**(b) `generate_and_score`** (synthetic world + {RAHF}, batch {BATCH}, images = prompts × {PER_PROMPT} "
        "seeds), one child process and a fresh run folder per size; models loaded before timing. Memory: peak RSS "
        "of the process (`ru_maxrss`), and the same after loading the models.",
        "",
        "| images | scored | seconds | images/s | ms/image | RSS after loading, MiB | peak RSS, MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *table,
    ]
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        size = b["images"] / a["images"]
        memory = b["peak_mib"] / a["peak_mib"]
        time_ratio = b["seconds"] / a["seconds"]
        per_image = time_ratio / size
        lines += [
            "",
            f"{b['images']} / {a['images']} images (×{size:g}): peak memory **×{memory:.3f}** (goal ≤ ×1.10: "
            f"{'met' if memory <= 1.10 else 'not met'}); time **×{time_ratio:.2f}** against ×{size:g} for linear, "
            f"seconds per image ×{per_image:.3f}.",
        ]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="pairs run first and not counted")
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.child:
        print(MARKER + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(n < PER_PROMPT or n % PER_PROMPT for n in args.sizes):
        raise ValueError(f"--sizes must be positive multiples of {PER_PROMPT} (prompts × 8 seeds), got {args.sizes}")
    if args.prompts < 1 or args.repeats < 0 or args.warmup < 0:
        raise ValueError(
            f"--prompts must be >= 1, --repeats and --warmup >= 0; got {args.prompts}, {args.repeats}, {args.warmup}"
        )
    from importlib.metadata import version

    import torch

    with tempfile.TemporaryDirectory(prefix="flow-overhead-") as tmp:
        direct, flowed = measure_loop(args, Path(tmp)) if args.repeats else ([], [])
        scale = measure_scale(args, Path(tmp))
    facts = cpu_facts()
    device = facts["cpu"] if args.device == "cpu" else torch.cuda.get_device_name(0)
    heading = (
        f"{device}, {args.device} fp32, {args.threads} threads, torch {torch.__version__}, Prefect {version('prefect')}"
    )
    run_facts = {
        "torch": torch.__version__,
        "prefect": version("prefect"),
        "device": args.device,
        "threads": args.threads,
    }
    if direct:  # (a) and (b) are sections of their own: either can be measured again alone
        body = "\n".join([f"### feedback loop through Prefect — {heading}", "", *loop_lines(direct, flowed, args)])
        publish("flows", body + "\n", {**run_facts, "direct": direct, "prefect_runs": flowed}, not args.no_write)
    if scale:
        body = "\n".join([f"### generate-and-score at scale — {heading}", "", *scale_lines(scale)])
        publish("flows-scale", body + "\n", {**run_facts, "scale": scale}, not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
