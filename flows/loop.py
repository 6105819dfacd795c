"""Prefect flows of the feedback loop: each flow only orchestrates tasks, and each task is a few lines
around a plain stage function of :mod:`flows.stages`. Tasks pass names, ids and URIs, never tensors or images.

* ``generate_and_score`` — N images per prompt, scored in batches (progress artifact, console bar).
* ``select_finetune_data`` — best of N per prompt above the thresholds -> an image folder (scheduled daily).
* ``finetune_generator`` — LoRA (or the synthetic world's fit) on a selected folder.
* ``repair_images`` — best-of-N inpainting of the least plausible (or named) images (on demand).
* ``compare_checkpoints`` — same prompts and seeds through A and B, paired statistics and the HTML report.
* ``feedback_loop`` — generate -> score -> select -> finetune -> compare -> repair the worst (the main job).

Every flow takes ``config``: the dict form of :class:`flows.config.LoopConfig` (only the fields to change; checked,
unknown keys refused), so the command line, the flows and ``prefect.yaml`` share one set of defaults. Every flow
returns the typed result of :mod:`flows.results` and publishes its ``to_markdown()`` as an artifact.

GPU work carries the ``gpu`` tag when the tag's concurrency limit exists or ``config["gpu_slots"]`` creates it
(:func:`gpu_tagged`); without a limit the tasks go untagged, since a tagged task pays an API round trip for a
slot even when no limit exists.
Transient I/O is retried inside the run store; tasks add a retry on top, for transient errors only
(:func:`retry_transient`): a refused permission, a missing path or a bad input fails the task at once. Every flow
starts by sweeping the temporary files that killed writers left under a local root.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows import stages
from flows.config import LoopConfig, claim_run_folder
from flows.results import (
    CompareResult,
    FinetuneResult,
    GenerateResult,
    LoopResult,
    ManifestResult,
    RepairStageResult,
    SelectResult,
)
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


def gpu_tagged(slots: int | None = None) -> bool:
    """Whether this flow run's accelerator tasks carry the ``gpu`` tag: yes when the tag's concurrency limit
    exists (made by an earlier run or ``prefect concurrency-limit create gpu N``) or ``slots`` is set (the limit is
    then created with ``slots``). One API call per flow run; an untagged task skips the slot acquisition, an API
    round trip per task that limits nothing when no limit exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(GPU_TAG)
            return True
        except ObjectNotFound:
            if not slots:
                return False
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)
            return True


def on_gpu(task_: Any, tagged: bool) -> Any:
    """``task_`` with the ``gpu`` tag when ``tagged`` (see :func:`gpu_tagged`), else unchanged."""
    return task_.with_options(tags={GPU_TAG}) if tagged else task_


#: A stage that reports progress for longer than this gets a progress artifact, updated at most this often (each
#: update is a call to the Prefect API); a shorter stage makes none.
PROGRESS_EVERY_S = 5.0


def _progress(description: str, every_s: float | None = None):
    """A console bar, and a progress artifact for a stage that runs longer than ``every_s`` seconds (default
    :data:`PROGRESS_EVERY_S`), updated with (done, total). The artifact is made when the first update falls due
    (``every_s`` after the start), then updated at most every ``every_s`` seconds and at the end, so a run of many
    small batches does not pay an API call per batch and a stage of a few seconds pays none. The calls go out from
    a background thread (one at a time; one due while another is in flight is skipped) in a copy of the caller's
    context, so the artifact belongs to the task run and uses its API client (a thread of its own would open a
    client, and load the TLS certificates, per call). The stage never waits for the API, except for the last update
    of an artifact it made, so the task ends with its artifact complete. A failed call is logged, never raised:
    progress is a display."""
    import contextvars
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    every_s = PROGRESS_EVERY_S if every_s is None else every_s
    caller = contextvars.copy_context()  # the task run's context: its run id and its Prefect client
    bar = tqdm(desc=description, unit="img", leave=False)
    sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress-artifact")
    state: dict[str, Any] = {"last": time.monotonic(), "inflight": None, "artifact": None}

    def send(percent: float) -> None:
        try:
            if state["artifact"] is None:
                state["artifact"] = create_progress_artifact(percent, description=description)
            else:
                update_progress_artifact(state["artifact"], percent)
        except Exception as err:  # a display must not fail the stage
            log.warning("progress artifact %r not updated: %s", description, err)

    def submit(percent: float) -> None:
        state["inflight"] = sender.submit(caller.run, send, percent)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        now = time.monotonic()
        busy = state["inflight"] is not None and not state["inflight"].done()
        if done >= total:  # a stage may report several passes, each ending at its total
            if state["inflight"] is not None:  # the stage has (or is making) an artifact: it ends complete, awaited
                submit(100.0 * done / max(1, total))
                state["inflight"].result()
            state["last"] = now
            bar.close()
        elif now - state["last"] >= every_s and not busy:
            submit(100.0 * done / max(1, total))
            state["last"] = now

    return update


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def generate_and_score_task(
    root: str, prompts: list[str], config: LoopConfig, lora: str | None = None
) -> GenerateResult:
    """Generate and score; returns ids and counts."""
    return stages.generate_and_score(root, prompts, config, lora=lora, progress=_progress("generate and score"))


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def select_task(root: str, config: LoopConfig, ids: list[str] | None) -> SelectResult:
    """Select the finetuning set; returns the dataset URI and the selected ids."""
    return stages.select_finetune_data(root, config, ids=ids)


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def finetune_task(root: str, dataset: str, config: LoopConfig) -> FinetuneResult:
    """Finetune; returns the adapter URI."""
    return stages.finetune_generator(root, dataset, config)


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def repair_task(
    root: str, config: LoopConfig, ids: list[str] | None = None, lora: str | None = None
) -> RepairStageResult:
    """Repair; returns the decisions."""
    return stages.repair_images(root, config, ids=ids, lora=lora, progress=_progress("repair"))


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def compare_task(
    root: str,
    prompts: list[str],
    config: LoopConfig,
    lora_a: str | None = None,
    lora_b: str | None = None,
    generator_b: str | None = None,
) -> CompareResult:
    """Compare two checkpoints; returns the statistics summary."""
    return stages.compare_checkpoints(
        root, prompts, config, lora_a=lora_a, lora_b=lora_b, generator_b=generator_b, progress=_progress("compare")
    )


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def manifest_task(root: str, ids: list[str] | None = None) -> ManifestResult:
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


def _claimed(root: str, config: dict[str, Any] | None) -> LoopConfig:
    """The flow's LoopConfig (``config`` over the defaults), its generator and RAHF those of the run folder
    (recorded there now if it records none; a different one raises :class:`flows.config.RunFolderMismatchError`)."""
    cfg = LoopConfig.from_dict(config)
    generator, rahf = claim_run_folder(root, cfg.generator, cfg.rahf)
    return replace(cfg, generator=generator, rahf=rahf)


@flow(name="generate-and-score")
def generate_and_score(
    root: str, prompts: list[str], config: dict[str, Any] | None = None, lora: str | None = None
) -> GenerateResult:
    """Generate ``config["per_prompt"]`` images per prompt and score them with RAHF; prompts go out in chunks of
    ``config["chunk_prompts"]`` as separate tasks, so a Dask (or any parallel) task runner fans them out, and
    merges their results by id. Each image is claimed before it is made (:mod:`flows.claims`), so concurrent runs
    on one root, on any workers, do no image twice. ``config["gpu_slots"]`` creates the ``gpu`` tag's limit."""
    swept = stages.sweep_temps(root)
    cfg = _claimed(root, config)
    generate = on_gpu(generate_and_score_task, gpu_tagged(cfg.gpu_slots))
    chunks = [prompts[i : i + cfg.chunk_prompts] for i in range(0, len(prompts), cfg.chunk_prompts)]
    parts = [f.result() for f in [generate.submit(root, chunk, cfg, lora) for chunk in chunks]]
    ids = [x for p in parts for x in p.ids]
    create_table_artifact(_best_table(root, ids), key="best-per-prompt", description="best image per prompt")
    result = GenerateResult(
        ids=tuple(ids),
        **{k: tuple(x for p in parts for x in getattr(p, k)) for k in ("generated", "scored", "failed", "missing")},
        skipped=sum(p.skipped for p in parts),
        generator=cfg.generator or "",
        rahf=cfg.rahf or "",
        swept=swept,
        manifest=manifest_task(root, ids),
    )
    create_markdown_artifact(result.to_markdown(), key="generate-and-score")
    return result


@flow(name="select-finetune-data")
def select_finetune_data(root: str, config: dict[str, Any] | None = None, ids: list[str] | None = None) -> SelectResult:
    """Best of N per prompt above the thresholds -> an image folder for finetuning (runs on a schedule)."""
    result = select_task(root, LoopConfig.from_dict(config), ids)
    create_markdown_artifact(result.to_markdown(), key="selection")
    return result


@flow(name="finetune-generator")
def finetune_generator(root: str, dataset: str, config: dict[str, Any] | None = None) -> FinetuneResult:
    """LoRA-finetune the generator on a selected folder (the generator the dataset records, by default)."""
    cfg = LoopConfig.from_dict(config)
    result = on_gpu(finetune_task, gpu_tagged(cfg.gpu_slots))(root, dataset, cfg)
    create_markdown_artifact(result.to_markdown(), key="finetune")
    return result


@flow(name="repair-images")
def repair_images(
    root: str, config: dict[str, Any] | None = None, ids: list[str] | None = None, lora: str | None = None
) -> RepairStageResult:
    """Repair the images below ``config["repair_below"]`` (worst first, at most ``config["repair_limit"]``) among
    ``ids``, or among every generated record of the folder (on demand)."""
    stages.sweep_temps(root)
    cfg = _claimed(root, config)
    result = on_gpu(repair_task, gpu_tagged(cfg.gpu_slots))(root, cfg, ids, lora)
    manifest_task(root)
    create_markdown_artifact(result.to_markdown(), key="repair")
    return result


@flow(name="compare-checkpoints")
def compare_checkpoints(
    root: str,
    prompts: list[str],
    config: dict[str, Any] | None = None,
    lora_a: str | None = None,
    lora_b: str | None = None,
    generator_b: str | None = None,
) -> CompareResult:
    """Same prompts and seeds through checkpoints A and B; paired statistics and the report."""
    stages.sweep_temps(root)
    cfg = _claimed(root, config)
    result = on_gpu(compare_task, gpu_tagged(cfg.gpu_slots))(root, prompts, cfg, lora_a, lora_b, generator_b)
    create_markdown_artifact(result.to_markdown(), key="comparison")
    return result


NOTHING_SELECTED_SKIPS = {"finetune": NOTHING_SELECTED, "compare": NOTHING_SELECTED}


@flow(name="feedback-loop")
def feedback_loop(
    root: str, prompts: list[str], config: dict[str, Any] | None = None, gpu_slots: int | None = None
) -> LoopResult:
    """generate -> score -> select -> finetune -> compare (base vs finetuned) -> repair the worst of this run.

    When no image clears the selection thresholds, finetuning and the comparison are skipped (``result.skipped``
    says why; ``finetune`` and ``compare`` are None) and the loop still repairs and writes the manifest.
    ``result.generate`` holds the planned images (``ids``), the ``failed`` ones (error records) and the
    ``missing`` ones (neither a valid record nor an error record; see ``result.manifest.missing``). The result
    is also written to ``loop.json``.

    ``gpu_slots`` creates the ``gpu`` tag's concurrency limit when it is missing (for workers that share GPUs);
    the accelerator tasks carry the tag whenever the limit exists (:func:`gpu_tagged`). A tagged task pays an API
    round trip for its slot, so single-machine runs leave the limit off.
    """
    logger = get_run_logger()
    swept = stages.sweep_temps(root)
    cfg = _claimed(root, config)
    tagged = gpu_tagged(gpu_slots or cfg.gpu_slots)
    generated = on_gpu(generate_and_score_task, tagged)(root, prompts, cfg)
    logger.info(
        "generated %d, scored %d, skipped %d finished, %d failed",
        len(generated.generated),
        len(generated.scored),
        generated.skipped,
        len(generated.failed),
    )
    create_table_artifact(_best_table(root, generated.ids), key="best-per-prompt")
    ids = list(generated.ids)
    selected = select_task(root, cfg, ids)
    tuned = comparison = None
    skipped: dict[str, str] = {}
    if selected.selected:
        tuned = on_gpu(finetune_task, tagged)(root, selected.dataset, cfg)
        comparison = on_gpu(compare_task, tagged)(root, prompts, cfg, None, tuned.adapter, None)
    else:
        logger.warning("no image cleared the selection thresholds: finetuning and the comparison are skipped")
        skipped = dict(NOTHING_SELECTED_SKIPS)
    repaired = on_gpu(repair_task, tagged)(root, cfg, ids)
    manifest = manifest_task(root, ids)
    result = LoopResult(
        root=root,
        generate=generated,
        selection=selected,
        repair=repaired,
        manifest=manifest,
        finetune=tuned,
        compare=comparison,
        skipped=skipped,
        swept=swept,
    )
    from common.keys import loop_summary_key
    from flows.storage import RunStore

    RunStore(root).write_json(loop_summary_key(), result.to_dict())
    create_markdown_artifact(result.to_markdown(), key="feedback-loop")
    return result
