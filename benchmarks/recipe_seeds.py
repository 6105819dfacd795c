"""Two training recipes against each other over seeds: the 25 numbers of Tables 1-4 and the within-prompt ranking.

Each recipe is given as evaluation folders (``metrics.json`` of ``richfeedback eval``), one per seed. For every
number the table shows each recipe's mean and its spread (max - min over its seeds), the difference of the means
in the number's better direction, and whether the new recipe wins by more than the larger of the two spreads
(``firm``) — a difference the seeds alone do not make.

Usage: python benchmarks/recipe_seeds.py --base runs/eval-a-s0 runs/eval-a-s1 ... --new runs/eval-b-s0 ...
       [--base-name A] [--new-name B] [--model NAME] [--ranking] [--per-seed] [--out table.md]
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


def load(folder: str | Path, model: str | None = None) -> dict:
    """The tables of one model in ``folder/metrics.json`` (the only model, or ``model``)."""
    tables = json.loads((Path(folder) / "metrics.json").read_text())
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
    means, the larger spread, and ``firm`` (gain > that spread); a number missing in a folder is skipped."""
    rows = []
    for table, path, higher in numbers:
        a = [value(t, path) for t in base]
        b = [value(t, path) for t in new]
        if any(v is None for v in a + b):
            continue
        sign = 1.0 if higher else -1.0
        gain = sign * (statistics.fmean(b) - statistics.fmean(a)) + 0.0  # + 0.0: a tie is +0, never -0
        spread = max(max(a) - min(a), max(b) - min(b))
        rows.append(
            {
                "table": table,
                "metric": "/".join(path[1:]).removesuffix("/mean"),
                "higher": higher,
                "base": a,
                "new": b,
                "gain": gain,
                "spread": spread,
                "firm": gain > spread,
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
    lines += ["", f"{new_name} better on {wins} of {len(rows)}; by more than the seeds' spread on {firm}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", nargs="+", required=True, help="evaluation folders of the base recipe, one per seed")
    p.add_argument("--new", nargs="+", required=True, help="evaluation folders of the new recipe, one per seed")
    p.add_argument("--base-name", default="base")
    p.add_argument("--new-name", default="new")
    p.add_argument("--model", help="the model's name in metrics.json when a folder holds several")
    p.add_argument("--ranking", action="store_true", help="compare the within-prompt ranking numbers instead")
    p.add_argument("--per-seed", action="store_true", help="show every seed's value instead of mean ± half spread")
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args()
    base = [load(f, args.model) for f in args.base]
    new = [load(f, args.model) for f in args.new]
    text = markdown(
        compare(base, new, RANKING_NUMBERS if args.ranking else TABLE_NUMBERS),
        args.base_name,
        args.new_name,
        per_seed=args.per_seed,
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
