"""The feedback loop's stages as plain functions over a run store; ``flows.loop`` wraps each in a
Prefect task. They take a :class:`flows.config.LoopConfig`, names, ids and URIs and return the typed results of
:mod:`flows.results`; models are loaded once per process. The first stage that writes a run folder records its
generator and RAHF in ``run.json`` (:func:`flows.config.claim_run_folder`); later ones use those and refuse others.

Resume: an id whose record is valid is finished and never regenerated or rescored; an unreadable record counts as
unfinished and is redone. An image written before a kill but not yet scored is scored from its stored file, not
regenerated. A failed item gets an error record under ``errors/<id>.json`` (retried by the next run) and its batch
goes on. Side files that do not parse (error records, repair decisions) are logged by key and skipped or redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.atomic import sweep_stale_temps
from common.keys import (
    ERRORS,
    IMAGES,
    REPAIRS,
    compare_report_key,
    compare_side_key,
    compare_summary_key,
    comparison_key,
    dataset_run_key,
    error_key,
    finetune_adapter_key,
    finetune_data_key,
    finetune_key,
    finetune_summary_key,
    heatmap_key,
    id_of_image_key,
    id_of_repair_key,
    image_key,
    repair_error_key,
    repair_key,
    repair_summary_key,
    selection_key,
)
from common.names import HEATMAP_NAMES
from common.records import ImageRecord, Scorer, ScoringFailure
from flows.claims import Claims
from flows.config import RUN_FILE, LoopConfig, claim_run_folder, resolve_dataset_generator
from flows.results import (
    CompareResult,
    FinetuneResult,
    GenerateResult,
    ManifestResult,
    RepairPair,
    RepairStageResult,
    RepairTruth,
    SelectionTruth,
    SelectResult,
)
from flows.storage import RunStore
from generators.base import Generator, decode_png, encode_png

log = logging.getLogger(__name__)

HEATMAPS = HEATMAP_NAMES
CLAIM_POLL_S = 0.5  # how often a run waits for images another process has claimed
Progress = Callable[[int, int], None]  # (done, total)

# ---------------------------------------------------------------------------------------------------------
# Models, loaded once per worker process
# ---------------------------------------------------------------------------------------------------------

_MODELS: dict[tuple, Any] = {}
# Concurrent tasks of one process (the thread-pool task runner's chunks) must build a model once: two threads
# building a seeded random-init preset at once interleave the global RNG and get different weights.
_MODELS_LOCK = threading.RLock()


def load_generator(name: str, lora: str | None = None, device: str = "cpu") -> Generator:
    """A generator by registered name, folder or hub id (``generators.registry.build_generator``), cached per
    (name, adapter, device). An adapter on S3 is copied to a local cache folder first."""
    from generators.registry import build_generator

    key = ("generator", name, lora, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            local = _local_folder(lora) if lora else None
            _MODELS[key] = build_generator(name, lora=local, device=device)
        return _MODELS[key]


def load_scorer(source: str, device: str = "cpu", batch_size: int = 16) -> Scorer:
    """A scorer by registered name (a RAHF preset, the demo model, ``ground-truth``), RAHF folder or hub id
    (``generators.registry.build_scorer``); cached."""
    from generators.registry import build_scorer

    key = ("scorer", source, device, batch_size)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build_scorer(source, device=device, batch_size=batch_size)
        return _MODELS[key]


def _local_folder(uri: str) -> str:
    """A local path for a folder URI: itself when local, else a cached copy of the remote folder."""
    store = RunStore(uri)
    if store.local:
        return uri
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]  # stable across processes (hash() is salted)
    cache = Path(tempfile.gettempdir()) / "richfeedback-adapters" / key
    for key in store.list(""):
        target = cache / key
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.read_bytes(key))
    return str(cache)


# ---------------------------------------------------------------------------------------------------------
# Generate and score
# ---------------------------------------------------------------------------------------------------------


def _heatmap_png(m: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(m, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def read_heatmap(store: RunStore, key: str) -> np.ndarray:
    """A stored heatmap (``heatmap_key(id, name)``) as (H, W) float32 in [0, 1]."""
    return np.asarray(Image.open(io.BytesIO(store.read_bytes(key))), np.float32) / 255.0


def jobs_of(prompts: Sequence[str], per_prompt: int, seed_offset: int = 0) -> list[tuple[str, int]]:
    """(prompt, seed) of every image, prompt-major: seeds ``seed_offset .. seed_offset + per_prompt - 1``."""
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    return [(p, seed_offset + k) for p in prompts for k in range(per_prompt)]


def generate_and_score(
    root: str,
    prompts: Sequence[str],
    config: LoopConfig | None = None,
    *,
    lora: str | None = None,
    seed_offset: int = 0,
    progress: Progress | None = None,
) -> GenerateResult:
    """Generate ``config.per_prompt`` images per prompt, score them, write images, heatmaps and records.

    The result's ``ids`` are all planned ids (prompt-major); ``missing`` holds the ids that ended with neither a
    record nor an error record (a generator that returned another id than planned, say), none on a complete run.
    """
    config = config or LoopConfig()
    generator, rahf = claim_run_folder(root, config.generator, config.rahf)
    store = RunStore(root)
    gen = load_generator(generator, lora, config.device)
    scorer = load_scorer(rahf, config.device, config.batch_size)
    jobs = jobs_of(prompts, config.per_prompt, seed_offset)
    ids = [gen.expected_id(p, s) for p, s in jobs]
    finished = store.has_records(ids)
    images_there = {id_of_image_key(k) for k in store.list(IMAGES)} - {None}
    todo = [(j, i) for j, i in zip(jobs, ids) if i not in finished]
    report: dict[str, Any] = {"generated": [], "scored": [], "failed": []}
    done = len(ids) - len(todo)
    if progress:
        progress(done, len(ids))
    claims = Claims(store, config.claim_ttl_s)
    if cleared := claims.clear_finished(finished):
        log.info("cleared %d abandoned claims of finished images", len(cleared))
    by_others: set[str] = set()  # finished by another process while this one ran
    pending = list(dict.fromkeys(todo))  # a repeated prompt plans the same id twice: do it once
    while pending:
        waiting: list[tuple[tuple[str, int], str]] = []
        for start in range(0, len(pending), config.batch_size):
            batch = pending[start : start + config.batch_size]
            mine, busy = claims.acquire(i for _, i in batch)
            try:
                meanwhile = store.has_records(mine)  # finished between the listing and the claim
                by_others |= meanwhile
                work = [(j, i) for j, i in batch if i in set(mine) - meanwhile]
                items = _images_for(store, gen, work, images_there, report)
                _score_and_record(store, scorer, gen, items, report)
            finally:
                claims.release(mine)
            waiting += [(j, i) for j, i in batch if i in set(busy)]
            done += len(batch) - len(busy)
            if progress:
                progress(done, len(ids))
        if waiting:  # claimed by another live process: wait for its records, take over what it abandons
            time.sleep(CLAIM_POLL_S)
            now_done = store.has_records(i for _, i in waiting)
            by_others |= now_done
            done += len(now_done)
            images_there = {k.removeprefix("images/").removesuffix(".png") for k in store.list("images")}
        pending = [(j, i) for j, i in waiting if i not in by_others]
    if claims.taken_over:
        log.info("took over %d abandoned claims", len(claims.taken_over))
    accounted = finished | by_others | set(report["scored"]) | set(report["failed"])
    missing = [i for i in ids if i not in accounted]
    if missing:
        log.error("%d of %d planned images have neither a record nor an error record", len(missing), len(ids))
    return GenerateResult(
        ids=tuple(ids),
        generated=tuple(report["generated"]),
        scored=tuple(report["scored"]),
        skipped=len(ids) - len(todo) + len(by_others),
        failed=tuple(report["failed"]),
        missing=tuple(missing),
        generator=generator,
        rahf=rahf,
    )


def _images_for(store: RunStore, gen: Generator, batch, images_there: set[str], report) -> list[tuple[Any, ...]]:
    """(id, GeneratedImage or None, image, prompt, seed) for a batch: stored images are read back, the rest
    generated and written at once (so a kill after this point never costs a regeneration)."""
    out, missing = [], []
    for (prompt, seed), id_ in batch:
        if id_ in images_there:
            try:
                out.append((id_, None, decode_png(store.read_bytes(image_key(id_))), prompt, seed))
                continue
            except Exception as e:  # a corrupt stored image is regenerated
                log.warning("stored image %s unreadable (%s); regenerating", id_, e)
        missing.append(((prompt, seed), id_))
    made = []
    if missing:
        try:
            made = gen.generate([p for (p, _), _ in missing], 1, seeds=[s for (_, s), _ in missing])
        except Exception:  # find the bad items one by one; the rest of the batch goes on
            log.warning("generation failed for a batch of %d; retrying item by item", len(missing))
            for (prompt, seed), id_ in missing:
                try:
                    made += gen.generate([prompt], 1, seeds=[seed])
                except Exception as e:
                    _error_record(store, id_, prompt, seed, gen, f"generation: {type(e).__name__}: {e}", report)
        for g in made:
            store.write_bytes(image_key(g.id), encode_png(g.image))
            report["generated"].append(g.id)
            out.append((g.id, g, g.image, g.prompt, g.seed))
    return out


def _score_and_record(store: RunStore, scorer: Scorer, gen: Generator, items, report) -> None:
    if not items:
        return
    feedback = scorer.score([it[3] for it in items], [it[2] for it in items], heatmaps=HEATMAPS, errors="return")
    identity = getattr(scorer, "identity", None)
    for (id_, g, image, prompt, seed), fb in zip(items, feedback):
        if g is not None:
            record = ImageRecord.from_generated(g, store.uri(image_key(id_)))
        else:
            record = _record_from_image(store, gen, id_, image, prompt, seed)
        if isinstance(fb, ScoringFailure):
            record.error = f"scoring: {fb.error}"
            store.write_json(error_key(id_), json.loads(record.to_json()))
            report["failed"].append(id_)
            continue
        record.scores = {k: float(v) for k, v in fb.scores.items()}
        record.keywords = list(fb.misaligned_keywords)
        record.rahf = identity
        for name, m in fb.heatmaps.items():
            record.heatmap_uris[name] = store.write_bytes(heatmap_key(id_, name), _heatmap_png(m))
        store.put_record(record)  # last: its existence means the item is finished
        if store.exists(error_key(id_)):
            store.delete(error_key(id_))
        report["scored"].append(id_)


def _record_from_image(
    store: RunStore, gen: Generator, id_: str, image: Image.Image, prompt: str, seed: int
) -> ImageRecord:
    """The record of an image written before a kill: provenance from the generator (its id matched), truth
    (synthetic world) from the image itself."""
    params = gen.params("text-to-image")
    record = ImageRecord(id_, prompt, seed, gen.identity.to_dict(), params, store.uri(image_key(id_)))
    if "scene" in image.info:
        from generators.synthetic import ground_truth

        record.truth = {k: v for k, v in ground_truth(image).items() if k != "maps"}
    return record


def _error_record(store: RunStore, id_: str, prompt: str, seed: int, gen: Generator, error: str, report) -> None:
    rec = ImageRecord(id_, prompt, seed, gen.identity.to_dict(), gen.params("text-to-image"), error=error)
    store.write_json(error_key(id_), json.loads(rec.to_json()))
    report["failed"].append(id_)


# ---------------------------------------------------------------------------------------------------------
# Select, finetune
# ---------------------------------------------------------------------------------------------------------


def select_finetune_data(
    root: str, config: LoopConfig | None = None, *, ids: Sequence[str] | None = None
) -> SelectResult:
    """Best of N per prompt above the thresholds (``config.selection``) -> ``<root>/finetune-data`` (image folder
    + metadata.jsonl, and the run's ``run.json``: the dataset remembers its generator).

    ``ids`` restricts the candidates (e.g. one generation's ids); by default every generated record. When the
    candidates carry the synthetic world's ground truth, ``truth`` measures the selection in truth
    (:class:`flows.results.SelectionTruth`); it is None otherwise.
    """
    from finetune.dataset import export_dataset
    from finetune.select import select_best

    config = config or LoopConfig()
    store = RunStore(root)
    wanted = set(ids) if ids is not None else None
    records = [r for r in store.records() if r.stage == "generated" and (wanted is None or r.id in wanted)]
    result = select_best(records, config.selection)
    data_uri = store.uri(finetune_data_key())
    heatmap = "implausibility" if config.finetune.get("heatmap_weighting") else None  # LoRA's per-region weights
    exported = export_dataset(result.selected, data_uri, heatmap=heatmap)
    if store.exists(RUN_FILE):
        store.write_bytes(dataset_run_key(), store.read_bytes(RUN_FILE))
    summary = result.summary()
    out = SelectResult(
        dataset=data_uri,
        selected=tuple(r.id for r in result.selected),
        candidates=len(records),
        prompts_without_selection=int(summary.get("prompts_without_selection", 0)),
        selection=summary,
        export=exported.to_dict(),
        truth=_selection_truth(records, result.selected, config),
    )
    store.write_json(selection_key(), out.to_dict())
    return out


def _selection_truth(
    candidates: Sequence[ImageRecord], selected: Sequence[ImageRecord], config: LoopConfig
) -> SelectionTruth | None:
    """The selection measured in truth (:func:`compare.loop_gain.selection_gain`, ``config.compare.n_boot``
    resamples, seed 0); None unless every candidate of a selected prompt carries the synthetic world's truth."""
    from compare.loop_gain import selection_gain

    gain = selection_gain(candidates, [r.id for r in selected], n_boot=config.compare.n_boot, seed=0)
    if gain is None:
        return None
    sel = config.selection
    by = sel.score if sel.weights is None else " + ".join(f"{w:g} × {n}" for n, w in sel.ranking_weights().items())
    return SelectionTruth(gain["prompts"], gain["images"], by, gain["n_boot"], gain["scores"])


def finetune_generator(root: str, dataset: str, config: LoopConfig | None = None) -> FinetuneResult:
    """LoRA finetuning (or the synthetic world's fit) on ``dataset`` with ``config.finetune`` (LoraTrainConfig
    fields); the adapter lands in ``<root>/finetune/adapter``. The generator is the dataset's (its ``run.json`` or
    metadata); ``config.generator``, when set, must match it; a dataset that records none uses ``config.generator``,
    else the run folder's. A finished adapter is reused: one with a readable ``finetune/summary.json``, which
    is written after the adapter (adapter files without it are the remains of a killed run and are trained again).
    """
    from finetune.lora import ADAPTER_DIR, LoraTrainConfig, finetune
    from finetune.synthetic import SyntheticFitConfig, fit_synthetic

    config = config or LoopConfig()
    generator = resolve_dataset_generator(dataset, config.generator)
    if generator is None:
        generator = claim_run_folder(root, None, config.rahf, write=False)[0]
    store = RunStore(root)
    prefix = finetune_adapter_key(ADAPTER_DIR)
    existing = store.list(prefix)
    finished = _finished_finetune(store)
    if existing and finished is not None:
        return FinetuneResult(store.uri(prefix), generator, reused=True, seconds=finished.get("seconds"))
    local = store.local
    work = Path(store.uri(finetune_key())) if local else Path(tempfile.mkdtemp(prefix="richfeedback-ft-"))
    if generator == "synthetic":  # the synthetic world's fit has its own stage config (LoRA options do not apply)
        cfg: LoraTrainConfig | SyntheticFitConfig = SyntheticFitConfig.from_options(dataset, str(work), config.finetune)
        summary = fit_synthetic(cfg)
    else:
        cfg = LoraTrainConfig(dataset, str(work), generator=generator, **config.finetune)
        summary = finetune(cfg)
    if not local:  # resumable checkpoints stay local; the finished adapter goes to the store
        for f in sorted((work / ADAPTER_DIR).rglob("*")):
            if f.is_file():
                store.write_bytes(f"{prefix}/{f.relative_to(work / ADAPTER_DIR).as_posix()}", f.read_bytes())
    details = {k: v for k, v in summary.items() if k not in ("losses", "adapter")}
    details["config"] = asdict(cfg)
    seconds = summary.get("seconds")
    out = FinetuneResult(store.uri(prefix), generator, False, float(seconds) if seconds is not None else None, details)
    store.write_json(finetune_summary_key(), out.to_dict())
    return out


def _finished_finetune(store: RunStore) -> dict[str, Any] | None:
    """The summary of a finished finetuning, or None."""
    try:
        summary = store.read_json(finetune_summary_key())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("unreadable %s (%s); finetuning again", store.uri(finetune_summary_key()), e)
        return None
    return summary if isinstance(summary, dict) and "adapter" in summary else None


# ---------------------------------------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------------------------------------


OUTCOME_ACCEPTED, OUTCOME_REJECTED, OUTCOME_NO_MASK = "accepted", "rejected", "no-mask"


def _outcome(decision: Any) -> str | None:
    """The outcome of a stored repair decision (older decisions carry only ``accepted`` and ``reason``)."""
    from inpainting.repair import NOTHING_TO_REPAIR

    if not isinstance(decision, dict):
        return None
    if decision.get("outcome") in (OUTCOME_ACCEPTED, OUTCOME_REJECTED, OUTCOME_NO_MASK):
        return decision["outcome"]
    if decision.get("reason") == NOTHING_TO_REPAIR:
        return OUTCOME_NO_MASK
    return OUTCOME_ACCEPTED if decision.get("accepted") else OUTCOME_REJECTED


def repair_images(
    root: str,
    config: LoopConfig | None = None,
    *,
    ids: Sequence[str] | None = None,
    lora: str | None = None,
    progress: Progress | None = None,
) -> RepairStageResult:
    """Best-of-N repair (``config.repair``) of the generated records whose predicted repair score is below
    ``config.repair_below``, worst first, at most ``config.repair_limit``; ``ids`` restricts the candidates (the
    ids of one run, as selection takes them), by default every generated record of the folder.

    Each decision lands in ``repairs/<id>.json`` with its ``outcome``: ``accepted`` (the repair becomes a record
    of stage ``repaired`` with ``parent_id``), ``rejected`` (no candidate beat the original) or ``no-mask`` (the
    heatmap marked nothing: nothing inpainted). Accepted and rejected ids are skipped on rerun; a no-mask id is
    tried again (a mask costs nothing). When the records carry the synthetic world's truth, the result holds the
    true scores of the considered images before and after (:class:`flows.results.RepairTruth`); it is also
    written to ``repair.json``."""
    from inpainting.repair import NOTHING_TO_REPAIR, repair

    config = config or LoopConfig()
    generator, rahf = claim_run_folder(root, config.generator, config.rahf)
    rconfig = config.repair
    store = RunStore(root)
    records = {r.id: r for r in store.records() if r.stage == "generated" and not r.error}
    not_found: list[str] = []
    if ids is not None:
        not_found = [i for i in dict.fromkeys(ids) if i not in records]
        pool = [records[i] for i in dict.fromkeys(ids) if i in records]
    else:
        pool = list(records.values())
    chosen = sorted(
        (r for r in pool if r.scores.get(rconfig.score, 1.0) < config.repair_below),
        key=lambda r: (r.scores.get(rconfig.score, 1.0), r.id),
    )
    chosen = chosen[: config.repair_limit] if config.repair_limit is not None else chosen
    decisions, _ = read_json_files(store, REPAIRS)  # a decision that does not parse is made again
    by_parent = {id_of_repair_key(k): d for k, d in decisions.items() if id_of_repair_key(k) is not None}
    decided = {i for i, d in by_parent.items() if _outcome(d) in (OUTCOME_ACCEPTED, OUTCOME_REJECTED)}
    out: dict[str, list] = {"accepted": [], "rejected": [], "no_mask": [], "failed": []}
    todo = [r for r in chosen if r.id not in decided]
    skipped = len(chosen) - len(todo)
    gen = load_generator(generator, lora, config.device) if todo else None
    scorer = load_scorer(rahf, config.device, config.batch_size) if todo else None
    if progress:
        progress(0, len(todo))
    for n, rec in enumerate(todo, start=1):
        try:
            image = decode_png(store.read_bytes(image_key(rec.id)))
            heat = read_heatmap(store, heatmap_key(rec.id, rconfig.map))  # the map the repair masks by
            result = repair(image, rec.prompt, gen, scorer, rconfig, heatmap=heat, original_scores=rec.scores)
        except Exception as e:
            log.exception("repair of %s failed", rec.id)
            store.write_json(repair_error_key(rec.id), {"id": rec.id, "error": str(e)})
            out["failed"].append(rec.id)
            if progress:
                progress(n, len(todo))
            continue
        decision = {"parent_id": rec.id, **result.summary()}
        if result.accepted:
            cand = result.accepted_candidate
            new = ImageRecord.from_generated(cand.generated, store.uri(image_key(cand.generated.id)))
            new.stage, new.parent_id, new.scores, new.rahf = "repaired", rec.id, cand.scores, rec.rahf
            store.write_bytes(image_key(new.id), encode_png(cand.generated.image))
            store.put_record(new)
            decision.update(repaired_id=new.id, outcome=OUTCOME_ACCEPTED)
            out["accepted"].append(RepairPair(rec.id, new.id))
        elif result.reason == NOTHING_TO_REPAIR:
            decision["outcome"] = OUTCOME_NO_MASK
            out["no_mask"].append(rec.id)
        else:
            decision["outcome"] = OUTCOME_REJECTED
            out["rejected"].append(rec.id)
        store.write_json(repair_key(rec.id), decision)  # last: the decision marks the id as done
        by_parent[rec.id] = decision
        if progress:
            progress(n, len(todo))
    report = RepairStageResult(
        considered=len(chosen),
        accepted=tuple(out["accepted"]),
        rejected=tuple(out["rejected"]),
        no_mask=tuple(out["no_mask"]),
        failed=tuple(out["failed"]),
        skipped=skipped,
        not_found=tuple(not_found),
        truth=_repair_truth(store, chosen, by_parent),
    )
    store.write_json(repair_summary_key(), report.to_dict())
    return report


def _repair_truth(store: RunStore, chosen: Sequence[ImageRecord], decisions: dict[str, Any]) -> RepairTruth | None:
    """True scores of the decided images before and after their repair (after = the accepted candidate, else the
    original); None unless every one of them (and every accepted candidate) carries the synthetic world's truth."""
    pairs = []
    for rec in chosen:
        d = decisions.get(rec.id)
        outcome = _outcome(d)
        if outcome is None:
            continue  # failed: no decision
        after = rec
        if outcome == OUTCOME_ACCEPTED:
            try:
                after = store.get_record(d["repaired_id"])
            except (OSError, KeyError, ValueError):
                return None
        if rec.truth is None or after.truth is None:
            return None
        pairs.append((rec.truth, after.truth, outcome == OUTCOME_ACCEPTED))
    if not pairs:
        return None

    def mean(side: int, key: str) -> float:
        values = [p[side][key] if key == "implausible_area" else p[side]["scores"][key] for p in pairs]
        return float(np.mean(values))

    return RepairTruth(
        images=len(pairs),
        implausible_area_before=mean(0, "implausible_area"),
        implausible_area_after=mean(1, "implausible_area"),
        plausibility_before=mean(0, "plausibility"),
        plausibility_after=mean(1, "plausibility"),
        overall_before=mean(0, "overall"),
        overall_after=mean(1, "overall"),
        accepted=sum(p[2] for p in pairs),
        truly_worse=sum(p[2] and p[1]["implausible_area"] > p[0]["implausible_area"] + 1e-9 for p in pairs),
    )


# ---------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------


def read_json_files(store: RunStore, folder: str) -> tuple[dict[str, Any], list[str]]:
    """The JSON files under ``folder`` as ``{key: value}``, and the keys of those that cannot be read or parsed
    (each logged at WARNING with its location), sorted."""
    values: dict[str, Any] = {}
    bad: list[str] = []
    for key in store.list(folder):
        try:
            values[key] = store.read_json(key)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            log.warning("skipping unreadable %s (%s: %s)", store.uri(key), type(e).__name__, e)
            bad.append(key)
    return values, bad


def write_manifest(root: str, ids: Sequence[str] | None = None) -> ManifestResult:
    """``manifest.jsonl``: every valid record (generated and repaired) and every error record, one line per id.

    The result's ``bad_files`` are the keys that did not parse; ``missing`` lists the ids of ``ids`` (the planned
    images) that have neither a valid record nor an error record, sorted (none without ``ids``).
    """
    store = RunStore(root)
    read = store.records()
    have = set(read.ids)
    errors = []
    side, bad = read_json_files(store, ERRORS)
    for key, d in side.items():
        if not (isinstance(d, dict) and "prompt" in d):
            continue  # a repair's error note, not an image's
        try:
            rec = ImageRecord(**d)
        except TypeError as e:
            log.warning("skipping unreadable %s (%s)", store.uri(key), e)
            bad.append(key)
            continue
        if rec.id not in have:
            errors.append(rec)
    uri = store.write_manifest(list(read.records) + errors)
    accounted = have | {r.id for r in errors}
    missing = sorted({i for i in ids if i not in accounted}) if ids is not None else []
    return ManifestResult(
        manifest=uri,
        records=len(read.records),
        errors=len(errors),
        bad_files=tuple(sorted([k for k, _ in read.bad] + bad)),
        missing=tuple(missing),
    )


# ---------------------------------------------------------------------------------------------------------
# Stale temporary files
# ---------------------------------------------------------------------------------------------------------


def sweep_temps(root: str, older_than_s: float = 60.0) -> int:
    """Remove temporary files that killed writers left under a local run root (older than ``older_than_s``, so a
    live writer's file stays); returns how many. Object stores have none: their writes are single PUTs."""
    store = RunStore(root)
    if not store.local:
        return 0
    removed = sweep_stale_temps(store.path, older_than_s=older_than_s)
    if removed:
        log.info("removed %d stale temporary files under %s", len(removed), root)
    return len(removed)


# ---------------------------------------------------------------------------------------------------------
# Compare checkpoints
# ---------------------------------------------------------------------------------------------------------


def compare_checkpoints(
    root: str,
    prompts: Sequence[str],
    config: LoopConfig | None = None,
    *,
    lora_a: str | None = None,
    lora_b: str | None = None,
    generator_b: str | None = None,
    report_dir: str | None = None,
    progress: Progress | None = None,
) -> CompareResult:
    """The same prompts and seeds (``config.compare``) through checkpoint A (the run's generator + ``lora_a``) and
    B (``generator_b`` or the same base, + ``lora_b``), scored by the same RAHF; paired statistics to
    ``compare/comparison.json`` and, for a local run, the HTML report (``compare/report/index.html`` unless
    ``report_dir``). When the images carry ground truth (the synthetic world) the true scores are compared too, with
    the same paired statistics, beside RAHF's in the summary, the JSON and the report."""
    from compare import compare_scores, pair_records, write_report

    config = config or LoopConfig()
    generator, rahf = claim_run_folder(root, config.generator, config.rahf)
    store = RunStore(root)
    sides = {"a": (generator, lora_a), "b": (generator_b or generator, lora_b)}
    records, failed, missing = {}, {}, {}
    for side, (name, lora) in sides.items():
        sub = store.uri(compare_side_key(side))
        side_config = replace(config, generator=name, rahf=rahf, per_prompt=config.compare.per_prompt)
        rep = generate_and_score(
            sub, prompts, side_config, lora=lora, seed_offset=config.compare.seed_offset, progress=progress
        )
        wanted = set(rep.ids)
        records[side] = [r for r in RunStore(sub).records() if r.id in wanted]
        failed[side], missing[side] = len(rep.failed), len(rep.missing)
    pairs = pair_records(records["a"], records["b"])
    stats = compare_scores(pairs, n_boot=config.compare.n_boot, seed=0)
    truth = _truth_comparison(pairs, stats)
    store.write_json(comparison_key(), {**stats.to_dict(), "ground_truth": truth})
    report = None
    if report_dir or store.local:
        target = report_dir or store.uri(compare_report_key())
        title = "Checkpoint comparison"
        report = str(write_report(pairs, stats, target, title=title, label_a="before", label_b="after"))
    out = CompareResult(
        a={"generator": sides["a"][0], "lora": lora_a},
        b={"generator": sides["b"][0], "lora": lora_b},
        pairs=len(pairs),
        planned=len(prompts) * config.compare.per_prompt,
        failed=failed,
        missing=missing,
        scores={k: asdict(v) for k, v in stats.scores.items()},
        ground_truth=truth,
        report=report,
    )
    store.write_json(compare_summary_key(), out.to_dict())
    return out


def _truth_comparison(pairs, stats) -> dict[str, Any] | None:
    """The true scores and implausible area of A and B, when every record carries the world's truth: per name
    ``stats.truth``'s mean A, mean B, paired difference with its 95 % interval and win / tie / loss, and the share
    of images with any implausible region (means only)."""
    if not pairs or stats.truth is None:
        return None
    keep = ("n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "wins", "ties", "losses")
    out: dict[str, Any] = {n: {k: getattr(s, k) for k in keep} for n, s in stats.truth.scores.items()}
    flawed_a = float(np.mean([p[0].truth["implausible_area"] > 0 for p in pairs]))
    flawed_b = float(np.mean([p[1].truth["implausible_area"] > 0 for p in pairs]))
    out["images_with_implausible_regions"] = {"mean_a": flawed_a, "mean_b": flawed_b, "diff": flawed_b - flawed_a}
    return out
