"""Where a RAHF model's alignment errors come from, by the kind of misalignment an image has (a diagnostic).

In the synthetic world an image's alignment falls for three kinds of flaw of a group: a wrong colour (its colour
word is misaligned), a missing object (count and shape words) and an extra object (count word). This groups the
images of a split by their number of prompt groups and the set of those kinds they have, and gives per group of
images the mean true alignment beside the model's mean alignment score, the mean peak of its misalignment map and
the mean number of words it marks. A kind the model does not see shows as a mean score near that of flawless
images of the same size while the truth is far lower.

The summary line is each kind's *gap*, on one-group prompts: the mean score of flawless images minus that of
images with that kind alone, beside the same gap of the truth (1/3 for a wrong colour or an extra object, 2/3 for
a missing one). A gap near the truth's means the score sees that kind; near 0 means it is blind to it.

Usage: python benchmarks/alignment_by_flaw.py --data SPLIT_FOLDER --model NAME=RUN/best [--model ...]
       [--split test] [--threads 2] [--out by_flaw.md]
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.names import HEATMAP_NAMES, SCORE_NAMES

ALIGNMENT, MISALIGNMENT = SCORE_NAMES[1], HEATMAP_NAMES[1]
#: flaws of the synthetic world that lower alignment (``rahf.data.synthetic.compose``), in table order
KINDS = ("wrong_colour", "missing", "extra")


def flaw_key(prompt: str, flaws: Sequence[str]) -> tuple[int, str]:
    """(number of prompt groups, the alignment flaw kinds of the image joined by "+", or "none")."""
    from rahf.data.synthetic import parse_prompt

    kinds = {f.split(":")[0] for f in flaws}
    return len(parse_prompt(prompt)), "+".join(k for k in KINDS if k in kinds) or "none"


def by_flaw(rows: Sequence[tuple[tuple[int, str], float, float, float, int]]) -> dict[tuple[int, str], np.ndarray]:
    """Per key, (count, mean truth, mean score, mean map peak, mean marked words) of rows
    (key, truth, score, map peak, marked words)."""
    groups: dict[tuple[int, str], list] = defaultdict(list)
    for key, *values in rows:
        groups[key].append(values)
    return {k: np.r_[len(v), np.mean(np.asarray(v, np.float64), axis=0)] for k, v in sorted(groups.items())}


def gaps(table: dict[tuple[int, str], np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per kind with one-group images alone and flawless ones: (truth gap, score gap), flawless minus that kind."""
    clean = table.get((1, "none"))
    out = {}
    for kind in KINDS:
        row = table.get((1, kind))
        if clean is not None and row is not None:
            out[kind] = (float(clean[1] - row[1]), float(clean[2] - row[2]))
    return out


def model_rows(model: str, data: Path, split: str, threads: int) -> tuple[list, list[str]]:
    """(key, truth, score, map peak, marked words) for every image of the split that could be scored, and
    ``"<image>: <why>"`` for each that could not."""
    import torch

    from benchmarks import score_each, synthetic_rows
    from rahf.data.richhf import read_richhf
    from rahf.scorer import RAHFScorer

    torch.set_num_threads(threads)
    meta = synthetic_rows(data, split)
    truth = {e.uid: e.scores[ALIGNMENT] for e in read_richhf(data / f"{split}.tfrecord")}
    scorer = RAHFScorer.from_pretrained(model)
    scored, skipped = score_each(scorer, [m["prompt"] for m in meta], [data / m["image"] for m in meta])
    rows = []
    for i, fb in scored:
        m = meta[i]
        if m["uid"] not in truth:
            skipped.append(f"{m['image']}: no label for uid {m['uid']!r} in {split}.tfrecord")
            continue
        peak = float(np.max(fb.heatmaps[MISALIGNMENT]))
        key = flaw_key(m["prompt"], m["flaws"])
        rows.append((key, truth[m["uid"]], fb.scores[ALIGNMENT], peak, len(fb.misaligned_keywords)))
    return rows, skipped


def model_tables(specs: Sequence[str], data: Path, split: str, threads: int) -> tuple[dict[str, dict], list[str]]:
    """(name -> :func:`by_flaw` table, skipped images) for ``NAME=PATH`` specs (a bare PATH is named after its
    folder); an image that fails for several models is named once."""
    from benchmarks import named_models

    tables: dict[str, dict] = {}
    skipped: list[str] = []
    for name, path in named_models(specs):
        rows, bad = model_rows(path, data, split, threads)
        tables[name] = by_flaw(rows)
        skipped += [x for x in bad if x not in skipped]
    return tables, skipped


def markdown(tables: dict[str, dict], skipped: Sequence[str], min_count: int) -> str:
    lines = [
        f"Alignment by misalignment kind (groups of at least {min_count} images): mean true alignment, mean score, "
        "mean misalignment-map peak, mean marked words.",
        "",
        "| model | groups | kinds | images | truth | score | map peak | marked words |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, table in tables.items():
        for (n_groups, kinds), (count, t, s, peak, words) in table.items():
            if count >= min_count:
                lines.append(
                    f"| {name} | {n_groups} | {kinds} | {int(count)} | {t:.3f} | {s:.3f} | {peak:.3f} | {words:.2f} |"
                )
    lines += ["", "Gap on one-group prompts, flawless minus that kind alone (truth / score):", ""]
    for name, table in tables.items():
        parts = [f"{kind} {t:.3f} / {s:.3f}" for kind, (t, s) in gaps(table).items()]
        lines.append(f"- {name}: " + "; ".join(parts))
    from benchmarks import with_skipped

    return with_skipped(lines, skipped)


def main(argv: Sequence[str] | None = None) -> int:
    # the repository root is on sys.path under pytest and when run as a script
    from benchmarks import diagnostic_parser, emit

    ap = diagnostic_parser(__doc__, "split folder of the synthetic world", "NAME=PATH of a RAHF folder (repeatable)")
    ap.add_argument("--split", default="test", help="split to measure (default: test)")
    ap.add_argument("--min-count", type=int, default=3, help="leave out groups of fewer images (default: 3)")
    args = ap.parse_args(argv)
    emit(markdown(*model_tables(args.model, args.data, args.split, args.threads), args.min_count), args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
