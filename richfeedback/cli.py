"""The ``richfeedback`` command line: one entry point, one subcommand per job.

Subcommands import their libraries lazily, so ``richfeedback --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path


def _add_scorer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="rahf-tiny",
        help="RAHF folder, hub id, or preset name (presets build at random init, seed 0)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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
    import torch

    from rahf.scorer import RAHFScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    return RAHFScorer.from_pretrained(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def _print_rows(rows: list[dict], out: Path) -> None:
    for r in rows:
        if "error" in r:
            print(f"  ERROR {Path(r['image']).name}: {r['error']}")
            continue
        s = "  ".join(f"{k}={v:.3f}" for k, v in r["scores"].items())
        kw = ", ".join(r["misaligned_keywords"]) or "-"
        print(f"  {Path(r['image']).name:32s} {s}  misaligned: {kw}")
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} items failed (error records in scores.jsonl)")
    overlays = f" and overlays in {out / 'overlays'}" if any("overlay" in r for r in rows) else ""
    print(f"wrote {out / 'scores.jsonl'}, {out / 'scores.csv'}{overlays}")


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
    _print_rows(rows, Path(args.out))
    return 1 if any(not i.kept for i in issues) or any("error" in r for r in rows) else 0


def cmd_samples(args: argparse.Namespace) -> int:
    from rahf.batch import read_items, score_items

    samples = resources.files("rahf") / "samples" / "prompts.jsonl"
    with resources.as_file(samples) as path:
        items, _ = read_items(path, strict=True)
        print(f"scoring {len(items)} bundled sample images with {args.model} on {args.device} ({args.dtype})")
        if args.model in ("rahf-tiny",):
            print("note: presets are at random init until trained: the numbers show the pipeline, not quality")
        rows = score_items(_scorer(args), items, args.out, **_score_options(args))
    _print_rows(rows, Path(args.out))
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
        from flows.server import guard_temporary_server

        guard_temporary_server()  # the temporary server exits with this process, even one killed with SIGKILL


def cmd_loop(args: argparse.Namespace) -> int:
    import os

    prompts = _prompts(args)  # first: a refused prompts file costs nothing
    _prefect_home(args.out)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    rahf = _rahf_source(args.rahf)
    from flows.loop import feedback_loop

    finetune = {"steps": args.finetune_steps} if args.finetune_steps and args.generator != "synthetic" else {}
    print(
        f"feedback loop: {len(prompts)} prompts x {args.per_prompt} images, generator {args.generator}, "
        f"RAHF {rahf}, run folder {args.out}"
    )
    summary = feedback_loop(
        root=args.out,
        prompts=prompts,
        generator=args.generator,
        rahf=rahf,
        per_prompt=args.per_prompt,
        selection={"score": args.select_by, "thresholds": {"plausibility": args.threshold}},
        finetune=finetune,
        compare_per_prompt=args.compare_per_prompt,
        repair={"margin": args.repair_margin, "mask": {"threshold": args.mask_threshold}},
        repair_below=args.repair_below,
        repair_limit=args.repair_limit,
        device=args.device,
    )
    print(improvement_report(summary))
    return _loop_exit(summary)


def _loop_exit(summary: dict) -> int:
    """The loop's exit code: 1 (and a message on stderr) when planned images have neither a valid record nor an
    error record; failed images (error records, in the manifest, retried by a rerun) and unreadable files skipped
    are counted on stdout."""
    planned, failed = summary["generate"]["ids"], summary["generate"]["failed"]
    manifest = summary["manifest"]
    if manifest.get("bad_files"):
        print(f"{len(manifest['bad_files'])} unreadable files skipped: {', '.join(manifest['bad_files'][:5])}")
    if failed:
        print(
            f"{failed} of {planned} planned images failed: error records in errors/ and the manifest; a rerun retries"
        )
    missing = manifest.get("missing") or []
    if missing:
        print(
            f"error: {len(missing)} of {planned} planned images have neither a valid record nor an error record "
            f"(first: {', '.join(missing[:3])}); rerun the same command to redo them",
            file=sys.stderr,
        )
        return 1
    return 0


def improvement_report(summary: dict) -> str:
    """What improved, in numbers: finetuning (RAHF and, for the synthetic world, true scores) and repair."""
    from common.keys import REPAIRS
    from flows.stages import read_json_files
    from flows.storage import RunStore

    c, r = summary["compare"] or {"scores": {}}, summary["repair"]
    lines = ["", f"results in {summary['root']}", ""]
    if summary["compare"]:
        lines.append("finetuning (same prompts and seeds, before -> after):")
    else:
        lines.append("finetuning: skipped, no image cleared the selection thresholds")
    for name, s in c["scores"].items():
        lines.append(
            f"  RAHF {name:<13} {s['mean_a']:.3f} -> {s['mean_b']:.3f}  ({s['diff']:+.3f}, 95% CI "
            f"{s['ci_low']:+.3f}..{s['ci_high']:+.3f}; {s['wins']} better / {s['losses']} worse)"
        )
    for name, s in (c.get("ground_truth") or {}).items():
        lines.append(f"  true {name:<13} {s['mean_a']:.3f} -> {s['mean_b']:.3f}  ({s['diff']:+.3f})")
    lines.append(
        f"repair: {r['accepted']} of {r['considered']} images repaired "
        f"({r['rejected']} kept their original, {r['failed']} failed, {r['skipped']} decided before)"
    )
    store = RunStore(summary["root"])
    records = {r.id: r for r in store.records()}  # valid records only; unreadable files were reported
    decisions, _ = read_json_files(store, REPAIRS)
    done = [
        (records[d["parent_id"]], records[d["repaired_id"]])
        for d in decisions.values()
        if isinstance(d, dict) and d.get("parent_id") in records and d.get("repaired_id") in records
    ]
    if done and all(a.truth and b.truth for a, b in done):
        before = sum(a.truth["implausible_area"] for a, _ in done) / len(done)
        after = sum(b.truth["implausible_area"] for _, b in done) / len(done)
        lines.append(
            f"  true implausible area of the repaired images: {before:.4f} -> {after:.4f} "
            f"({(after - before) / max(before, 1e-12):+.0%})"
        )
    if c.get("report"):
        lines.append(f"comparison report: {c['report']}")
    lines.append(f"manifest: {summary['manifest']['manifest']} ({summary['manifest']['records']} records)")
    return "\n".join(lines)


def cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses

    from finetune.lora import LoraTrainConfig, finetune

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoraTrainConfig) if hasattr(args, f.name)}
    if args.target_modules:
        flags["target_modules"] = tuple(args.target_modules.split(","))
    if args.config:
        cfg = LoraTrainConfig.from_json(args.config, **flags)
    else:
        if not args.data_dir or not args.out_dir:
            print("error: give --config FILE.json, or --data-dir and --out-dir", file=sys.stderr)
            return 2
        cfg = LoraTrainConfig(**{k: v for k, v in flags.items() if v is not None})
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
    prompts = _prompts(args)
    _prefect_home(args.out)
    from flows.loop import compare_checkpoints, comparison_markdown

    summary = compare_checkpoints(
        root=args.out,
        prompts=prompts,
        generator=args.generator,
        lora_a=args.lora_a,
        lora_b=args.lora_b,
        generator_b=args.generator_b,
        rahf=_rahf_source(args.rahf),
        per_prompt=args.per_prompt,
        device=args.device,
    )
    print(comparison_markdown(summary))
    return _compare_exit(summary)


def _compare_exit(summary: dict) -> int:
    """1 (and a message on stderr) when an image of either side is missing or failed, or no pair was scored."""
    short = {side: summary.get("failed", {}).get(side, 0) + summary.get("missing", {}).get(side, 0) for side in "ab"}
    if summary["pairs"] == 0 or any(short.values()):
        print(
            f"error: {summary['pairs']} pairs compared; images without a score: A {short['a']}, B {short['b']} "
            f"(of {summary.get('planned', '?')} each); see errors/ under compare/a and compare/b",
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
    _prefect_home(args.out)
    from flows.loop import repair_images

    report = repair_images(
        root=args.out,
        ids=args.ids or None,
        below=args.below,
        generator=args.generator,
        lora=args.lora,
        rahf=_rahf_source(args.rahf),
        options={"n": args.n, "margin": args.margin},
        limit=args.limit,
        device=args.device,
    )
    print(json.dumps(report, indent=1))
    if report["failed"]:
        print(
            f"error: {len(report['failed'])} repairs failed (errors/repair-<id>.json); a rerun retries them",
            file=sys.stderr,
        )
        return 1
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
    from rahf.data.synthetic import write_split

    for split, n in (("train", args.train), ("dev", args.dev), ("test", args.test)):
        if n:
            path = write_split(args.out, split, n, size=args.size, seed=args.seed)
            print(f"{split}: {n} examples -> {path}")
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
    if args.config:
        cfg = TrainConfig.from_json(args.config, **flags)
    else:
        if not args.data_dir or not args.out_dir:
            print("error: give --config FILE.json, or --data-dir and --out-dir", file=sys.stderr)
            return 2
        cfg = TrainConfig(**{k: v for k, v in flags.items() if v is not None})
    summary = train(cfg)
    if summary["main_process"]:  # several processes (accelerate launch / torchrun): one summary
        print(json.dumps(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rahf.evaluate import evaluate, load_ground_truth, markdown, predict_with_scorer, write_results
    from rahf.scorer import RAHFScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    gt = load_ground_truth(args.data, args.split)
    results = {}
    scorer = None
    for spec in args.model or []:
        name, _, path = spec.rpartition("=")
        scorer = RAHFScorer.from_pretrained(path, device=args.device, batch_size=args.batch_size)
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
    import torch

    from compare.loop_gain import LoopGainConfig, RandomScorer, run_loop_gain
    from generators.registry import GROUND_TRUTH, build_scorer

    if args.threads:
        torch.set_num_threads(args.threads)
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
        repair_n=args.repair_n,
        repair_margin=args.repair_margin,
        mask_threshold=args.mask_threshold,
        mask_threshold_mode=args.mask_threshold_mode,
        mask_floor=args.mask_floor,
        mask_dilate_frac=args.mask_dilate_frac,
        repair_heat_drop=args.repair_heat_drop,
        seed=args.seed,
        n_boot=args.n_boot,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="richfeedback", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score images against their prompts; write scores, overlays, keywords")
    p.add_argument("--items", help='JSONL of {"image": path, "prompt": text}')
    p.add_argument("--image", nargs="+", help="image files (with --prompt)")
    p.add_argument("--prompt", help="the prompt of the --image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--strict", action="store_true", help="refuse an --items file with any bad line (exit 2)")
    _add_scorer_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("samples", help="score the bundled sample images")
    p.add_argument("--out", default="outputs/samples")
    _add_scorer_args(p)
    p.set_defaults(func=cmd_samples)

    for name, helptext in (
        ("demo", "the feedback loop on the embedded offline default (synthetic world, trained rahf-tiny)"),
        ("loop", "the feedback loop: generate, score, select, finetune, compare, repair"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", default="outputs/demo", help="run folder: a local path or s3://bucket/prefix")
        p.add_argument("--generator", default="synthetic", help="synthetic | amused-tiny | sd-tiny | <id or folder>")
        p.add_argument(
            "--rahf",
            default="synthetic-default",
            help="RAHF folder or hub id; synthetic-default trains (once) and caches rahf-tiny",
        )
        p.add_argument("--prompts", help="a text file, one prompt per line (default: prompts of the grammar)")
        p.add_argument("--strict", action="store_true", help="refuse a --prompts file with any bad line (exit 2)")
        p.add_argument("--num-prompts", type=int, default=12)
        p.add_argument("--per-prompt", type=int, default=8)
        p.add_argument("--compare-per-prompt", type=int, default=4)
        p.add_argument("--threshold", type=float, default=0.8, help="plausibility a selected image must reach")
        p.add_argument("--select-by", default="overall", help="the score that picks the best image per prompt")
        p.add_argument(
            "--repair-below",
            type=float,
            default=1.0,
            help="repair images whose predicted plausibility is below this (1.0: the least plausible)",
        )
        p.add_argument("--repair-limit", type=int, default=12, help="repair at most this many, worst first")
        p.add_argument("--repair-margin", type=float, default=0.0, help="a repair must beat the original by this")
        p.add_argument(
            "--mask-threshold",
            type=float,
            default=0.25,
            help="implausibility heat that enters the repair mask (the tiny model's heat peaks near 0.3)",
        )
        p.add_argument("--finetune-steps", type=int, default=None, help="LoRA steps (diffusers generators)")
        p.add_argument("--device", default="cpu")
        p.set_defaults(func=cmd_loop)

    p = sub.add_parser("finetune", help="LoRA-finetune a generator on a selected image folder (resumable)")
    p.add_argument("--config", help="LoraTrainConfig as JSON; flags override it")
    p.add_argument("--target-modules", help="comma-separated module names (default: attention projections)")
    for name, typ in (
        ("data_dir", str),
        ("out_dir", str),
        ("generator", str),
        ("rank", int),
        ("alpha", float),
        ("lr", float),
        ("steps", int),
        ("batch_size", int),
        ("grad_accum", int),
        ("mixed_precision", str),
        ("seed", int),
        ("checkpoint_every", int),
        ("log_every", int),
        ("device", str),
        ("prior_strength", float),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="compare two checkpoints on the same prompts and seeds (stats + report)")
    p.add_argument("--out", required=True, help="run folder: a local path or s3://bucket/prefix")
    p.add_argument("--generator", default="synthetic", help="checkpoint A: preset, hub id or folder")
    p.add_argument("--lora-a", help="adapter folder on top of A")
    p.add_argument("--generator-b", help="checkpoint B (default: the same base as A)")
    p.add_argument("--lora-b", help="adapter folder on top of B")
    p.add_argument("--rahf", default="synthetic-default")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--strict", action="store_true", help="refuse a --prompts file with any bad line (exit 2)")
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("rating-sheet", help="a blind A/B rating sheet (CSV) from a comparison run, with a key")
    p.add_argument("comparison", help="the --out folder of a compare run")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_rating_sheet)

    p = sub.add_parser("rating-score", help="score filled rating sheets into the five B-vs-A bins")
    p.add_argument("sheets", nargs="+")
    p.add_argument("--key", required=True)
    p.set_defaults(func=cmd_rating_score)

    p = sub.add_parser("repair", help="best-of-N repair of low-plausibility (or named) images of a run")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--ids", nargs="*", help="record ids to repair (default: all below --below)")
    p.add_argument("--below", type=float, default=0.8)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--generator", default="synthetic")
    p.add_argument("--lora")
    p.add_argument("--rahf", default="synthetic-default")
    p.add_argument("--n", type=int, default=4, help="inpainted candidates per image")
    p.add_argument("--margin", type=float, default=0.02)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("save-preset", help="build a RAHF preset and save it as a model folder")
    p.add_argument("preset", help="rahf-tiny | richhf-base")
    p.add_argument("out")
    p.add_argument("--variant", default="multi_head", choices=["multi_head", "augmented_prompt"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action="store_true", help="load the backbones' hub weights (needs the hub)")
    p.set_defaults(func=cmd_save_preset)

    p = sub.add_parser("synth", help="write a synthetic rich-feedback benchmark in the RichHF-18K schema")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--dev", type=int, default=200)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train RAHF (resumes from the last checkpoint in --out-dir)")
    p.add_argument("--config", help="TrainConfig as JSON; flags override it")
    for name, typ in (
        ("data_dir", str),
        ("out_dir", str),
        ("preset", str),
        ("variant", str),
        ("steps", int),
        ("batch_size", int),
        ("grad_accum", int),
        ("lr", float),
        ("weight_decay", float),
        ("warmup_steps", int),
        ("mixed_precision", str),
        ("seed", int),
        ("checkpoint_every", int),
        ("eval_every", int),
        ("log_every", int),
        ("device", str),
        ("heatmap_loss_weight", float),
        ("score_loss_weight", float),
        ("token_loss_weight", float),
        ("empty_heatmap_weight", float),
        ("itm_loss_weight", float),
        ("itm_negatives", int),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    p.add_argument(
        "--channels-last", dest="channels_last", action="store_true", default=None, help="channels-last heads"
    )
    p.add_argument(
        "--heatmap-loss",
        dest="heatmap_loss",
        choices=("mse", "bce"),
        default=None,
        help="per-pixel map loss (default mse)",
    )
    p.add_argument(
        "--heatmap-weight",
        dest="heatmap_weight_specs",
        action="append",
        metavar="MAP=FACTOR",
        help="a per-map factor on --heatmap-loss-weight, e.g. misalignment=2 (repeatable; others stay 1)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="the paper's Tables 1-4 for models and baselines on a split")
    p.add_argument("--data", required=True, help="folder with <split>.tfrecord and <split>.jsonl")
    p.add_argument("--split", default="test")
    p.add_argument("--model", action="append", help="NAME=PATH of a RAHF folder (repeatable)")
    p.add_argument("--baselines", action="store_true", help="also train and evaluate the two baselines")
    p.add_argument("--baseline-steps", type=int, default=300)
    p.add_argument("--baseline-batch-size", type=int, default=16)
    p.add_argument("--baseline-lr", type=float, default=1e-3)
    p.add_argument(
        "--baseline-empty-heatmap-weight",
        type=float,
        default=0.0,
        help="extra map-loss weight on samples with an empty target, as RAHF's --empty-heatmap-weight",
    )
    p.add_argument(
        "--baseline-heatmap-loss",
        choices=("mse", "bce"),
        default="mse",
        help="the small CNN's per-pixel map loss, as RAHF's --heatmap-loss",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench-loop", help="loop-gain benchmark: how much of the oracle's true gain a scorer gets in the loop"
    )
    p.add_argument("--out", default="outputs/bench-loop", help="folder for loop_gain.json, .md and .png")
    p.add_argument(
        "--rahf",
        default="synthetic-default",
        help="RAHF folder, hub id or preset; synthetic-default trains (once) and caches rahf-tiny",
    )
    p.add_argument("--scorers", default="random,rahf,oracle", help="comma list of random, rahf, oracle")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16, help="training prompts per round")
    p.add_argument("--per-prompt", type=int, default=8, help="candidates per training prompt")
    p.add_argument("--heldout-prompts", type=int, default=16)
    p.add_argument("--heldout-per-prompt", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image side of the synthetic world")
    p.add_argument("--select-by", default="overall", help="the score that picks the best candidate per prompt")
    p.add_argument("--repair-limit", type=int, default=8, help="held-out images repaired per round, least plausible")
    p.add_argument("--repair-n", type=int, default=4, help="inpainted candidates per repair")
    p.add_argument("--repair-margin", type=float, default=0.0)
    p.add_argument("--mask-threshold", type=float, default=0.4)
    p.add_argument(
        "--mask-threshold-mode",
        choices=("absolute", "quantile", "relative"),
        default="relative",
        help="relative: heat above threshold x the map's own maximum",
    )
    p.add_argument("--mask-floor", type=float, default=0.1, help="heat every masked pixel must also exceed")
    p.add_argument("--mask-dilate-frac", type=float, default=0.06, help="mask dilation, fraction of the image side")
    p.add_argument(
        "--repair-heat-drop",
        type=float,
        default=0.02,
        help="a candidate must cut the mean predicted heat inside the mask by this fraction (0: off)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_bench_loop)

    p = sub.add_parser("import-richhf", help="convert a youweiliang/RichHF .pt checkpoint to safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--preset", default="richhf-base")
    p.add_argument("--tokenizer", default=None, help="T5 tokenizer id or folder (default: the preset's)")
    p.set_defaults(func=cmd_import_richhf)
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.lines import BadLinesError
    from common.registry import UnknownNameError

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
