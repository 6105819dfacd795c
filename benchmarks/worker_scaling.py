"""What a second Prefect worker buys generate-and-score, and what the worker path costs per run.

A real deployment (``tests/workers.py``: ``prefect server start`` on a free port, the ``gpu-pool`` process pool,
``generate-and-score`` deployed from ``prefect.yaml``, ``prefect worker`` processes with ``--limit 1``). The same
``--images`` (synthetic world + ``rahf-tiny`` at random init, 8 per prompt, batch 16) go out as two flow runs of half
the prompts each, on a fresh local root: once with one worker (the runs queue), once with two (they run side by
side). Reported: wall seconds from the trigger to both runs Completed, images/s, and the cost per image in
worker-seconds (wall × workers / images), as ratios of two workers to one.

The per-run overhead of the worker path: a run whose images are all finished (every id skipped, so only the
orchestration remains) as (1) ``flows.stages.generate_and_score`` in this process, (2) the ``generate-and-score``
flow called in this process against the same server, (3) a deployment run through a worker (trigger to Completed:
polling, a fresh Python process, imports, the model loads). Medians of ``--repeats``.

Usage: python benchmarks/worker_scaling.py [--images 1000] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import cpu_facts, publish  # noqa: E402

PER_PROMPT = 8
DEPLOYMENT = "generate-and-score/generate-and-score"


def prompt_list(n: int) -> list[str]:
    """``n`` distinct prompts of the synthetic world's grammar."""
    from rahf.data.synthetic import sample_prompts

    return sample_prompts(n, seed=0)


def config() -> dict:
    return {"generator": "synthetic", "rahf": "rahf-tiny", "per_prompt": PER_PROMPT, "batch_size": 16}


def run_deployment(client, parameters: list[dict], timeout: float = 3600) -> float:
    """Trigger one flow run per parameter set; seconds until all are Completed."""
    from tests.workers import wait_for_runs

    dep = client.read_deployment_by_name(DEPLOYMENT)
    t0 = time.perf_counter()
    ids = [client.create_flow_run_from_deployment(dep.id, parameters=p).id for p in parameters]
    runs = wait_for_runs(client, ids, timeout=timeout)
    seconds = time.perf_counter() - t0
    bad = [r.state.type.value for r in runs if r.state.type.value != "COMPLETED"]
    if bad:
        raise RuntimeError(f"flow runs ended {bad}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.images < 2 * PER_PROMPT or args.images % PER_PROMPT:
        raise ValueError(f"--images must be a multiple of {PER_PROMPT} and >= {2 * PER_PROMPT}, got {args.images}")
    from importlib.metadata import version

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.loop import generate_and_score
    from flows.stages import generate_and_score as stage
    from tests.workers import running_cluster

    prompts = prompt_list(args.images // PER_PROMPT)
    halves = [prompts[: len(prompts) // 2], prompts[len(prompts) // 2 :]]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="worker-scaling-") as tmp:
        base = Path(tmp)
        with running_cluster(base / "cluster", workers=0, deploy=("generate-and-score",)) as cluster:
            os.environ["PREFECT_API_URL"] = cluster.api_url
            with temporary_settings({PREFECT_API_URL: cluster.api_url}), get_client(sync_client=True) as client:
                scale = {}
                for workers in (1, 2):
                    cluster.start_worker(f"worker-{workers - 1}")
                    root = str(base / f"run-{workers}")
                    params = [{"root": root, "prompts": h, "config": config()} for h in halves]
                    scale[workers] = run_deployment(client, params)
                # overhead: everything finished in run-2, so only orchestration remains
                root = str(base / "run-2")
                from flows.config import LoopConfig

                cfg = LoopConfig.from_dict(config())
                over: dict[str, list[float]] = {"stage": [], "flow": [], "worker": []}
                tiny = prompts[:2]
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    stage(root, tiny, cfg)
                    over["stage"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    generate_and_score(root=root, prompts=tiny, config=config())
                    over["flow"].append(time.perf_counter() - t0)
                    over["worker"].append(run_deployment(client, [{"root": root, "prompts": tiny, "config": config()}]))
    med = {k: statistics.median(v) for k, v in over.items()}
    n = args.images
    one, two = scale[1], scale[2]
    facts = cpu_facts()
    lines = [
        f"### two Prefect workers vs one — {facts['cpu']}, {os.cpu_count()} cores, cpu fp32, Prefect "
        f"{version('prefect')}, load average before the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)",
        "",
        f"**{n} images** (synthetic world + rahf-tiny, 8 per prompt, batch 16) as two flow runs of "
        f"{len(halves[0]) * PER_PROMPT} and {len(halves[1]) * PER_PROMPT}, "
        "deployed from prefect.yaml, process workers with `--limit 1`, trigger to both Completed:",
        "",
        "| workers | seconds | images/s | worker-seconds per image |",
        "|---:|---:|---:|---:|",
        f"| 1 | {one:.1f} | {n / one:.1f} | {one / n:.4f} |",
        f"| 2 | {two:.1f} | {n / two:.1f} | {2 * two / n:.4f} |",
        "",
        f"Two workers / one: time **×{two / one:.2f}** (speed-up ×{one / two:.2f}), cost per image "
        f"**×{2 * two / one:.2f}**.",
        "",
        f"**Per-run overhead** (a run of {len(tiny)} prompts whose {len(tiny) * PER_PROMPT} images are all finished: "
        f"orchestration only), median of {args.repeats}:",
        "",
        "| path | seconds | × stage call |",
        "|---|---:|---:|",
        f"| `flows.stages.generate_and_score` in this process | {med['stage']:.2f} | ×1.00 |",
        f"| `generate-and-score` flow in this process | {med['flow']:.2f} | ×{med['flow'] / med['stage']:.1f} |",
        f"| deployment run through a worker | {med['worker']:.2f} | ×{med['worker'] / med['stage']:.1f} |",
        "",
    ]
    body = "\n".join(lines)
    publish(
        "workers",
        body,
        {"images": n, "seconds": {"1": one, "2": two}, "overhead": over, "loadavg": load},
        not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
