"""The feedback loop's stages as plain functions over a run store; ``flows.loop`` wraps each in a
Prefect task. They take names, ids and URIs and return JSON-able reports; models are loaded once per process.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.atomic import sweep_stale_temps
from flows.storage import RunStore, heatmap_key, image_key
from generators.base import Generator, ImageRecord, decode_png, encode_png

log = logging.getLogger(__name__)

HEATMAPS = ("implausibility", "misalignment")
Progress = Callable[[int, int], None]  # (done, total)

# ---------------------------------------------------------------------------------------------------------
# Models, loaded once per worker process
# ---------------------------------------------------------------------------------------------------------

_MODELS: dict[tuple, Any] = {}


def load_generator(name: str, lora: str | None = None, device: str = "cpu") -> Generator:
    """A generator by name (``generators.build_generator``), cached per (name, adapter, device). An adapter on S3
    is copied to a local cache folder first."""
    from generators import build_generator

    key = ("generator", name, lora, device)
    if key not in _MODELS:
        local = _local_folder(lora) if lora else None
        kwargs = {} if name == "synthetic" else {"device": device}
        _MODELS[key] = build_generator(name, lora=local, **kwargs)
    return _MODELS[key]


def load_scorer(source: str, device: str = "cpu", batch_size: int = 16) -> Any:
    """RAHF from a folder, hub id or preset, or ``ground-truth`` (the synthetic world's oracle); cached."""
    key = ("scorer", source, device, batch_size)
    if key not in _MODELS:
        if source == "ground-truth":
            from generators.synthetic import GroundTruthScorer

            _MODELS[key] = GroundTruthScorer()
        else:
            from rahf.scorer import RAHFScorer
            from rahf.zoo import resolve_model

            _MODELS[key] = RAHFScorer.from_pretrained(resolve_model(source), device=device, batch_size=batch_size)
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
    *,
    generator: str = "synthetic",
    lora: str | None = None,
    rahf: str = "rahf-tiny",
    per_prompt: int = 8,
    seed_offset: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Generate ``per_prompt`` images per prompt, score them, write images, heatmaps and records.

    Returns ``{"ids": [...all ids, prompt-major], "generated": [...], "scored": [...], "skipped": n,
    "failed": [...], "missing": [...]}``: ``missing`` holds the ids that ended with neither a record nor an error
    record (a generator that returned another id than planned, say); an empty list on a complete run.
    """
    store = RunStore(root)
    gen = load_generator(generator, lora, device)
    scorer = load_scorer(rahf, device, batch_size)
    jobs = jobs_of(prompts, per_prompt, seed_offset)
    ids = [gen.expected_id(p, s) for p, s in jobs]
    finished = store.has_records(ids)
    images_there = {k.removeprefix("images/").removesuffix(".png") for k in store.list("images")}
    todo = [(j, i) for j, i in zip(jobs, ids) if i not in finished]
    report: dict[str, Any] = {"ids": ids, "generated": [], "scored": [], "skipped": len(ids) - len(todo), "failed": []}
    done = report["skipped"]
    if progress:
        progress(done, len(ids))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        items = _images_for(store, gen, batch, images_there, report)
        _score_and_record(store, scorer, gen, items, report)
        done += len(batch)
        if progress:
            progress(done, len(ids))
    accounted = finished | set(report["scored"]) | set(report["failed"])
    report["missing"] = [i for i in ids if i not in accounted]
    if report["missing"]:
        log.error("%d of %d planned images have neither a record nor an error record", len(report["missing"]), len(ids))
    return report


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


def _score_and_record(store: RunStore, scorer: Any, gen: Generator, items, report) -> None:
    if not items:
        return
    feedback = scorer.score([it[3] for it in items], [it[2] for it in items], heatmaps=HEATMAPS, errors="return")
    identity = getattr(scorer, "identity", None)
    for (id_, g, image, prompt, seed), fb in zip(items, feedback):
        if g is not None:
            record = ImageRecord.from_generated(g, store.uri(image_key(id_)))
        else:
            record = _record_from_image(store, gen, id_, image, prompt, seed)
        if not hasattr(fb, "scores"):
            record.error = f"scoring: {fb.error}"
            store.write_json(f"errors/{id_}.json", json.loads(record.to_json()))
            report["failed"].append(id_)
            continue
        record.scores = {k: float(v) for k, v in fb.scores.items()}
        record.keywords = list(fb.misaligned_keywords)
        record.rahf = identity
        for name, m in fb.heatmaps.items():
            record.heatmap_uris[name] = store.write_bytes(heatmap_key(id_, name), _heatmap_png(m))
        store.put_record(record)  # last: its existence means the item is finished
        if store.exists(f"errors/{id_}.json"):
            store.delete(f"errors/{id_}.json")
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
    store.write_json(f"errors/{id_}.json", json.loads(rec.to_json()))
    report["failed"].append(id_)


# ---------------------------------------------------------------------------------------------------------
# Select, finetune
# ---------------------------------------------------------------------------------------------------------


def select_finetune_data(
    root: str, *, selection: dict[str, Any] | None = None, ids: Sequence[str] | None = None
) -> dict[str, Any]:
    """Best of N per prompt above the thresholds -> ``<root>/finetune-data`` (image folder + metadata.jsonl).

    ``ids`` restricts the candidates (e.g. one generation's ids); by default every generated record.
    """
    from finetune.dataset import export_dataset
    from finetune.select import SelectionConfig, select_best

    store = RunStore(root)
    config = SelectionConfig(**(selection or {}))
    wanted = set(ids) if ids is not None else None
    records = [r for r in store.records() if r.stage == "generated" and (wanted is None or r.id in wanted)]
    result = select_best(records, config)
    data_uri = store.uri("finetune-data")
    exported = export_dataset(result.selected, data_uri)
    summary = {
        "dataset": data_uri,
        "selected": [r.id for r in result.selected],
        "candidates": len(records),
        "selection": result.summary(),
        "export": exported.to_dict(),
    }
    store.write_json("selection.json", summary)
    return summary


def finetune_generator(
    root: str, dataset: str, *, generator: str = "synthetic", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """LoRA finetuning (or the synthetic world's fit) on ``dataset``; the adapter lands in
    ``<root>/finetune/adapter``. A finished adapter is reused: one with a readable ``finetune/summary.json``, which
    is written after the adapter (adapter files without it are the remains of a killed run and are trained again).
    """
    from finetune.lora import ADAPTER_DIR, LoraTrainConfig, finetune
    from finetune.synthetic import SyntheticFitConfig, fit_synthetic

    store = RunStore(root)
    prefix = f"finetune/{ADAPTER_DIR}"
    existing = store.list(prefix)
    if existing and _finished_finetune(store):
        return {"adapter": store.uri(prefix), "reused": True, "files": len(existing)}
    local = store.local
    work = Path(store.uri("finetune")) if local else Path(tempfile.mkdtemp(prefix="richfeedback-ft-"))
    if generator == "synthetic":  # the synthetic world's fit has its own stage config (no LoRA)
        cfg: LoraTrainConfig | SyntheticFitConfig = SyntheticFitConfig(dataset, str(work), **(options or {}))
        summary = fit_synthetic(cfg)
    else:
        cfg = LoraTrainConfig(dataset, str(work), generator=generator, **(options or {}))
        summary = finetune(cfg)
    if not local:  # resumable checkpoints stay local; the finished adapter goes to the store
        for f in sorted((work / ADAPTER_DIR).rglob("*")):
            if f.is_file():
                store.write_bytes(f"{prefix}/{f.relative_to(work / ADAPTER_DIR).as_posix()}", f.read_bytes())
    out = {k: v for k, v in summary.items() if k != "losses"}
    out.update({"adapter": store.uri(prefix), "reused": False, "config": asdict(cfg)})
    store.write_json("finetune/summary.json", out)
    return out


def _finished_finetune(store: RunStore) -> bool:
    try:
        summary = store.read_json("finetune/summary.json")
    except FileNotFoundError:
        return False
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("unreadable %s (%s); finetuning again", store.uri("finetune/summary.json"), e)
        return False
    return isinstance(summary, dict) and "adapter" in summary


# ---------------------------------------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------------------------------------


def repair_images(
    root: str,
    *,
    ids: Sequence[str] | None = None,
    below: float = 0.8,
    generator: str = "synthetic",
    lora: str | None = None,
    rahf: str = "rahf-tiny",
    options: dict[str, Any] | None = None,
    device: str = "cpu",
    limit: int | None = None,
) -> dict[str, Any]:
    """Best-of-N repair of the named records, or of every generated record whose plausibility is below ``below``
    (worst first, at most ``limit``). Each decision lands in ``repairs/<id>.json``; an accepted repair becomes a
    record of stage ``repaired`` with ``parent_id``. Decided ids are skipped on rerun."""
    from inpainting.masks import MaskConfig
    from inpainting.repair import RepairConfig, repair

    store = RunStore(root)
    opts = dict(options or {})
    mask = MaskConfig(**opts.pop("mask", {}))
    config = RepairConfig(mask=mask, **opts)
    gen = load_generator(generator, lora, device)
    scorer = load_scorer(rahf, device)
    records = {r.id: r for r in store.records() if r.stage == "generated" and not r.error}
    if ids is not None:
        unknown = [i for i in ids if i not in records]
        if unknown:
            raise ValueError(f"no generated record for ids {unknown[:5]}")
        chosen = [records[i] for i in ids]
    else:
        chosen = sorted(
            (r for r in records.values() if r.scores.get(config.score, 1.0) < below),
            key=lambda r: (r.scores.get(config.score, 1.0), r.id),
        )
    chosen = chosen[:limit] if limit is not None else chosen
    decisions, _ = read_json_files(store, "repairs")  # a decision that does not parse is made again
    decided = {k.removeprefix("repairs/").removesuffix(".json") for k in decisions}
    report: dict[str, Any] = {"considered": len(chosen), "skipped": 0, "accepted": [], "rejected": [], "failed": []}
    for rec in chosen:
        if rec.id in decided:
            report["skipped"] += 1
            continue
        try:
            image = decode_png(store.read_bytes(image_key(rec.id)))
            heat = read_heatmap(store, heatmap_key(rec.id, "implausibility"))
            result = repair(image, rec.prompt, gen, scorer, config, heatmap=heat, original_scores=rec.scores)
        except Exception as e:
            log.exception("repair of %s failed", rec.id)
            store.write_json(f"errors/repair-{rec.id}.json", {"id": rec.id, "error": str(e)})
            report["failed"].append(rec.id)
            continue
        decision = {"parent_id": rec.id, **result.summary()}
        if result.accepted:
            cand = result.accepted_candidate
            new = ImageRecord.from_generated(cand.generated, store.uri(image_key(cand.generated.id)))
            new.stage, new.parent_id, new.scores, new.rahf = "repaired", rec.id, cand.scores, rec.rahf
            store.write_bytes(image_key(new.id), encode_png(cand.generated.image))
            store.put_record(new)
            decision["repaired_id"] = new.id
            report["accepted"].append({"parent": rec.id, "repaired": new.id})
        else:
            report["rejected"].append(rec.id)
        store.write_json(f"repairs/{rec.id}.json", decision)  # last: the decision marks the id as done
    return report


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


def write_manifest(root: str, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """``manifest.jsonl``: every valid record (generated and repaired) and every error record, one line per id.

    Returns ``{"manifest": uri, "records": n, "errors": n, "bad_files": [keys that did not parse], "missing":
    [...]}``; ``missing`` lists the ids of ``ids`` (the planned images) that have neither a valid record nor an
    error record, sorted ([] without ``ids``).
    """
    store = RunStore(root)
    read = store.records()
    have = set(read.ids)
    errors = []
    side, bad = read_json_files(store, "errors")
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
    return {
        "manifest": uri,
        "records": len(read.records),
        "errors": len(errors),
        "bad_files": sorted([k for k, _ in read.bad] + bad),
        "missing": missing,
    }


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
    *,
    generator: str = "synthetic",
    lora_a: str | None = None,
    lora_b: str | None = None,
    generator_b: str | None = None,
    rahf: str = "rahf-tiny",
    per_prompt: int = 4,
    seed_offset: int = 1000,
    n_boot: int = 10_000,
    batch_size: int = 16,
    device: str = "cpu",
    report_dir: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The same prompts and seeds through checkpoint A (``generator`` + ``lora_a``) and B (``generator_b`` or the
    same base, + ``lora_b``), scored by the same RAHF; paired statistics to ``compare/comparison.json`` and, for
    a local run, the HTML report (``compare/report/index.html`` unless ``report_dir``). When the images carry
    ground truth (the synthetic world) the true scores are compared too."""
    from compare import compare_scores, pair_records, write_report

    store = RunStore(root)
    sides = {"a": (generator, lora_a), "b": (generator_b or generator, lora_b)}
    records, failed, missing = {}, {}, {}
    for side, (name, lora) in sides.items():
        sub = store.uri(f"compare/{side}")
        rep = generate_and_score(
            sub,
            prompts,
            generator=name,
            lora=lora,
            rahf=rahf,
            per_prompt=per_prompt,
            seed_offset=seed_offset,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        wanted = set(rep["ids"])
        records[side] = [r for r in RunStore(sub).records() if r.id in wanted]
        failed[side], missing[side] = len(rep["failed"]), len(rep["missing"])
    pairs = pair_records(records["a"], records["b"])
    stats = compare_scores(pairs, n_boot=n_boot, seed=0)
    summary: dict[str, Any] = {
        "a": {"generator": sides["a"][0], "lora": lora_a},
        "b": {"generator": sides["b"][0], "lora": lora_b},
        "pairs": len(pairs),
        "planned": len(prompts) * per_prompt,
        "failed": failed,
        "missing": missing,
        "scores": {k: asdict(v) for k, v in stats.scores.items()},
    }
    truth = _truth_comparison(pairs)
    if truth:
        summary["ground_truth"] = truth
    store.write_json("compare/comparison.json", {**stats.to_dict(), "ground_truth": truth})
    if report_dir or store.local:
        target = report_dir or store.uri("compare/report")
        summary["report"] = str(
            write_report(pairs, stats, target, title="Checkpoint comparison", label_a="before", label_b="after")
        )
    store.write_json("compare/summary.json", summary)
    return summary


def _truth_comparison(pairs) -> dict[str, Any] | None:
    """Mean true scores and implausible area of A and B, when every record carries the world's truth."""
    if not pairs or any(a.truth is None or b.truth is None for a, b in pairs):
        return None
    out: dict[str, Any] = {}
    for name in ("plausibility", "alignment", "aesthetics", "overall"):
        a = float(np.mean([p[0].truth["scores"][name] for p in pairs]))
        b = float(np.mean([p[1].truth["scores"][name] for p in pairs]))
        out[name] = {"mean_a": a, "mean_b": b, "diff": b - a}
    area_a = float(np.mean([p[0].truth["implausible_area"] for p in pairs]))
    area_b = float(np.mean([p[1].truth["implausible_area"] for p in pairs]))
    flawed_a = float(np.mean([p[0].truth["implausible_area"] > 0 for p in pairs]))
    flawed_b = float(np.mean([p[1].truth["implausible_area"] > 0 for p in pairs]))
    out["implausible_area"] = {"mean_a": area_a, "mean_b": area_b, "diff": area_b - area_a}
    out["images_with_implausible_regions"] = {"mean_a": flawed_a, "mean_b": flawed_b, "diff": flawed_b - flawed_a}
    return out
