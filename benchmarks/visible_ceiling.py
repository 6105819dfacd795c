"""The image-only ceiling of the synthetic benchmark: how the scores of what each image shows match its labels.

The labels of the synthetic world are its exact truth, so the truth itself scores 1.000 on every bounded number.
One flaw pair is invisible, though: when a group's missing object and its extra object cancel, the image shows the
prompt's count, shape and colour while the labels mark the count and shape words misaligned
(``rahf.data.synthetic.cancelled_groups``). A model that sees only the image cannot score those labels, so the
ceiling it can reach is what ``visible_scores`` (the labels with those words counted as aligned) gets against the
labels. Plausibility and aesthetics do not depend on the pair: their ceiling stays 1.000.

Usage: python benchmarks/visible_ceiling.py --data SPLIT_FOLDER [--split test] [--out ceiling.md]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.names import SCORE_NAMES
from rahf.data.richhf import read_richhf
from rahf.data.synthetic import cancelled_groups, visible_scores
from rahf.metrics import plcc, srcc


def visible_ceiling(data: Path, split: str) -> dict[str, object]:
    """PLCC / SRCC of the visible scores against the labels for every score of ``data``/``split`` (a split folder
    of the synthetic world: ``<split>.jsonl`` with each image's flaws beside ``<split>.tfrecord``)."""
    from benchmarks import synthetic_rows

    rows = synthetic_rows(data, split)
    labels = {e.uid: e.scores for e in read_richhf(data / f"{split}.tfrecord")}
    missing = [r["uid"] for r in rows if r["uid"] not in labels]
    if missing:
        raise ValueError(f"{data / split}.tfrecord has no labels for {len(missing)} images, e.g. {missing[0]!r}")
    truth = np.array([[labels[r["uid"]][s] for s in SCORE_NAMES] for r in rows], np.float64)
    seen = np.array(
        [[visible_scores(r["prompt"], r["flaws"], labels[r["uid"]])[s] for s in SCORE_NAMES] for r in rows],
        np.float64,
    )
    hidden = sum(1 for r in rows if cancelled_groups(r["flaws"]))
    per_score = {
        s: {"plcc": plcc(seen[:, j], truth[:, j]), "srcc": srcc(seen[:, j], truth[:, j])}
        for j, s in enumerate(SCORE_NAMES)
    }
    return {"images": len(rows), "with_cancelled_pair": hidden, "scores": per_score}


def markdown(result: dict, data: Path, split: str) -> str:
    lines = [
        f"Image-only ceiling on `{data}` split `{split}`: {result['with_cancelled_pair']} of {result['images']} "
        "images have a group whose missing and extra objects cancel.",
        "",
        "| score | PLCC | SRCC |",
        "|---|---:|---:|",
    ]
    lines += [f"| {s} | {v['plcc']:.3f} | {v['srcc']:.3f} |" for s, v in result["scores"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="split folder of the synthetic world")
    ap.add_argument("--split", default="test", help="split to measure (default: test)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    from benchmarks import emit  # the repository root is on sys.path under pytest and when run as a script

    text = markdown(visible_ceiling(args.data, args.split), args.data, args.split)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
