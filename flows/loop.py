"""Prefect flows of the feedback loop: each flow only orchestrates tasks, and each task is a few lines
around a plain stage function of :mod:`flows.stages`. Tasks pass names, ids and URIs, never tensors or images.

* ``generate_and_score`` — N images per prompt, scored in batches (progress artifact, console bar).
* ``select_finetune_data`` — best of N per prompt above the thresholds -> an image folder (scheduled daily).
* ``finetune_generator`` — LoRA (or the synthetic world's fit) on a selected folder.
* ``repair_images`` — best-of-N inpainting of the least plausible (or named) images (on demand).
* ``compare_checkpoints`` — same prompts and seeds through A and B, paired statistics and the HTML report.
* ``feedback_loop`` — generate -> score -> select -> finetune -> compare -> repair the worst (the main job).

GPU work carries the ``gpu`` tag; :func:`ensure_gpu_limit` (``feedback_loop(gpu_slots=N)``) creates the tag's
concurrency limit (a limit that does not exist limits nothing; acquiring a slot costs about 2 s per task).
Transient I/O is retried inside the run store; tasks add a retry on top, for transient errors only
(:func:`retry_transient`): a refused permission, a missing path or a bad input fails the task at once. Every flow
starts by sweeping the temporary files that killed writers left under a local root.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows import stages
from flows.storage import is_transient

GPU_TAG = "gpu"
NOTHING_SELECTED = "nothing selected"

log = logging.getLogger(__name__)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only when its exception is transient
    (:func:`flows.storage.is_transient`: connection errors, timeouts, I/O errors other than refused permissions,
    missing paths, full or read-only disks)."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:
            return False
    if isinstance(error, BaseException) and is_transient(error):
        return True
    log.info("%s failed with %s: not transient, not retried", task.name, type(error).__name__)
    return False


def ensure_gpu_limit(slots: int = 1) -> None:
    """Create the ``gpu`` tag concurrency limit (``slots`` tasks at a time) if it does not exist."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(GPU_TAG)
        except Exception:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)


def _progress(description: str):
    """A progress artifact and a console bar, updated with (done, total)."""
    from tqdm.auto import tqdm

    artifact = create_progress_artifact(0.0, description=description)
    bar = tqdm(desc=description, unit="img", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        update_progress_artifact(artifact, 100.0 * done / max(1, total))
        if done >= total:
            bar.close()

    return update


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------


@task(tags=[GPU_TAG], retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def generate_and_score_task(root: str, prompts: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Generate and score; returns ids and counts."""
    return stages.generate_and_score(root, prompts, progress=_progress("generate and score"), **options)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def select_task(root: str, selection: dict[str, Any], ids: list[str] | None) -> dict[str, Any]:
    """Select the finetuning set; returns the dataset URI and the selected ids."""
    return stages.select_finetune_data(root, selection=selection, ids=ids)


@task(tags=[GPU_TAG], retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def finetune_task(root: str, dataset: str, generator: str, options: dict[str, Any]) -> dict[str, Any]:
    """Finetune; returns the adapter URI."""
    return stages.finetune_generator(root, dataset, generator=generator, options=options)


@task(tags=[GPU_TAG], retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def repair_task(root: str, options: dict[str, Any]) -> dict[str, Any]:
    """Repair; returns the decisions."""
    return stages.repair_images(root, **options)


@task(tags=[GPU_TAG], retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def compare_task(root: str, prompts: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Compare two checkpoints; returns the statistics summary."""
    return stages.compare_checkpoints(root, prompts, progress=_progress("compare"), **options)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def manifest_task(root: str, ids: list[str] | None = None) -> dict[str, Any]:
    """Write manifest.jsonl; reports the planned ``ids`` with neither a valid record nor an error record."""
    return stages.write_manifest(root, ids)


# ---------------------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------------------


def _best_table(root: str, ids: Sequence[str]) -> list[dict[str, Any]]:
    from flows.storage import RunStore

    best: dict[str, dict[str, Any]] = {}
    wanted = set(ids)
    for r in RunStore(root).records():
        if r.id in wanted and r.scores:
            row = best.get(r.prompt)
            if row is None or r.scores["overall"] > row["overall"]:
                best[r.prompt] = {"prompt": r.prompt, "seed": r.seed, **{k: round(v, 4) for k, v in r.scores.items()}}
    return [best[p] for p in sorted(best)]


@flow(name="generate-and-score")
def generate_and_score(
    root: str,
    prompts: list[str],
    generator: str = "synthetic",
    lora: str | None = None,
    rahf: str = "rahf-tiny",
    per_prompt: int = 8,
    batch_size: int = 16,
    device: str = "cpu",
    chunk_prompts: int = 8,
) -> dict[str, Any]:
    """Generate ``per_prompt`` images per prompt and score them with RAHF; prompts go out in chunks of
    ``chunk_prompts`` as separate tasks, so a Dask (or any parallel) task runner fans them out."""
    swept = stages.sweep_temps(root)
    options = dict(generator=generator, lora=lora, rahf=rahf, per_prompt=per_prompt, batch_size=batch_size)
    chunks = [prompts[i : i + chunk_prompts] for i in range(0, len(prompts), chunk_prompts)]
    futures = [generate_and_score_task.submit(root, chunk, {**options, "device": device}) for chunk in chunks]
    parts = [f.result() for f in futures]
    report = {k: [x for p in parts for x in p[k]] for k in ("ids", "generated", "scored", "failed", "missing")}
    report["skipped"] = sum(p["skipped"] for p in parts)
    report["swept"] = swept
    create_table_artifact(_best_table(root, report["ids"]), key="best-per-prompt", description="best image per prompt")
    report["manifest"] = manifest_task(root, report["ids"])
    return report


@flow(name="select-finetune-data")
def select_finetune_data(root: str, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Best of N per prompt above the thresholds -> an image folder for finetuning (runs on a schedule)."""
    summary = select_task(root, selection or {}, None)
    s = summary["selection"]
    create_markdown_artifact(
        f"Selected **{len(summary['selected'])}** images from {summary['candidates']} candidates "
        f"({s.get('prompts_without_selection', 0)} prompts without a selection) -> `{summary['dataset']}`",
        key="selection",
    )
    return summary


@flow(name="finetune-generator")
def finetune_generator(
    root: str, dataset: str, generator: str = "synthetic", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """LoRA-finetune the generator on a selected folder."""
    return finetune_task(root, dataset, generator, options or {})


@flow(name="repair-images")
def repair_images(
    root: str,
    ids: list[str] | None = None,
    below: float = 0.8,
    generator: str = "synthetic",
    lora: str | None = None,
    rahf: str = "rahf-tiny",
    options: dict[str, Any] | None = None,
    limit: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Repair named images, or those below a plausibility threshold (on demand)."""
    stages.sweep_temps(root)
    report = repair_task(
        root,
        dict(
            ids=ids, below=below, generator=generator, lora=lora, rahf=rahf, options=options, limit=limit, device=device
        ),
    )
    manifest_task(root)
    return report


@flow(name="compare-checkpoints")
def compare_checkpoints(
    root: str,
    prompts: list[str],
    generator: str = "synthetic",
    lora_a: str | None = None,
    lora_b: str | None = None,
    generator_b: str | None = None,
    rahf: str = "rahf-tiny",
    per_prompt: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Same prompts and seeds through checkpoints A and B; paired statistics and the report."""
    stages.sweep_temps(root)
    options = dict(
        generator=generator,
        lora_a=lora_a,
        lora_b=lora_b,
        generator_b=generator_b,
        rahf=rahf,
        per_prompt=per_prompt,
        device=device,
    )
    summary = compare_task(root, prompts, options)
    create_markdown_artifact(comparison_markdown(summary), key="comparison")
    return summary


def comparison_markdown(summary: dict[str, Any]) -> str:
    """The comparison summary as a markdown table (RAHF scores, and the ground truth when known)."""
    lines = ["| score | A | B | B − A (95 % CI) | win / tie / loss |", "|---|---:|---:|---:|---:|"]
    for name, s in summary["scores"].items():
        lines.append(
            f"| {name} | {s['mean_a']:.4f} | {s['mean_b']:.4f} | {s['diff']:+.4f} ({s['ci_low']:+.4f}, "
            f"{s['ci_high']:+.4f}) | {s['wins']} / {s['ties']} / {s['losses']} |"
        )
    if summary.get("ground_truth"):
        lines += ["", "Ground truth (synthetic world):", "", "| measure | A | B | B − A |", "|---|---:|---:|---:|"]
        for name, s in summary["ground_truth"].items():
            lines.append(f"| {name} | {s['mean_a']:.4f} | {s['mean_b']:.4f} | {s['diff']:+.4f} |")
    if summary.get("report"):
        lines += ["", f"Report: `{summary['report']}`"]
    return "\n".join(lines)


@flow(name="feedback-loop")
def feedback_loop(
    root: str,
    prompts: list[str],
    generator: str = "synthetic",
    rahf: str = "rahf-tiny",
    per_prompt: int = 8,
    selection: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    repair: dict[str, Any] | None = None,
    compare_per_prompt: int = 4,
    repair_below: float = 0.8,
    repair_limit: int | None = 16,
    device: str = "cpu",
    gpu_slots: int | None = None,
) -> dict[str, Any]:
    """generate -> score -> select -> finetune -> compare (base vs finetuned) -> repair the worst.

    When no image clears the selection thresholds, finetuning and the comparison are skipped (``summary["skipped"]``
    says why; ``finetune`` and ``compare`` are None) and the loop still repairs and writes the manifest.
    ``summary["generate"]`` counts the planned images (``ids``), the ``failed`` ones (error records) and the
    ``missing`` ones (neither a valid record nor an error record; see ``summary["manifest"]["missing"]``).

    ``gpu_slots`` creates the ``gpu`` tag's concurrency limit when it is missing (for workers that share GPUs);
    a tagged task then pays about 2 s to acquire its slot, so single-machine runs leave it unset.
    """
    logger = get_run_logger()
    swept = stages.sweep_temps(root)
    if gpu_slots:
        ensure_gpu_limit(gpu_slots)
    gen_report = generate_and_score_task(
        root, prompts, dict(generator=generator, rahf=rahf, per_prompt=per_prompt, device=device)
    )
    logger.info(
        "generated %d, scored %d, skipped %d finished, %d failed",
        len(gen_report["generated"]),
        len(gen_report["scored"]),
        gen_report["skipped"],
        len(gen_report["failed"]),
    )
    create_table_artifact(_best_table(root, gen_report["ids"]), key="best-per-prompt")
    selected = select_task(root, selection or {}, gen_report["ids"])
    tuned = comparison = None
    skipped: dict[str, str] = {}
    if selected["selected"]:
        tuned = finetune_task(root, selected["dataset"], generator, finetune or {})
        comparison = compare_task(
            root,
            prompts,
            dict(generator=generator, lora_b=tuned["adapter"], rahf=rahf, per_prompt=compare_per_prompt, device=device),
        )
    else:
        logger.warning("no image cleared the selection thresholds: finetuning and the comparison are skipped")
        skipped = {"finetune": NOTHING_SELECTED, "compare": NOTHING_SELECTED}
    repaired = repair_task(
        root,
        dict(below=repair_below, generator=generator, rahf=rahf, options=repair, limit=repair_limit, device=device),
    )
    manifest = manifest_task(root, gen_report["ids"])
    summary = {
        "root": root,
        "swept": swept,
        "generate": {k: (len(v) if isinstance(v, list) else v) for k, v in gen_report.items()},
        "selection": {"selected": len(selected["selected"]), "dataset": selected["dataset"]},
        "finetune": {k: v for k, v in tuned.items() if k in ("adapter", "reused", "seconds", "flaws")}
        if tuned
        else None,
        "compare": comparison,
        "repair": {k: (len(v) if isinstance(v, list) else v) for k, v in repaired.items()},
        "manifest": manifest,
        "skipped": skipped,
    }
    create_markdown_artifact(loop_markdown(summary), key="feedback-loop")
    return summary


def loop_markdown(summary: dict[str, Any]) -> str:
    g, s, r = summary["generate"], summary["selection"], summary["repair"]
    lines = [
        f"# Feedback loop — `{summary['root']}`",
        f"- generated {g['generated']}, scored {g['scored']}, reused {g['skipped']} finished images, "
        f"{g['failed']} failed, {g.get('missing', 0)} missing",
        f"- selected {s['selected']} images -> `{s['dataset']}`",
    ]
    if summary["finetune"]:
        lines.append(f"- adapter `{summary['finetune'].get('adapter')}`")
    for stage, why in (summary.get("skipped") or {}).items():
        lines.append(f"- {stage}: skipped, {why}")
    lines.append(
        f"- repair: {r['accepted']} accepted, {r['rejected']} kept the original, {r['failed']} failed, "
        f"{r['skipped']} already decided"
    )
    if summary["compare"]:
        lines += ["", comparison_markdown(summary["compare"])]
    return "\n".join(lines)
