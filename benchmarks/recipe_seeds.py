"""Two training recipes against each other over seeds: the 25 numbers of Tables 1-4 and the within-prompt ranking.

Each recipe is given as evaluation folders (``metrics.json`` of ``richfeedback eval``), one per seed. For every
number the table shows each recipe's mean and its spread (max - min over its seeds), the difference of the means
in the number's better direction, and whether the new recipe wins by more than the larger of the two spreads
(``firm``) — a difference the seeds alone do not make. The summary line also counts two weaker readings of "better
beyond the seeds": the gain is larger than the new recipe's own spread (``beyond_own``), and the new recipe's worst
seed beats the base's best seed (``every_seed``). ``firm`` implies ``beyond_own`` but not ``every_seed``
(the new recipe's worst seed can still fall short of the base's best).

With ``--loop`` the folders are loop-gain benchmark outputs instead (``loop_gain.json`` of ``richfeedback
bench-loop --rahf <model of one seed>``, all run with the same settings), and the numbers are what the RAHF scorer
did in the loop: each round's share of the oracle's selection gain, the true plausibility its round-1 picks gained,
its within-prompt Spearman on the round-1 candidates, the held-out true scores after the last round and the
change of the true implausible area that round-1 repair made.

Usage: python benchmarks/recipe_seeds.py --base runs/eval-a-s0 runs/eval-a-s1:model-s1 ... --new runs/eval-b-s0 ...
       [--base-name A] [--new-name B] [--model NAME] [--ranking | --loop] [--per-seed] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common.names import HEATMAP_NAMES, SCORE_NAMES

#: (table, path into metrics.json, higher is better) for the 25 numbers of Tables 1-4.
TABLE_NUMBERS: list[tuple[str, tuple[str, ...], bool]] = [
    *[("1 scores", ("scores", s, m), True) for s in SCORE_NAMES for m in ("plcc", "srcc")],
    *[
        (f"{t} {h}", ("heatmaps", h, m), m not in ("mse", "mse_gt0", "kld"))
        for t, h in zip(("2", "3"), HEATMAP_NAMES, strict=True)
        for m in ("mse", "mse_gt0", "cc", "kld", "sim", "nss", "auc_judd")
    ],
    *[("4 keywords", ("keywords", m), True) for m in ("precision", "recall", "f1")],
]
#: Within-prompt ranking numbers (present when the evaluated split has groups of images of one prompt).
RANKING_NUMBERS: list[tuple[str, tuple[str, ...], bool]] = [
    ("within-prompt", ("within_prompt", s, m, "mean"), m != "top1_regret")
    for s in SCORE_NAMES
    for m in ("spearman", "pairwise_accuracy", "top1_regret")
]


def loop_numbers(rounds: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """The loop-gain numbers of a benchmark run with ``rounds`` rounds (paths into :func:`load_loop`'s dict)."""
    return [
        *[("loop selection", ("loop", f"round {r} share of the oracle's gain"), True) for r in range(1, rounds + 1)],
        ("loop selection", ("loop", "round 1 true plausibility gain of the picks"), True),
        ("loop selection", ("loop", "round 1 within-prompt Spearman, overall"), True),
        ("loop generator", ("loop", "held-out true overall after the last round"), True),
        ("loop generator", ("loop", "held-out true plausibility after the last round"), True),
        ("loop repair", ("loop", "round 1 repair: true implausible area change"), False),
    ]


def load_loop(folder: str | Path) -> dict:
    """The RAHF scorer's numbers in ``folder/loop_gain.json`` as ``{"loop": {name: value}, "config": ...}``."""
    path = Path(folder) / "loop_gain.json"
    data = json.loads(path.read_text())
    if "rahf" not in data["curve"]:
        raise ValueError(f"{path} has no RAHF scorer (scorers: {sorted(data['curve'])}); run bench-loop --rahf")
    runs = [r["scorers"]["rahf"] for r in data["rounds"]]
    final = data["curve"]["rahf"][-1]
    numbers = {
        f"round {i} share of the oracle's gain": r["selection"]["share_of_oracle_gain"]["mean"]
        for i, r in enumerate(runs, start=1)
    }
    numbers |= {
        "round 1 true plausibility gain of the picks": runs[0]["selection"]["true"]["plausibility"]["gain"],
        "round 1 within-prompt Spearman, overall": runs[0]["selection"]["within_prompt"]["overall"]["spearman"]["mean"],
        "held-out true overall after the last round": final["overall"]["mean"],
        "held-out true plausibility after the last round": final["plausibility"]["mean"],
        "round 1 repair: true implausible area change": runs[0]["repair"]["area_diff"],
    }
    return {"loop": numbers, "config": data["config"], "rounds": len(runs)}


def load_loops(folders: list[str | Path]) -> list[dict]:
    """:func:`load_loop` of every folder; refuses runs whose settings differ (their numbers do not compare)."""
    runs = [load_loop(f) for f in folders]
    for folder, run in zip(folders[1:], runs[1:], strict=True):
        if run["config"] != runs[0]["config"]:
            keys = sorted(
                k
                for k in run["config"].keys() | runs[0]["config"].keys()
                if run["config"].get(k) != runs[0]["config"].get(k)
            )
            raise ValueError(f"{folder} was run with other loop settings than {folders[0]} ({', '.join(keys)})")
    return runs


def load(folder: str | Path, model: str | None = None) -> dict:
    """The tables of one model in ``folder/metrics.json`` (the only model, or ``model``). ``folder`` may name its
    model itself as ``FOLDER:MODEL`` (when no folder of that whole name exists), which overrides ``model``."""
    folder = Path(folder)
    if not folder.exists() and ":" in folder.name:
        name, _, model = str(folder).rpartition(":")
        folder = Path(name)
    tables = json.loads((folder / "metrics.json").read_text())
    if model is None and len(tables) == 1:
        return next(iter(tables.values()))
    if model not in tables:
        raise ValueError(f"{folder}/metrics.json holds {sorted(tables)}: name one of them with --model")
    return tables[model]


def value(tables: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(tables, dict) or key not in tables:
            return None
        tables = tables[key]
    return float(tables)


def compare(base: list[dict], new: list[dict], numbers=TABLE_NUMBERS) -> list[dict]:
    """One row per number: both recipes' values over seeds, the gain (new - base in the better direction) of the
    means, the larger spread, ``firm`` (gain > that spread), ``beyond_own`` (gain > the new recipe's spread) and
    ``every_seed`` (the new recipe's worst seed better than the base's best); a number missing in a folder is
    skipped."""
    rows = []
    for table, path, higher in numbers:
        a = [value(t, path) for t in base]
        b = [value(t, path) for t in new]
        if any(v is None for v in a + b):
            continue
        sign = 1.0 if higher else -1.0
        gain = sign * (statistics.fmean(b) - statistics.fmean(a)) + 0.0  # + 0.0: a tie is +0, never -0
        spread_base, spread_new = max(a) - min(a), max(b) - min(b)
        worst_new, best_base = (min(b), max(a)) if higher else (-max(b), -min(a))
        rows.append(
            {
                "table": table,
                "metric": "/".join(path[1:]).removesuffix("/mean"),
                "higher": higher,
                "base": a,
                "new": b,
                "gain": gain,
                "spread": max(spread_base, spread_new),
                "firm": gain > max(spread_base, spread_new),
                "beyond_own": gain > spread_new,
                "every_seed": worst_new > best_base,
            }
        )
    return rows


def markdown(rows: list[dict], base_name: str, new_name: str, per_seed: bool = False) -> str:
    """The rows as a markdown table. Each recipe's cell is its mean ± half its spread, or with ``per_seed`` every
    seed's value in the order given (``a / b / c``). ``firm`` reads **yes**, no (a gain inside the spread), tie
    or worse."""

    def cell(vs: list[float]) -> str:
        if per_seed:
            return " / ".join(f"{v:.4g}" for v in vs)
        mean = statistics.fmean(vs)
        return f"{mean:.4g} ± {(max(vs) - min(vs)) / 2:.2g}" if len(vs) > 1 else f"{mean:.4g}"

    shown = "seeds in order" if per_seed else "mean ± half spread"
    lines = [
        f"| table | metric | better | {base_name} ({shown}) | {new_name} | gain | larger spread | firm |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        gain = r["gain"]
        verdict = "**yes**" if r["firm"] else "no" if gain > 0 else "tie" if gain == 0 else "worse"
        lines.append(
            f"| {r['table']} | {r['metric']} | {'higher' if r['higher'] else 'lower'} | {cell(r['base'])} | "
            f"{cell(r['new'])} | {gain:+.4g} | {r['spread']:.3g} | {verdict} |"
        )
    wins = sum(r["gain"] > 0 for r in rows)
    firm = sum(r["firm"] for r in rows)
    own = sum(r["beyond_own"] for r in rows)
    every = sum(r["every_seed"] for r in rows)
    lines += [
        "",
        f"{new_name} better on {wins} of {len(rows)}; by more than the seeds' spread on {firm}.",
        f"Weaker readings: by more than the spread of {new_name} alone on {own}; every seed of {new_name} better "
        f"than every seed of {base_name} on {every}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--base",
        nargs="+",
        required=True,
        help="evaluation folders of the base recipe, one per seed (FOLDER:MODEL names the model in it)",
    )
    p.add_argument(
        "--new", nargs="+", required=True, help="evaluation folders of the new recipe, one per seed (FOLDER:MODEL too)"
    )
    p.add_argument("--base-name", default="base")
    p.add_argument("--new-name", default="new")
    p.add_argument("--model", help="the model's name in metrics.json when a folder holds several")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--ranking", action="store_true", help="compare the within-prompt ranking numbers instead")
    kind.add_argument("--loop", action="store_true", help="the folders hold bench-loop outputs: compare the loop")
    p.add_argument("--per-seed", action="store_true", help="show every seed's value instead of mean ± half spread")
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args()
    if args.loop:
        runs = load_loops([*args.base, *args.new])  # every run of both recipes in the same loop
        base, new = runs[: len(args.base)], runs[len(args.base) :]
        numbers = loop_numbers(base[0]["rounds"])
    else:
        base = [load(f, args.model) for f in args.base]
        new = [load(f, args.model) for f in args.new]
        numbers = RANKING_NUMBERS if args.ranking else TABLE_NUMBERS
    text = markdown(compare(base, new, numbers), args.base_name, args.new_name, per_seed=args.per_seed)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
