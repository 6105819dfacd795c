"""GPU run-book: every GPU measurement of the project in one command that ends in under 8 minutes.

What it measures, in two child processes (each killed at its time budget; what it printed before is kept):

* ``score``: ``richhf-base`` at full size, random init (seed 0), scoring throughput in bf16 at batch 1, 4, 16 and
  64 for three output sets (``all``: scores, both heatmaps and keywords; ``impl``: scores + implausibility
  heatmap; ``scores``: scores only) with SDPA attention, channels-last heads, no ``torch.compile``; then at batch
  16 each option switched: eager attention, NCHW heads, ``torch.compile`` of the heads (last: it cannot be undone).
  Every row: seconds per batch (best of the timed calls after one warm-up call), peak memory
  (``torch.cuda.max_memory_allocated`` over the timed calls, weights included), and the largest absolute
  difference of any score and any heatmap pixel against an fp32 run (TF32 off) of the same weights and inputs.
* ``tiny``: the tiny generators (``amused-tiny``, ``sd-tiny``, fp32) images/s for text-to-image and inpainting
  (``benchmarks/generator_speed.py``), and LoRA finetuning steps/s (``benchmarks/lora_speed.py``).

Each row is guarded: a row that would start too close to its job's budget is recorded as skipped, a row that fails
(out of memory, a compile error) is recorded with its error and the suite goes on. The result is a BENCHMARKS.md
section (``<!-- bench:gpu-suite -->``) naming the device (``torch.cuda.get_device_name``), torch version and dtype,
and a JSON file of every row.

``--dry-run`` runs the same code end to end on the CPU with tiny sizes (``rahf-tiny``, batches 1 and 2,
``torch.compile`` with the ``eager`` backend, one image per generator call, 2 LoRA steps) and writes to ``--out``
(default: a new temporary file), never to BENCHMARKS.md.

Usage:
  python benchmarks/gpu_suite.py                    # on a CUDA machine: writes the BENCHMARKS.md section
  python benchmarks/gpu_suite.py --dry-run [--out FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_throughput import (  # noqa: E402
    MARKER,
    OUTPUT_SETS,
    cpu_facts,
    launch_child_results,
    make_inputs,
    max_diffs,
    write_section,
)
from common.atomic import atomic_write_text  # noqa: E402

SECTION = "gpu-suite"
#: Modules the two jobs import (the project's dependencies they reach, by import name). A Python that lacks any is
#: refused at start, naming what it lacks, rather than recording every row that needs it as failed.
REQUIRED_MODULES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "diffusers",
    "accelerate",
    "peft",
    "numpy",
    "PIL",
    "cv2",
    "crc32c",
)
MODES = ("all", "impl", "scores")
BASE_OPTIONS = {"attention": "sdpa", "channels_last": True, "compile": False}
GRACE_S = 30.0  # a job's hard timeout is its budget plus this, so a row running at the budget can finish
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


@dataclass
class SuiteConfig:
    """Sizes and time budgets of one suite run (GPU or dry run)."""

    device: str = "cuda"
    model: str = "richhf-base"
    dtype: str = "bf16"
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    option_batch: int = 16  # batch of the rows that switch one option
    accuracy_images: int = 4  # images compared with fp32 (the first ones of every row)
    repeats: int = 3  # timed calls per row after one warm-up call
    compile_backend: str = "inductor"
    compile_reserve_s: float = 90.0  # a compile row starts only with this much of the job's budget left
    generators: tuple[str, ...] = ("amused-tiny", "sd-tiny")
    generator_batch: int = 8
    generator_candidates: int = 4
    generator_repeats: int = 3
    lora_steps: int = 30
    lora_images: int = 8
    max_keyword_tokens: int | None = None  # cap on decoded keyword tokens (None: the model's own)
    threads: int = 8
    budget_s: float = 465.0  # the whole suite, start to table
    score_budget_s: float = 300.0
    tiny_budget_s: float = 110.0

    @classmethod
    def dry_run(cls, threads: int = 1) -> SuiteConfig:
        """Tiny sizes on the CPU: the whole suite in well under a minute."""
        return cls(
            device="cpu",
            model="rahf-tiny",
            batch_sizes=(1, 2),
            option_batch=2,
            accuracy_images=2,
            repeats=1,
            compile_backend="eager",
            compile_reserve_s=2.0,
            generator_batch=1,
            generator_candidates=1,
            generator_repeats=1,
            lora_steps=2,
            lora_images=4,
            max_keyword_tokens=4,
            threads=threads,
            budget_s=120.0,
            score_budget_s=60.0,
            tiny_budget_s=55.0,
        )


def score_plan(cfg: SuiteConfig) -> list[dict[str, Any]]:
    """Every scoring row in the order it runs: the batch sweep with the base options, then one option switched
    at ``option_batch`` (eager attention, NCHW heads, and last the compiled heads)."""
    plan = [{"outputs": m, "batch": b, **BASE_OPTIONS} for b in cfg.batch_sizes for m in MODES]
    for switched in ({"attention": "eager"}, {"channels_last": False}, {"compile": True}):
        plan += [{"outputs": m, "batch": cfg.option_batch, **BASE_OPTIONS, **switched} for m in MODES]
    return [{**row, "index": i} for i, row in enumerate(plan)]


# ---------------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------------


def missing_modules(names: tuple[str, ...] | None = None) -> list[str]:
    """The names among ``names`` (default :data:`REQUIRED_MODULES`) that this Python cannot import (looked up
    without importing them)."""
    return [n for n in (REQUIRED_MODULES if names is None else names) if importlib.util.find_spec(n) is None]


def emit(row: dict[str, Any]) -> None:
    print(MARKER + json.dumps(row), flush=True)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text[:160]


def _device_facts(device: str) -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"{cpu_facts()['cpu']} (CPU)"
    return {"kind": "facts", "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float:
    """Peak memory, GB: CUDA allocations since the last reset, or the CPU process's peak RSS."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _fp32_reference(model, processor, device: str, mode: str, images, prompts) -> list:
    """Outputs of an fp32 run with TF32 off (the accuracy baseline of every row of ``mode``)."""
    import torch

    from rahf.scorer import RAHFScorer

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        scorer = RAHFScorer(model, processor, device=device, dtype="fp32", batch_size=len(images))
        return scorer.score(prompts, images, **OUTPUT_SETS[mode])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _set_options(model, row: dict[str, Any], compile_backend: str) -> None:
    """Attention implementation and head memory format of ``row``; compiles the heads once when asked (for good)."""
    import torch

    for part in (model.vision, model.text):
        part.set_attn_implementation(row["attention"])
    fmt = torch.channels_last if row["channels_last"] else torch.contiguous_format
    model.heatmap_heads.to(memory_format=fmt)
    model.score_heads.to(memory_format=fmt)
    if row["compile"] and not getattr(model, "_suite_compiled", False):
        for heads in (model.heatmap_heads, model.score_heads):
            for head in heads.values():
                head.compile(backend=compile_backend, dynamic=False)
        model._suite_compiled = True


def _score_row(model, processor, spec: dict, row: dict, images, prompts, ref, deadline: float) -> dict[str, Any]:
    from rahf.scorer import RAHFScorer

    device, batch = spec["device"], row["batch"]
    _set_options(model, row, spec["compile_backend"])
    scorer = RAHFScorer(
        model,
        processor,
        device=device,
        dtype=spec["dtype"],
        batch_size=batch,
        channels_last=row["channels_last"],
        head_chunk=2,
    )
    opts = OUTPUT_SETS[row["outputs"]]
    im, pr = images[:batch], prompts[:batch]
    t = time.perf_counter()
    results = scorer.score(pr, im, **opts)  # warm-up: kernels, allocator, autotuning, compilation
    _sync(device)
    first_s = time.perf_counter() - t
    _reset_peak(device)
    times: list[float] = []
    for _ in range(spec["repeats"]):
        if times and time.perf_counter() + times[-1] > deadline:
            break  # at least one timed call, then only what fits the budget
        t = time.perf_counter()
        results = scorer.score(pr, im, **opts)
        _sync(device)
        times.append(time.perf_counter() - t)
    seconds = min(times)
    score_diff, map_diff = max_diffs(results, ref) if ref else (None, None)
    return {
        **row,
        "status": "ok",
        "batch_run": scorer.batch_size,  # smaller than batch if an out-of-memory retry halved it
        "timed_calls": len(times),
        "first_call_s": first_s,
        "seconds_per_batch": seconds,
        "images_per_s": batch / seconds,
        "peak_gb": _peak_gb(device),
        "max_score_diff_vs_fp32": score_diff,
        "max_heatmap_diff_vs_fp32": map_diff,
    }


def score_job(spec: dict) -> None:
    """Child: build the model once, fp32 references, then every planned row within the budget."""
    import torch

    from rahf.oom import release_memory
    from rahf.presets import build_rahf

    deadline = time.perf_counter() + spec["budget_s"]
    torch.set_num_threads(spec["threads"])
    emit(_device_facts(spec["device"]))
    t = time.perf_counter()
    model, processor = build_rahf(spec["model"], seed=0)
    if spec["max_keyword_tokens"]:
        model.config.max_keyword_tokens = spec["max_keyword_tokens"]
    n_ref = spec["accuracy_images"]
    images, prompts = make_inputs(model.config.image_size, max([*(r["batch"] for r in spec["plan"]), n_ref]))
    emit({"kind": "model", "build_s": time.perf_counter() - t, "parameters": model.num_parameters()})
    refs = {}
    for mode in MODES:
        try:
            refs[mode] = _fp32_reference(model, processor, spec["device"], mode, images[:n_ref], prompts[:n_ref])
        except Exception as e:  # recorded; the rows of this mode then have no accuracy columns
            emit({"kind": "reference", "outputs": mode, "status": f"error: {_short(e)}"})
    longest = 0.0
    for row in spec["plan"]:
        left = deadline - time.perf_counter()
        need = max(2 * longest, spec["compile_reserve_s"] if row["compile"] else 0.0)
        if left < need:
            emit({**row, "kind": "score", "status": f"skipped: {left:.0f} s of the budget left, needs ~{need:.0f}"})
            continue
        t = time.perf_counter()
        try:
            out = _score_row(model, processor, spec, row, images, prompts, refs.get(row["outputs"]), deadline)
        except Exception as e:  # one failed row (out of memory, compile error) never stops the suite
            out = {**row, "status": f"error: {_short(e)}"}
            release_memory(torch.device(spec["device"]))
        if not row["compile"]:
            longest = max(longest, time.perf_counter() - t)
        emit({**out, "kind": "score"})


def tiny_job(spec: dict) -> None:
    """Child: tiny generators' images/s, then LoRA finetuning steps/s, each row guarded."""
    import torch

    from benchmarks.generator_speed import measure
    from benchmarks.lora_speed import make_folder
    from benchmarks.lora_speed import run_child as lora_child

    deadline = time.perf_counter() + spec["budget_s"]
    torch.set_num_threads(spec["threads"])
    emit(_device_facts(spec["device"]))
    gen_args = argparse.Namespace(device=spec["device"], dtype="fp32", repeats=spec["generator_repeats"])
    for name in spec["generators"]:
        if time.perf_counter() > deadline:
            emit({"kind": "generator", "generator": name, "status": "skipped: budget spent"})
            continue
        try:
            r = measure(name, gen_args, batch=spec["generator_batch"], candidates=spec["generator_candidates"])
            emit({**r, "kind": "generator", "status": "ok", "steps": r["call"].get("num_inference_steps")})
        except Exception as e:
            emit({"kind": "generator", "generator": name, "status": f"error: {_short(e)}"})
    with tempfile.TemporaryDirectory(prefix="gpu-suite-lora-") as tmp:
        data = None
        for name in spec["generators"]:
            if time.perf_counter() > deadline:
                emit({"kind": "lora", "preset": name, "status": "skipped: budget spent"})
                continue
            try:
                data = data or make_folder(Path(tmp), spec["lora_images"])
                _reset_peak(spec["device"])
                common = {"preset": name, "data": data, "device": spec["device"], "threads": spec["threads"]}
                r = lora_child({**common, "mode": "train", "steps": spec["lora_steps"], "out": str(Path(tmp) / name)})
                emit({**r, "kind": "lora", "status": "ok"})
            except Exception as e:
                emit({"kind": "lora", "preset": name, "status": f"error: {_short(e)}"})


# ---------------------------------------------------------------------------------------------------------
# Parent: the jobs under one budget, the section
# ---------------------------------------------------------------------------------------------------------


def run_suite(cfg: SuiteConfig, started: float | None = None) -> dict[str, Any]:
    """Run both jobs within ``cfg.budget_s`` counted from ``started`` (a ``time.perf_counter()`` value; default
    now); every row of the plan comes back, measured, failed or skipped."""
    started = time.perf_counter() if started is None else started
    common = {"device": cfg.device, "threads": cfg.threads}
    plan = score_plan(cfg)
    jobs = [
        (
            "score",
            cfg.score_budget_s,
            {
                **common,
                "job": "score",
                "model": cfg.model,
                "dtype": cfg.dtype,
                "plan": plan,
                "accuracy_images": cfg.accuracy_images,
                "repeats": cfg.repeats,
                "compile_backend": cfg.compile_backend,
                "compile_reserve_s": cfg.compile_reserve_s,
                "max_keyword_tokens": cfg.max_keyword_tokens,
            },
        ),
        (
            "tiny",
            cfg.tiny_budget_s,
            {
                **common,
                "job": "tiny",
                **{k: getattr(cfg, k) for k in ("generators", "generator_batch", "generator_candidates")},
                **{k: getattr(cfg, k) for k in ("generator_repeats", "lora_steps", "lora_images")},
            },
        ),
    ]
    found: list[dict[str, Any]] = []
    job_errors: dict[str, str] = {}
    for n, (name, budget, spec) in enumerate(jobs):
        later = sum(b for _, b, _ in jobs[n + 1 :])
        left = cfg.budget_s - (time.perf_counter() - started)
        soft = min(budget, left - later)
        if soft < 5:
            job_errors[name] = f"not started: {left:.0f} s of the suite's budget left"
            continue
        hard = min(soft + GRACE_S, left - later * 0.5)
        rows, error = launch_child_results(__file__, {**spec, "budget_s": soft}, timeout=hard)
        found += rows
        if error:
            job_errors[name] = error.splitlines()[0][:200] if error.startswith("killed") else error[-600:]
        print(
            f"{name}: {len(rows)} results in {time.perf_counter() - started:.0f} s" + (f" ({error})" if error else "")
        )
    return collect(cfg, plan, found, job_errors, time.perf_counter() - started)


def collect(
    cfg: SuiteConfig, plan: list[dict], found: list[dict], job_errors: dict[str, str], wall_s: float
) -> dict[str, Any]:
    """The results by kind, with a row (status "not run: ...") for every planned row no child reported."""
    facts = next((r for r in found if r.get("kind") == "facts"), {})
    by_index = {r["index"]: r for r in found if r.get("kind") == "score"}
    why = job_errors.get("score", "no result")
    scores = [by_index.get(row["index"], {**row, "status": f"not run: {why}"}) for row in plan]
    named = {("generator", r.get("generator")): r for r in found if r.get("kind") == "generator"}
    named |= {("lora", r.get("preset")): r for r in found if r.get("kind") == "lora"}
    why = job_errors.get("tiny", "no result")
    generators = [named.get(("generator", g), {"generator": g, "status": f"not run: {why}"}) for g in cfg.generators]
    loras = [named.get(("lora", g), {"preset": g, "status": f"not run: {why}"}) for g in cfg.generators]
    return {
        "config": dataclasses.asdict(cfg),
        "facts": {k: v for k, v in facts.items() if k != "kind"},
        "model": next((r for r in found if r.get("kind") == "model"), {}),
        "references": [r for r in found if r.get("kind") == "reference"],
        "scores": scores,
        "generators": generators,
        "lora": loras,
        "job_errors": job_errors,
        "wall_s": wall_s,
    }


def _num(v: Any, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def render(result: dict[str, Any], dry_run: bool) -> str:
    """The BENCHMARKS.md section: device, torch, dtype, then the three tables."""
    cfg, facts, model = result["config"], result["facts"], result["model"]
    device = facts.get("device_name", cfg["device"])
    lines = [
        f"### GPU suite — {device}, torch {facts.get('torch', '?')}, {cfg['dtype']}"
        + (" (dry run)" if dry_run else ""),
        "",
        f"`{cfg['model']}` at random init (seed 0"
        + (f", {model['parameters'] / 1e6:.1f}M parameters" if model.get("parameters") else "")
        + f"), {cfg['dtype']} autocast, heads two maps at a time, random {cfg['batch_sizes']} batches of "
        "ViT-size images with realistic prompts. s/batch: best of "
        f"{cfg['repeats']} timed calls after one warm-up call (first call s: the warm-up, compilation included). "
        "Peak GB: "
        + ("`torch.cuda.max_memory_allocated`" if cfg["device"].startswith("cuda") else "peak RSS")
        + " over the timed calls, weights included. Δ vs fp32: largest absolute difference of any score / any "
        f"heatmap pixel of the first {cfg['accuracy_images']} images against an fp32 run (TF32 off) of the same "
        f"weights and inputs. Options: attention `sdpa` or `eager`; heads channels-last or NCHW; heads "
        f"`torch.compile`d ({cfg['compile_backend']}). Suite wall time {result['wall_s']:.0f} s "
        f"(budget {cfg['budget_s']:.0f} s); CUDA {facts.get('cuda') or '–'}.",
        "",
        "| outputs | batch | attention | channels-last | compile | s/batch | images/s | first call s | peak GB "
        "| max abs Δscore vs fp32 | max abs Δheatmap vs fp32 | status |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["scores"]:
        lines.append(
            f"| {r['outputs']} | {r['batch']} | {r['attention']} | {'on' if r['channels_last'] else 'off'} | "
            f"{'on' if r['compile'] else 'off'} | {_num(r.get('seconds_per_batch'), '.4f')} | "
            f"{_num(r.get('images_per_s'), '.2f')} | {_num(r.get('first_call_s'), '.2f')} | "
            f"{_num(r.get('peak_gb'), '.2f')} | {_num(r.get('max_score_diff_vs_fp32'), '.5f')} | "
            f"{_num(r.get('max_heatmap_diff_vs_fp32'), '.5f')} | {_cell(r['status'])} |"
        )
    lines += [
        "",
        f"Tiny generators, fp32, {cfg['device']}: `generate` one prompt × {cfg['generator_batch']} seeds, `inpaint` "
        f"{cfg['generator_candidates']} candidates, median of {cfg['generator_repeats']} calls after a warm-up "
        f"(`benchmarks/generator_speed.py`); LoRA: batch 4, rank 4, {cfg['lora_steps']} steps on "
        f"{cfg['lora_images']} synthetic-world images (`benchmarks/lora_speed.py`).",
        "",
        "| generator | steps | image px | generate images/s | inpaint candidates/s | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["generators"]:
        lines.append(
            f"| {r['generator']} | {r.get('steps') or '–'} | {r.get('size') or '–'} | "
            f"{_num(r.get('generate_ips'), '.2f')} | {_num(r.get('inpaint_ips'), '.2f')} | {_cell(r['status'])} |"
        )
    lines += [
        "",
        "| LoRA generator | steps | steps/s | images/s | peak MiB | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["lora"]:
        ips = r["steps_per_s"] * 4 if r.get("steps_per_s") is not None else None
        lines.append(
            f"| {r['preset']} | {r.get('step') or '–'} | {_num(r.get('steps_per_s'), '.2f')} | {_num(ips, '.1f')} | "
            f"{_num(r.get('peak_mib'), '.0f')} | {_cell(r['status'])} |"
        )
    for job, error in result["job_errors"].items():
        lines.append(f"\n{job} job: {_cell(error)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; writes --out, never BENCHMARKS.md")
    p.add_argument("--out", help="markdown file for the section (default: BENCHMARKS.md; dry run: a temporary file)")
    p.add_argument("--threads", type=int, help="CPU threads of each child (default: 8 on a GPU run, 1 dry)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of the whole suite (default 465; dry 120)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.child:
        spec = json.loads(args.child)
        {"score": score_job, "tiny": tiny_job}[spec["job"]](spec)
        return 0

    missing = missing_modules()
    if missing:
        print(
            f"error: this Python cannot import {', '.join(missing)}; install the project's dependencies "
            "(`pip install -e .`) or put them on PYTHONPATH, then run the suite again"
        )
        return 2
    if args.dry_run:
        cfg = SuiteConfig.dry_run(threads=args.threads or 1)
    else:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here (torch reports none); use --dry-run to check the suite on the CPU")
            return 2
        cfg = SuiteConfig(threads=args.threads or max(1, min(8, os.cpu_count() or 1)))
    if args.budget_s is not None:
        scale = args.budget_s / cfg.budget_s
        cfg = dataclasses.replace(
            cfg,
            budget_s=args.budget_s,
            score_budget_s=cfg.score_budget_s * scale,
            tiny_budget_s=cfg.tiny_budget_s * scale,
        )
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        fd, name = tempfile.mkstemp(prefix="gpu-suite-", suffix=".md")
        os.close(fd)
        out = Path(name)
    else:
        out = BENCHMARKS_MD
    if args.dry_run and out.resolve() == BENCHMARKS_MD.resolve():
        print("error: a dry run never writes BENCHMARKS.md; give another --out")
        return 2
    result = run_suite(cfg, started)
    body = render(result, args.dry_run)
    print(body)
    write_section(out, SECTION, body)
    json_path = out.with_suffix(".json") if args.dry_run else ROOT / "benchmarks" / "results" / f"{SECTION}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(result, indent=2))
    print(f"wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
