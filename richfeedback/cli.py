"""The ``richfeedback`` command line: one entry point, one subcommand per job.

Subcommands import their libraries lazily, so ``richfeedback --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, MutableMapping
from importlib import resources
from pathlib import Path

#: Prefect settings every command runs with, wherever it is started: Prefect reads ``prefect.toml`` only from the
#: working directory, so the command line sets them as environment defaults (a variable the user set wins).
PREFECT_ENV_DEFAULTS = {
    # the server's telemetry heartbeat writes to the temporary server's SQLite database while the first flow
    # starts: an intermittent "database is locked" traceback in the log; off, as in prefect.toml
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    # the temporary server migrates a fresh database first: slow on a busy 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    "DO_NOT_TRACK": "1",  # the client-side opt-out
}


def apply_prefect_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of :data:`PREFECT_ENV_DEFAULTS` that ``environ`` (default ``os.environ``) lacks; returns those set.

    Call before Prefect is imported: Prefect reads its settings from the environment when it loads.
    """
    env = os.environ if environ is None else environ
    added = {k: v for k, v in PREFECT_ENV_DEFAULTS.items() if k not in env}
    env.update(added)
    return added


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except where there is none (None, off) or the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)"


def iter_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) of ``parser`` and every subcommand under it, e.g. ``("data pair", ...)``."""
    stack = [("", parser)]
    while stack:
        path, p = stack.pop(0)
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += [(f"{path} {name}".strip(), sub) for name, sub in action.choices.items()]


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; None leaves torch's own choice. On a busy machine fewer is faster."""
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"error: --threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core; on a busy machine 1 can be much faster)",
    )


def _add_scorer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="rahf-tiny",
        help="RAHF folder, hub id, or preset name (presets build at random init, seed 0)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and compute dtype")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    _add_threads_arg(p)
    p.add_argument("--scores-only", action="store_true", help="only the four scores (fastest)")
    p.add_argument("--no-overlays", action="store_true", help="do not write heatmap overlay PNGs")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=64_000_000,
        help="images with more pixels are error records (default 64000000; 0: only Pillow's own limit)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="reduce images to this long side before scoring; heatmaps and overlays have it (default 1024; 0: none)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=32,
        help="items per chunk, the unit a rerun of an interrupted run in the same --out resumes from (default 32)",
    )


def _scorer(args: argparse.Namespace):
    from rahf.scorer import RAHFScorer

    set_threads(args.threads)
    return RAHFScorer.from_pretrained(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def _print_rows(rows: list[dict], out: Path, options: dict) -> None:
    """One line per item, then what was written: overlays only when some were, and why there are none."""
    for r in rows:
        if "error" in r:
            print(f"  ERROR {Path(r['image']).name}: {r['error']}")
            continue
        s = "  ".join(f"{k}={v:.3f}" for k, v in r["scores"].items())
        kw = "" if options["scores_only"] else f"  misaligned: {', '.join(r['misaligned_keywords']) or '-'}"
        print(f"  {Path(r['image']).name:32s} {s}{kw}")
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} items failed (error records in scores.jsonl)")
    if any("overlay" in r for r in rows):
        extra = f" and overlays in {out / 'overlays'}"
    elif options["scores_only"]:
        extra = " (--scores-only: the four scores only, no heatmaps or keywords)"
    elif not options["overlays"]:
        extra = " (--no-overlays: no overlays)"
    else:
        extra = ""
    print(f"wrote {out / 'scores.jsonl'}, {out / 'scores.csv'}{extra}")


def _score_options(args: argparse.Namespace) -> dict:
    return {
        "overlays": not args.no_overlays,
        "scores_only": args.scores_only,
        "max_pixels": args.max_pixels or None,
        "max_side": args.max_side or None,
        "chunk_size": args.chunk_size,
    }


def _report_bad_lines(issues: list, shown: int = 20) -> None:
    for issue in issues[:shown]:
        print(f"warning: {issue} ({'recorded as an error' if issue.kept else 'skipped'})", file=sys.stderr)
    if len(issues) > shown:
        print(f"warning: ... and {len(issues) - shown} more", file=sys.stderr)
    if issues:
        print(f"warning: {len(issues)} bad lines (use --strict to refuse such a file)", file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> int:
    """Exit 0: every item scored; 1: some item failed or an input line was skipped (everything else is written);
    2: nothing run (no inputs, an unreadable items file, or a bad line under --strict)."""
    from rahf.batch import ScoreItem, check_limits, read_items, score_items

    issues: list = []
    if args.items:
        try:
            items, issues = read_items(args.items, strict=args.strict)
        except OSError as err:
            print(f"error: cannot read {args.items}: {err}", file=sys.stderr)
            return 2
        _report_bad_lines(issues)
    elif args.image and args.prompt is not None:
        items = [ScoreItem(Path(p), args.prompt) for p in args.image]
    else:
        print("error: give --items FILE.jsonl, or --image PATH [PATH ...] with --prompt TEXT", file=sys.stderr)
        return 2
    scorer, options = _scorer(args), _score_options(args)
    try:
        check_limits(scorer, options["max_pixels"], options["max_side"])
        if options["chunk_size"] < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {options['chunk_size']}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = score_items(scorer, items, args.out, **options)
    _print_rows(rows, Path(args.out), options)
    return 1 if any(not i.kept for i in issues) or any("error" in r for r in rows) else 0


def cmd_samples(args: argparse.Namespace) -> int:
    from rahf.batch import read_items, score_items

    samples = resources.files("rahf") / "samples" / "prompts.jsonl"
    with resources.as_file(samples) as path:
        items, _ = read_items(path, strict=True)
        print(f"scoring {len(items)} bundled sample images with {args.model} on {args.device} ({args.dtype})")
        if args.model in ("rahf-tiny",):
            print("note: presets are at random init until trained: the numbers show the pipeline, not quality")
        options = _score_options(args)
        rows = score_items(_scorer(args), items, args.out, **options)
    _print_rows(rows, Path(args.out), options)
    return 0 if all("error" not in r for r in rows) else 1


def _prefect_home(out: str) -> None:
    """Prefect's state under the run folder (or outputs/ for remote runs), unless PREFECT_HOME is set."""
    import os

    if "PREFECT_HOME" not in os.environ:
        local = out if "://" not in out else "outputs"
        home = Path(local).resolve() / ".prefect"
        home.mkdir(parents=True, exist_ok=True)  # Prefect creates the folder but not its parents
        os.environ["PREFECT_HOME"] = str(home)
    # the temporary server migrates a fresh database first: slow on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
    if not os.environ.get("PREFECT_API_URL"):
        from flows.server import use_temporary_server

        use_temporary_server()  # it exits with this process, even one killed with SIGKILL; no flow-run heartbeats


def _checked_folder(out: str, config) -> tuple[str, str] | None:
    """The (generator, rahf) the run folder ``out`` will use (its run.json, else the config's or the defaults),
    or None after an error message when the config asks for another one than the folder records."""
    from flows.config import RunFolderMismatchError, claim_run_folder

    try:
        return claim_run_folder(out, config.generator, config.rahf, write=False)
    except RunFolderMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def cmd_loop(args: argparse.Namespace) -> int:
    """Exit 0: done; 1: planned images are missing; 2: nothing run (a refused prompts file, or a generator or RAHF
    other than the run folder's)."""
    import os

    from flows.config import LOOP_FLAGS, config_from_args

    prompts = _prompts(args)  # first: a refused prompts file costs nothing
    config = config_from_args(args, LOOP_FLAGS)
    sources = _checked_folder(args.out, config)
    if sources is None:
        return 2
    _prefect_home(args.out)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.loop import feedback_loop

    print(
        f"feedback loop: {len(prompts)} prompts x {config.per_prompt} images, generator {sources[0]}, "
        f"RAHF {sources[1]}, run folder {args.out}"
    )
    result = feedback_loop(root=args.out, prompts=prompts, config=config.to_dict())
    print(result.to_markdown())
    return _loop_exit(result)


def _loop_exit(result) -> int:
    """The loop's exit code: 1 (and a message on stderr) when planned images have neither a valid record nor an
    error record; failed images (error records, in the manifest, retried by a rerun) and unreadable files skipped
    are counted on stdout."""
    planned, failed = len(result.generate.ids), len(result.generate.failed)
    manifest = result.manifest
    if manifest.bad_files:
        print(f"{len(manifest.bad_files)} unreadable files skipped: {', '.join(manifest.bad_files[:5])}")
    if failed:
        print(
            f"{failed} of {planned} planned images failed: error records in errors/ and the manifest; a rerun retries"
        )
    missing = manifest.missing
    if missing:
        print(
            f"error: {len(missing)} of {planned} planned images have neither a valid record nor an error record "
            f"(first: {', '.join(missing[:3])}); rerun the same command to redo them",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Exit 2: no data, or a --generator other than the one the dataset records (its run.json or metadata)."""
    import dataclasses

    from common.config_fields import read_json_object
    from finetune.lora import LoraTrainConfig, finetune
    from flows.config import RunFolderMismatchError, resolve_dataset_generator

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoraTrainConfig) if hasattr(args, f.name)}
    if args.target_modules:
        flags["target_modules"] = tuple(args.target_modules.split(","))
    from_file = read_json_object(args.config) if args.config else {}
    data_dir = flags.get("data_dir") or from_file.get("data_dir")
    if not data_dir or not (flags.get("out_dir") or from_file.get("out_dir")):
        print("error: give --config FILE.json, or --data-dir and --out-dir", file=sys.stderr)
        return 2
    try:
        flags["generator"] = resolve_dataset_generator(data_dir, flags.get("generator") or from_file.get("generator"))
    except RunFolderMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.config:
        cfg = LoraTrainConfig.from_json(args.config, **flags)
    else:
        cfg = LoraTrainConfig(**{k: v for k, v in flags.items() if v is not None})
    print(f"finetuning {cfg.generator} on {cfg.data_dir}", file=sys.stderr)
    summary = finetune(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    """The --prompts file (bad lines reported and skipped; refused under --strict), or the grammar's prompts."""
    if args.prompts:
        from common.lines import BadLinesError, read_prompt_lines

        prompts, issues = read_prompt_lines(args.prompts, strict=args.strict)
        _report_bad_lines(issues)
        if not prompts:
            raise BadLinesError(issues, headline=f"{args.prompts}: no usable prompt")
        return prompts
    from rahf.data.synthetic import sample_prompts

    return sample_prompts(args.num_prompts, seed=0)


def _rahf_source(name: str) -> str:
    """The scorer source handed to the flows: a name the scorer registry does not know is refused here, before
    any flow starts (UnknownNameError, listing the known names); the demo model's name becomes its folder."""
    from generators.registry import SCORERS
    from rahf.zoo import resolve_model

    SCORERS.resolve(name)
    return resolve_model(name)


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 1: an image of either side has no score; 2: a generator or RAHF other than the run folder's."""
    from flows.config import COMPARE_FLAGS, RunFolderMismatchError, config_from_args

    prompts = _prompts(args)
    config = config_from_args(args, COMPARE_FLAGS)
    if _checked_folder(args.out, config) is None:
        return 2
    _prefect_home(args.out)
    from flows.loop import compare_checkpoints

    try:
        result = compare_checkpoints(
            root=args.out,
            prompts=prompts,
            config=config.to_dict(),
            lora_a=args.lora_a,
            lora_b=args.lora_b,
            generator_b=args.generator_b,
        )
    except RunFolderMismatchError as err:  # compare/b made before with another --generator-b
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.to_markdown())
    return _compare_exit(result)


def _compare_exit(result) -> int:
    """1 (and a message on stderr) when an image of either side is missing or failed, or no pair was scored."""
    short = {side: result.failed.get(side, 0) + result.missing.get(side, 0) for side in "ab"}
    if result.pairs == 0 or any(short.values()):
        print(
            f"error: {result.pairs} pairs compared; images without a score: A {short['a']}, B {short['b']} "
            f"(of {result.planned} each); see errors/ under compare/a and compare/b",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_rating_sheet(args: argparse.Namespace) -> int:
    from common.keys import compare_side_key
    from compare import export_rating_sheet, pair_records
    from flows.storage import RunStore

    a = list(RunStore(str(Path(args.comparison) / compare_side_key("a"))).records())
    b = list(RunStore(str(Path(args.comparison) / compare_side_key("b"))).records())
    sheet, key = export_rating_sheet(pair_records(a, b), args.out, seed=args.seed)
    print(f"rating sheet: {sheet} (give raters the folder {sheet.parent}); hidden key: {key}")
    return 0


def cmd_rating_score(args: argparse.Namespace) -> int:
    from compare import score_rating_sheets

    result = score_rating_sheets(args.sheets, args.key)
    print(json.dumps(result, indent=1))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    """Exit 1: a repair failed; 2: unknown --ids, or a generator or RAHF other than the run folder's."""
    from flows.config import REPAIR_FLAGS, config_from_args

    config = config_from_args(args, REPAIR_FLAGS)
    if _checked_folder(args.out, config) is None:
        return 2
    _prefect_home(args.out)
    from flows.loop import repair_images

    result = repair_images(root=args.out, config=config.to_dict(), ids=args.ids or None, lora=args.lora)
    print(result.to_markdown())
    if result.not_found:
        print(f"error: no generated record for ids {list(result.not_found[:5])}", file=sys.stderr)
        return 2
    if result.failed:
        print(
            f"error: {len(result.failed)} repairs failed (errors/repair-<id>.json); a rerun retries them",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    import torch

    from rahf.zoo import build_demo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    report = build_demo_model(args.out, test_size=args.test, ship=args.ship, reuse_run=args.reuse_run)
    seconds = report["summary"]["seconds"]
    trained = f"trained in {seconds:.0f} s" if seconds is not None else f"packaged from {args.reuse_run}"
    print(f"bundle: {report['bundle']} (recipe {report['recipe_hash']}, {trained})")
    diff = report.get("vs_shipped")
    if diff is not None:
        print(f"largest difference from the shipped weights: {diff['max_abs_diff']:.3g} ({diff['tensor']})")
        if "max_sample_score_diff" in diff:
            print(f"largest difference in the bundled samples' scores: {diff['max_sample_score_diff']:.3g}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit a score read-out of a trained RAHF on a labelled split and save it in the model folder."""
    from rahf.readout import READOUT_FILE, ReadoutConfig, fit_score_readout

    if not (Path(args.model) / "config.json").is_file():  # the read-out is written into the folder
        print(
            f"error: --model {args.model} is not a saved RAHF folder (no config.json); calibrate writes its "
            "read-out into the model folder, so save or copy the model to a folder first",
            file=sys.stderr,
        )
        return 2
    set_threads(args.threads)
    config = ReadoutConfig(
        split=args.split, lam=args.lam, area_threshold=args.area_threshold, map_gates=not args.no_map_gates
    )
    readout, table = fit_score_readout(args.model, args.data, config, batch_size=args.batch_size, device=args.device)
    readout.save(args.model)
    print(f"score read-out fit on {readout.info['examples']} examples of {args.data}/{args.split} (in-sample):")
    print("| score | head PLCC / SRCC | read-out PLCC / SRCC |")
    print("|---|---:|---:|")
    for name, t in table.items():
        head, fit = f"{t['head_plcc']:.3f} / {t['head_srcc']:.3f}", f"{t['readout_plcc']:.3f} / {t['readout_srcc']:.3f}"
        print(f"| {name} | {head} | {fit} |")
    for name, t in readout.info["gates"].items():
        print(
            f"presence gate of the {name} map: right on {t['accuracy']:.1%} of the images "
            f"({t['with_heat']:.0%} have heat); the map returned is scaled by it"
        )
    if readout.info["skipped"]:
        print(f"{readout.info['skipped']} examples skipped: their image could not be read")
    print(f"wrote {Path(args.model) / READOUT_FILE}; scoring with this folder now uses it (eval --raw-scores: not)")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Best of N per prompt of a run folder -> its finetune-data/ folder (the scheduled selection, on demand)."""
    from flows.config import SELECT_FLAGS, config_from_args

    config = config_from_args(args, SELECT_FLAGS)
    _prefect_home(args.out)
    from flows.loop import select_finetune_data

    result = select_finetune_data(root=args.out, config=config.to_dict(), ids=args.ids or None)
    print(result.to_markdown())
    return 0


def cmd_save_preset(args: argparse.Namespace) -> int:
    from rahf.presets import build_rahf

    model, processor = build_rahf(args.preset, variant=args.variant, seed=args.seed, pretrained=args.pretrained)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(json.dumps({"saved": args.out, "parameters": model.num_parameters()}))
    return 0


def cmd_import_richhf(args: argparse.Namespace) -> int:
    from rahf.convert import import_reference_checkpoint

    out = import_reference_checkpoint(args.checkpoint, args.out, preset=args.preset, tokenizer_source=args.tokenizer)
    print(f"converted {args.checkpoint} -> {out} (config.json, model.safetensors, tokenizer)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    if args.world == "alt":
        from rahf.data.synthetic_alt import write_split
    else:
        from rahf.data.synthetic import write_split

    from rahf.data.synthetic import auto_workers

    if args.workers < 0:
        raise SystemExit(f"synth: --workers must be >= 0, got {args.workers}")
    size = args.size or (128 if args.world == "alt" else 64)
    for split, n in (("train", args.train), ("dev", args.dev), ("test", args.test)):
        if n:
            workers = args.workers or auto_workers(n)
            path = write_split(
                args.out, split, n, size=size, seed=args.seed, per_prompt=args.per_prompt, workers=workers
            )
            print(f"{split}: {n} examples -> {path}")
    return 0


def _pair_inputs(args: argparse.Namespace) -> tuple[list[Path], str, dict[str, str]]:
    """The label files, the split name and the captions of ``data pair``; ValueError says what is missing."""
    from rahf.data.sources import read_prompts

    given = [Path(x) for x in args.labels]
    prompts: dict[str, str] = {}
    if len(given) == 1 and given[0].is_dir():
        folder = given[0]
        found = sorted(f.stem for f in folder.glob("*.tfrecord"))
        split = args.split or (found[0] if len(found) == 1 else None)
        if split is None:
            raise ValueError(f"{folder} holds the splits {found or 'none'}: name one with --split")
        files = [folder / f"{split}.tfrecord"]
        if (folder / f"{split}.jsonl").is_file():
            prompts = read_prompts(folder / f"{split}.jsonl")
    else:
        files = given
        split = args.split or files[0].stem
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"labels not found: {', '.join(missing)}")
    if args.captions:
        prompts.update(read_prompts(args.captions))
    if not prompts:
        raise ValueError("the labels hold no captions (RichHF-18K ships none): give --captions FILE.jsonl")
    return files, split, prompts


def cmd_data_pair(args: argparse.Namespace) -> int:
    """Exit 0: a split folder written with at least one example; 1: nothing paired; 2: refused (bad input, or a
    missing image under --strict; nothing written)."""
    from rahf.data.sources import ImageFolderSource, MissingImagesError, make_split_folder

    try:
        files, split, prompts = _pair_inputs(args)
        images = ImageFolderSource(args.images)
        paths = args.paths or ("relative" if args.copy_images else "absolute")
        report = make_split_folder(
            files, images, prompts, args.out, split, paths=paths, copy_images=args.copy_images, strict=args.strict
        )
    except MissingImagesError as err:
        found = err.report.describe("missing_image", args.show)
        print(f"error: no usable image in {err.where} for {found}; nothing written (--strict)", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reasons = {
        "missing_image": f"no usable image in {args.images}",
        "missing_prompt": "no caption",
        "word_count_mismatch": "caption's word count differs from the label count",
    }
    for reason, why in reasons.items():
        if report[reason]:
            print(f"warning: skipped, {why}: {report.describe(reason, args.show)}", file=sys.stderr)
    undecodable = sorted(images.skipped)
    if undecodable:
        shown = ", ".join(undecodable[: args.show])
        print(f"warning: {len(undecodable)} images do not decode (counted as missing): {shown}", file=sys.stderr)
    out = Path(args.out)
    print(
        f"{split}: {report['kept']} of {report.labelled} examples paired -> {out / (split + '.tfrecord')}, "
        f"{out / (split + '.jsonl')} (image paths {paths})"
    )
    if not report["kept"]:
        print("error: no example paired; check the uids of --images and --captions against the labels", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from rahf.train import TrainConfig, train

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    specs = getattr(args, "heatmap_weight_specs", None)
    if specs:
        weights = {}
        for spec in specs:
            name, _, value = spec.partition("=")
            try:
                weights[name] = float(value) if name else float("")
            except ValueError:
                print(f"error: --heatmap-weight wants MAP=FACTOR, got {spec!r}", file=sys.stderr)
                return 2
        flags["heatmap_weights"] = weights
    spec = getattr(args, "itm_swap_spec", None)
    if spec:
        from rahf.words import load_swap_classes

        try:
            flags["itm_swaps"] = load_swap_classes(spec)
        except (OSError, ValueError) as err:
            print(f"error: --itm-swaps: {err}", file=sys.stderr)
            return 2
    if args.config:
        cfg = TrainConfig.from_json(args.config, **flags)
    else:
        if not args.data_dir or not args.out_dir:
            print("error: give --config FILE.json, or --data-dir and --out-dir", file=sys.stderr)
            return 2
        cfg = TrainConfig(**{k: v for k, v in flags.items() if v is not None})
    set_threads(args.threads)
    summary = train(cfg)
    if summary["main_process"]:  # several processes (accelerate launch / torchrun): one summary
        print(json.dumps(summary))
        best = Path(cfg.out_dir) / "best"
        print(  # on stderr: stdout stays the one JSON summary
            f"to calibrate its scores and maps on the dev split: richfeedback calibrate --model {best} "
            f"--data {cfg.data_dir} --split {cfg.dev_split}",
            file=sys.stderr,
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rahf.evaluate import evaluate, load_ground_truth, markdown, predict_with_scorer, write_results
    from rahf.scorer import RAHFScorer

    set_threads(args.threads)
    gt = load_ground_truth(args.data, args.split)
    results = {}
    scorer = None
    for spec in args.model or []:
        name, _, path = spec.rpartition("=")
        scorer = RAHFScorer.from_pretrained(
            path, device=args.device, batch_size=args.batch_size, score_readout=not args.raw_scores
        )
        results[name or path] = evaluate(predict_with_scorer(scorer, gt), gt)
    if args.baselines:
        from rahf.baselines import MeanPredictor, predict_small_cnn, train_small_cnn
        from rahf.presets import build_rahf
        from rahf.train import load_split

        processor = scorer.processor if scorer else build_rahf("rahf-tiny")[1]
        train_data = load_split(args.data, "train", processor)
        results["mean predictor"] = evaluate(MeanPredictor().fit(train_data).predict(gt, processor), gt)
        cnn = train_small_cnn(
            train_data,
            steps=args.baseline_steps,
            batch_size=args.baseline_batch_size,
            lr=args.baseline_lr,
            seed=args.baseline_seed,
            empty_heatmap_weight=args.baseline_empty_heatmap_weight,
            heatmap_loss_kind=args.baseline_heatmap_loss,
        )
        results["small CNN"] = evaluate(predict_small_cnn(cnn, gt, processor), gt)
    if not results:
        print("error: give --model NAME=PATH and/or --baselines", file=sys.stderr)
        return 2
    write_results(args.out, results)
    print(markdown(results))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'metrics.md'} ({len(gt.uids)} examples)")
    return 0


def cmd_bench_loop(args: argparse.Namespace) -> int:
    from compare.loop_gain import LoopGainConfig, RandomScorer, run_loop_gain
    from flows.config import BENCH_REPAIR_FLAGS, config_from_args
    from generators.registry import GROUND_TRUTH, build_scorer

    set_threads(args.threads)
    names = [s.strip() for s in args.scorers.split(",") if s.strip()]
    unknown = sorted(set(names) - {"random", "rahf", "oracle"})
    if unknown or not names:
        print(f"error: --scorers takes a comma list of random, rahf, oracle; got {args.scorers!r}", file=sys.stderr)
        return 2
    config = LoopGainConfig(
        prompts=args.prompts,
        per_prompt=args.per_prompt,
        heldout_prompts=args.heldout_prompts,
        heldout_per_prompt=args.heldout_per_prompt,
        rounds=args.rounds,
        size=args.size,
        select_by=args.select_by,
        repair_limit=args.repair_limit,
        repair=config_from_args(args, BENCH_REPAIR_FLAGS).repair,
        seed=args.seed,
        n_boot=args.n_boot,
        misalignment_repair=args.misalignment_repair,
        heatmap_weighted_fit=tuple(int(k) for k in args.heatmap_weighted_fit.split(",") if k.strip()),
        heat_threshold=args.heat_threshold,
        judge=args.judge,
        judge_margin=args.judge_margin,
        judge_drop=args.judge_drop,
    )
    scorers = {}
    for name in names:
        if name == "random":
            scorers[name] = RandomScorer(seed=args.seed)
        elif name == "oracle":
            scorers[name] = build_scorer(GROUND_TRUTH)
        else:
            scorers[name] = build_scorer(args.rahf, device=args.device, batch_size=args.batch_size)
    print(f"loop-gain benchmark: scorers {', '.join(scorers)}; RAHF {args.rahf}; {config.rounds} round(s)")
    run_loop_gain(config, scorers, args.out, log=print)
    out = Path(args.out)
    print((out / "loop_gain.md").read_text())
    print(f"wrote {out / 'loop_gain.json'}, {out / 'loop_gain.md'} and {out / 'loop_gain.png'}")
    return 0


#: ``richfeedback finetune`` flags: (LoraTrainConfig field, type, help); a test checks them against the fields and
#: their defaults (kept out of this module: LoraTrainConfig imports torch)
FINETUNE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("data_dir", str, "image folder with metadata.jsonl (local path or URL)"),
    ("out_dir", str, "checkpoints/, adapter/, log.jsonl"),
    (
        "generator",
        str,
        "preset, hub id or folder (default: the generator the dataset records in its run.json or metadata, "
        "else amused-tiny; another one than the dataset's is refused)",
    ),
    ("rank", int, "LoRA rank r (default: 4)"),
    ("alpha", float, "LoRA alpha, scale alpha / r (default: 4.0)"),
    ("lr", float, "learning rate (default: 0.0001)"),
    ("steps", int, "optimizer steps (default: 100)"),
    ("batch_size", int, "images per step (default: 4)"),
    ("grad_accum", int, "gradient accumulation steps (default: 1)"),
    ("max_grad_norm", float, "> 0: clip the gradients' global norm to this before each step, 0: none (default: 0.0)"),
    ("mixed_precision", str, "no | bf16 | fp16 (default: no)"),
    ("seed", int, "(default: 0)"),
    ("checkpoint_every", int, "steps between resumable checkpoints (default: 50)"),
    ("log_every", int, "steps between log lines (default: 10)"),
    ("device", str, "auto | cpu | cuda (default: auto)"),
    ("prior_strength", float, "synthetic world only: pseudo-trials toward the current flaw rates (default: 2.0)"),
    (
        "heatmap_weighting",
        bool,
        "true: weight the loss by 1 - the implausibility heatmap each image has in the folder (default: False)",
    ),
)


def _flag_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no) for a boolean config flag."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _ConfigFlagsParser(argparse.ArgumentParser):
    """A subcommand's parser whose flags from :class:`flows.config.LoopConfig` (``flows.config.*_FLAGS``) are added
    on its first use: that module imports numpy and OpenCV, and ``richfeedback --help`` stays instant."""

    pending: tuple[str, ...] = ()

    def _add_pending(self) -> None:
        if self.pending:
            import flows.config

            names, self.pending = self.pending, ()
            for name in names:
                flows.config.add_config_flags(self, getattr(flows.config, name))

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._add_pending()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_pending()
        return super().format_help()

    def format_usage(self) -> str:
        self._add_pending()
        return super().format_usage()


def add_config_flags(p: argparse.ArgumentParser, flags: str) -> None:
    """Give the subcommand parser ``p`` the flags ``flows.config.<flags>`` (defaults and help from LoopConfig)."""
    p.__class__ = _ConfigFlagsParser
    p.pending = (*p.pending, flags)  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    from rahf.readout import ReadoutConfig

    parser = argparse.ArgumentParser(prog="richfeedback", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images against their prompts; write scores, keywords and heatmap overlays")
    p.add_argument("--items", help='JSONL of {"image": path, "prompt": text}')
    p.add_argument("--image", nargs="+", help="image files (with --prompt)")
    p.add_argument("--prompt", help="the prompt of the --image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--strict", action="store_true", help="refuse an --items file with any bad line (exit 2)")
    _add_scorer_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("samples", help="score the bundled sample images")
    p.add_argument("--out", default="outputs/samples", help="output folder")
    _add_scorer_args(p)
    p.set_defaults(func=cmd_samples)

    for name, helptext in (
        ("demo", "the feedback loop on the embedded offline default (synthetic world, trained rahf-tiny)"),
        ("loop", "the feedback loop: generate, score, select, finetune, compare, repair"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", default="outputs/demo", help="run folder: a local path or s3://bucket/prefix")
        p.add_argument("--prompts", help="a text file, one prompt per line (default: prompts of the grammar)")
        p.add_argument("--strict", action="store_true", help="refuse a --prompts file with any bad line (exit 2)")
        p.add_argument("--num-prompts", type=int, default=12, help="prompts of the grammar without --prompts")
        add_config_flags(p, "LOOP_FLAGS")
        p.set_defaults(func=cmd_loop)

    p = sub.add_parser("select", help="best of N per prompt of a run folder -> its finetune-data/ image folder")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--ids", nargs="*", help="candidate record ids (default: every generated record)")
    add_config_flags(p, "SELECT_FLAGS")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("finetune", help="LoRA-finetune a generator on a selected image folder (resumable)")
    p.add_argument("--config", help="LoraTrainConfig as JSON; flags override it")
    p.add_argument("--target-modules", help="comma-separated module names (default: attention projections)")
    for name, typ, text in FINETUNE_FLAGS:
        kind = _flag_bool if typ is bool else typ
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="compare two checkpoints on the same prompts and seeds (stats + report)")
    p.add_argument("--out", required=True, help="run folder: a local path or s3://bucket/prefix")
    p.add_argument("--lora-a", help="adapter folder on top of A (the --generator)")
    p.add_argument("--generator-b", help="checkpoint B (default: the same base as A)")
    p.add_argument("--lora-b", help="adapter folder on top of B")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--strict", action="store_true", help="refuse a --prompts file with any bad line (exit 2)")
    p.add_argument("--num-prompts", type=int, default=12, help="prompts of the grammar without --prompts")
    add_config_flags(p, "COMPARE_FLAGS")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("rating-sheet", help="a blind A/B rating sheet (CSV) from a comparison run, with a key")
    p.add_argument("comparison", help="the --out folder of a compare run")
    p.add_argument("--out", required=True, help="folder for sheet/ (give raters this) and key.csv (keep hidden)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair order and the A/B side swaps")
    p.set_defaults(func=cmd_rating_sheet)

    p = sub.add_parser("rating-score", help="score filled rating sheets into the five B-vs-A bins")
    p.add_argument("sheets", nargs="+", help="filled ratings.csv files, one per rater")
    p.add_argument("--key", required=True, help="the key.csv that rating-sheet wrote beside the sheet")
    p.set_defaults(func=cmd_rating_score)

    p = sub.add_parser("repair", help="best-of-N repair of the least plausible (or named) images of a run")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--ids", nargs="*", help="repair only among these record ids (default: every generated record)")
    p.add_argument("--lora", help="adapter folder on top of the generator")
    add_config_flags(p, "REPAIR_FLAGS")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser(
        "demo-model",
        help="retrain the shipped demo model from scratch by its recipe; report the change from the shipped weights",
    )
    p.add_argument("--out", default="outputs/demo-model", help="work folder: data, training run, the new bundle")
    p.add_argument("--test", type=int, default=300, help="test-split size for the bundle's evaluation tables")
    p.add_argument("--ship", action="store_true", help="copy the new bundle over the shipped one (rahf/demo_model)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--reuse-run", default=None, help="package a finished training run of the same recipe instead of retraining"
    )
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser(
        "calibrate",
        help="fit a score read-out of a trained RAHF on a labelled split (dev) and save it in the model folder",
        description="Fit, per score, a ridge regression from the model's own outputs (its four head scores and each "
        "heatmap's mean, peak and hot area) to the labelled scores of a held-out split, and save it as "
        "score_readout.safetensors in the model folder; every later scoring with the folder returns the read-out's "
        "scores. Fit on a split the model was not trained on.",
    )
    p.add_argument("--model", required=True, help="the trained RAHF folder (the read-out is written into it)")
    p.add_argument("--data", required=True, help="split folder with <split>.tfrecord and <split>.jsonl")
    p.add_argument("--split", default=ReadoutConfig.split, help="labelled split to fit on (not the training split)")
    p.add_argument("--lam", type=float, default=ReadoutConfig.lam, help="ridge penalty on standardised features")
    p.add_argument(
        "--area-threshold",
        type=float,
        default=ReadoutConfig.area_threshold,
        help="a heatmap pixel above this counts toward the hot-area feature",
    )
    p.add_argument(
        "--no-map-gates",
        action="store_true",
        help="fit no presence gates: the maps are returned as the model makes them (only the scores calibrated)",
    )
    p.add_argument("--device", default="cpu", help="device of the model: cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("save-preset", help="build a RAHF preset and save it as a model folder")
    p.add_argument("preset", help="rahf-tiny | rahf-tiny-p4 | richhf-base")
    p.add_argument("out", help="model folder to write (config.json, model.safetensors, processor, tokenizer)")
    p.add_argument(
        "--variant",
        default="multi_head",
        choices=["multi_head", "augmented_prompt"],
        help="multi_head: one head per map and score; augmented_prompt: one head, the task in the prompt",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--pretrained", action="store_true", help="load the backbones' hub weights (needs the hub)")
    p.set_defaults(func=cmd_save_preset)

    p = sub.add_parser("synth", help="write a synthetic rich-feedback benchmark in the RichHF-18K schema")
    p.add_argument("--out", required=True, help="split folder to write (<split>.tfrecord, <split>.jsonl, images)")
    p.add_argument("--train", type=int, default=2000, help="examples of the train split (0: none)")
    p.add_argument("--dev", type=int, default=200, help="examples of the dev split (0: none)")
    p.add_argument("--test", type=int, default=200, help="examples of the test split (0: none)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 64 for shapes, 128 for alt)")
    p.add_argument("--seed", type=int, default=0, help="example i of a split depends only on (seed, split, i)")
    p.add_argument(
        "--per-prompt", type=int, default=1, help="consecutive examples sharing one prompt (1: a prompt each)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes rendering the images; the files do not depend on it (0: one per core, at least 2,000 "
        "examples each)",
    )
    p.add_argument(
        "--world",
        choices=("shapes", "alt"),
        default="shapes",
        help="shapes: the world recipes are tuned on; alt: the second world (rings, stars, moons, flowers, cubes on "
        "textured skies, its own flaws and score rules), for validating recipes only",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train RAHF (resumes from the last checkpoint in --out-dir)")
    p.add_argument("--config", help="TrainConfig as JSON; flags override it")
    for name, typ, helptext in (
        ("data_dir", str, "split folder with train and dev splits (<split>.tfrecord, <split>.jsonl, images)"),
        ("out_dir", str, "checkpoints, best/ (best dev model), log.jsonl; a rerun resumes from here"),
        ("preset", str, "preset to train from random init, or a RAHF folder (TrainConfig default: rahf-tiny)"),
        ("variant", str, "multi_head | augmented_prompt (presets only) (TrainConfig default: multi_head)"),
        ("steps", int, "optimizer steps (TrainConfig default: 300)"),
        ("batch_size", int, "examples per micro-batch (TrainConfig default: 16)"),
        ("grad_accum", int, "micro-batches per optimizer step (TrainConfig default: 1)"),
        ("lr", float, "peak learning rate (TrainConfig default: 1e-3)"),
        ("weight_decay", float, "AdamW weight decay (TrainConfig default: 0.01)"),
        ("warmup_steps", int, "linear warm-up steps, then cosine decay to 10 %% of lr (TrainConfig default: 20)"),
        ("mixed_precision", str, "no | bf16 | fp16 (TrainConfig default: no)"),
        ("seed", int, "seed of initialisation and batch order (TrainConfig default: 0)"),
        (
            "ema_decay",
            float,
            "> 0: keep a moving average of the weights with this decay, e.g. 0.999; the dev loss and best/ use it, "
            "0 keeps none (TrainConfig default: 0)",
        ),
        (
            "max_grad_norm",
            float,
            "> 0: clip the gradients' global norm to this before each step, 0: no clipping; the norm is logged as "
            "grad_norm either way (TrainConfig default: 0)",
        ),
        ("checkpoint_every", int, "steps between checkpoints (TrainConfig default: 100)"),
        ("eval_every", int, "steps between dev evaluations (TrainConfig default: 100)"),
        ("log_every", int, "steps between log lines (TrainConfig default: 10)"),
        ("device", str, "auto | cpu | cuda (TrainConfig default: auto)"),
        ("heatmap_loss_weight", float, "weight of the map loss (default: the model config's)"),
        ("score_loss_weight", float, "weight of the score loss (default: the model config's)"),
        ("token_loss_weight", float, "weight of the keyword token loss (default: the model config's)"),
        ("empty_heatmap_weight", float, "extra map-loss weight on empty target maps (default: the model config's)"),
        ("itm_loss_weight", float, "image-text matching loss weight; > 0 adds its head (default: the model config's)"),
        ("itm_negatives", int, "images per batch given an ITM negative, 0: all (default: the model config's)"),
        ("rank_loss_weight", float, "within-prompt ranking loss weight, > 0 turns it on (default: the model config's)"),
        ("rank_temperature", float, "ranking loss temperature in score units (default: the model config's)"),
        ("rank_min_gap", float, "true-score gap below which a pair is a tie (default: the model config's)"),
        ("gate_loss_weight", float, "heatmap presence gates' loss weight; > 0 adds them (default: the model config's)"),
        ("word_loss_weight", float, "per-word misalignment loss; > 0 adds the word head (default: the model config's)"),
        ("prompt_group", int, "images of one prompt kept together in a batch (TrainConfig default: 1)"),
        ("collapse_spread", float, "warn when an output's dev-split spread is below this (TrainConfig default: 1e-3)"),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=helptext)
    p.add_argument(
        "--channels-last",
        dest="channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last heads (faster on CPU, same maths; default: off)",
    )
    p.add_argument(
        "--prefetch",
        dest="prefetch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make the next batch in a background thread while the device works (same batches; default: on for an "
        "accelerator, off on a CPU)",
    )
    p.add_argument(
        "--score-reads-prompt",
        dest="score_reads_prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score heads also read the pooled encoded prompt (presets only; default: off, or a saved folder's)",
    )
    p.add_argument(
        "--itm-pool",
        dest="itm_pool",
        choices=("mean", "mean_max"),
        default=None,
        help="how the ITM head pools the fused image tokens (presets only; default: mean, or a saved folder's)",
    )
    p.add_argument(
        "--itm-target",
        dest="itm_target",
        choices=("match", "alignment"),
        default=None,
        help="ITM target of an image's own prompt: 1 (match), or its labelled alignment score (default: match)",
    )
    p.add_argument(
        "--heatmap-loss",
        dest="heatmap_loss",
        choices=("mse", "bce"),
        default=None,
        help="per-pixel map loss (default mse)",
    )
    p.add_argument(
        "--itm-swaps",
        dest="itm_swap_spec",
        metavar="synthetic|FILE.json",
        help="word classes for edited-prompt ITM negatives: 'synthetic' (the synthetic world's colours, shapes and "
        "counts) or a JSON list of lists of interchangeable words (default: the model config's, none)",
    )
    p.add_argument(
        "--heatmap-weight",
        dest="heatmap_weight_specs",
        action="append",
        metavar="MAP=FACTOR",
        help="a per-map factor on --heatmap-loss-weight, e.g. misalignment=2 (repeatable; others stay 1)",
    )
    _add_threads_arg(p)
    p.set_defaults(func=cmd_train)

    from rahf.baseline_recipe import BASELINES_RECIPE as BAR

    p = sub.add_parser(
        "eval",
        help="the paper's Tables 1-4 for models and baselines on a split",
        description="The paper's Tables 1-4 for RAHF models and the two baselines on a split. The baseline "
        "defaults are rahf.baseline_recipe.BASELINES_RECIPE, the settings of the benchmark's bar.",
    )
    p.add_argument("--data", required=True, help="split folder with <split>.tfrecord and <split>.jsonl")
    p.add_argument("--split", default="test", help="the split to evaluate on")
    p.add_argument("--model", action="append", help="NAME=PATH of a RAHF folder (repeatable)")
    p.add_argument(
        "--baselines", action="store_true", help="also train (on the train split) and evaluate the two baselines"
    )
    p.add_argument("--baseline-steps", type=int, default=BAR.steps, help="the small CNN's optimizer steps")
    p.add_argument("--baseline-batch-size", type=int, default=BAR.batch_size, help="the small CNN's batch size")
    p.add_argument("--baseline-lr", type=float, default=BAR.lr, help="the small CNN's learning rate")
    p.add_argument("--baseline-seed", type=int, default=BAR.seed, help="the small CNN's seed")
    p.add_argument(
        "--baseline-empty-heatmap-weight",
        type=float,
        default=BAR.empty_heatmap_weight,
        help="extra map-loss weight on samples with an empty target, as RAHF's --empty-heatmap-weight",
    )
    p.add_argument(
        "--baseline-heatmap-loss",
        choices=("mse", "bce"),
        default=BAR.heatmap_loss,
        help="the small CNN's per-pixel map loss, as RAHF's --heatmap-loss",
    )
    p.add_argument("--out", required=True, help="folder for metrics.json and metrics.md")
    p.add_argument("--device", default="cpu", help="device of the RAHF models: cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass of a RAHF model")
    p.add_argument(
        "--raw-scores",
        action="store_true",
        help="the models' own score heads and maps, not their read-outs (`calibrate`) where they have one",
    )
    _add_threads_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench-loop", help="loop-gain benchmark: how much of the oracle's true gain a scorer gets in the loop"
    )
    p.add_argument("--out", default="outputs/bench-loop", help="folder for loop_gain.json, .md and .png")
    p.add_argument(
        "--rahf",
        default="synthetic-default",
        help="RAHF folder, hub id or preset; synthetic-default is the shipped demo model (rahf-tiny-p4)",
    )
    p.add_argument("--scorers", default="random,rahf,oracle", help="comma list of random, rahf, oracle")
    p.add_argument("--rounds", type=int, default=3, help="select-and-finetune rounds")
    p.add_argument("--prompts", type=int, default=16, help="training prompts per round")
    p.add_argument("--per-prompt", type=int, default=8, help="candidates per training prompt")
    p.add_argument("--heldout-prompts", type=int, default=16, help="held-out prompts the gain is measured on")
    p.add_argument("--heldout-per-prompt", type=int, default=4, help="images per held-out prompt")
    p.add_argument("--size", type=int, default=64, help="image side of the synthetic world")
    p.add_argument("--select-by", default="overall", help="the score that picks the best candidate per prompt")
    p.add_argument("--repair-limit", type=int, default=8, help="held-out images repaired per round, least plausible")
    p.add_argument(
        "--heatmap-weighted-fit",
        default="",
        metavar="K[,K...]",
        help="also fit on the top-K of prompts/K prompts (same image count) with hot objects left out; '' = off",
    )
    p.add_argument(
        "--heat-threshold", type=float, default=0.15, help="mean predicted implausibility that leaves an object out"
    )
    add_config_flags(p, "BENCH_REPAIR_FLAGS")  # the feedback loop's repair settings, shared with the benchmark
    p.add_argument(
        "--misalignment-repair",
        action="store_true",
        help="also repair the least aligned held-out images by the misalignment map (table (d))",
    )
    p.add_argument(
        "--judge",
        default="",
        help="independent judge of picks and repairs (table (e)): 'cnn' (small CNN, trained once and cached) or a "
        "RAHF folder; '' = off",
    )
    p.add_argument("--judge-margin", type=float, default=0.05, help="disagreement beyond which the judge flags")
    p.add_argument(
        "--judge-drop", action="store_true", help="leave flagged picks out of the fit and revert flagged repairs"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, images and the random scorer")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--device", default="cpu", help="device of the RAHF scorer: cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass of the RAHF scorer")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_bench_loop)

    p = sub.add_parser("import-richhf", help="convert a youweiliang/RichHF .pt checkpoint to safetensors")
    p.add_argument("checkpoint", help="the reference model.pt (or model_best.pt)")
    p.add_argument("out", help="RAHF folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--preset", default="richhf-base", help="the architecture the checkpoint was trained with")
    p.add_argument("--tokenizer", default=None, help="T5 tokenizer id or folder (default: the preset's)")
    p.set_defaults(func=cmd_import_richhf)

    p = sub.add_parser("data", help="bring your own data: pair labels with images and captions")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser(
        "pair",
        help="labels + an image folder + captions -> a split folder that train and eval read",
        description="Pair labels (a RichHF-18K .tfrecord, or a split folder of this project) with the images of a "
        "folder (found by uid = file stem, recursively) and captions, into <out>/<split>.tfrecord + "
        "<split>.jsonl. Examples without an image or caption, or whose caption's word count differs from the "
        "label count, are skipped and reported.",
    )
    p.add_argument(
        "--labels",
        required=True,
        nargs="+",
        help="RichHF-18K .tfrecord file(s) of one split, or a split folder (<split>.tfrecord + <split>.jsonl)",
    )
    p.add_argument("--images", required=True, help="folder of images named <uid>.png|.jpg|.jpeg|.webp")
    p.add_argument(
        "--captions",
        help='JSONL of {"uid": ..., "caption": ...} (or "prompt"); needed unless --labels is a split folder',
    )
    p.add_argument("--out", required=True, help="split folder to write")
    p.add_argument(
        "--split",
        help="split name (default: the labels file's stem, e.g. train for train.tfrecord; for a folder, its one split)",
    )
    p.add_argument(
        "--paths",
        choices=("absolute", "relative"),
        help="image paths in <split>.jsonl: absolute (survives moving the split folder or the working directory) "
        "or relative to the split folder (survives moving the folder together with its images) "
        "(default: relative with --copy-images, else absolute)",
    )
    p.add_argument(
        "--copy-images",
        action="store_true",
        help="copy the paired images into <out>/<split>/, so the split folder is self-contained",
    )
    p.add_argument("--strict", action="store_true", help="refuse (exit 2, nothing written) if any image is missing")
    p.add_argument("--show", type=int, default=5, help="how many missing uids to name in a message")
    p.set_defaults(func=cmd_data_pair)

    for _, each in iter_parsers(parser):
        each.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.lines import BadLinesError
    from common.registry import UnknownNameError

    apply_prefect_defaults()  # before any command imports prefect
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BadLinesError as err:  # an input file refused under --strict (or with nothing usable in it)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except UnknownNameError as err:  # a generator or scorer name no registry knows
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
