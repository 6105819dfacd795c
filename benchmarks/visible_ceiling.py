"""The image-only ceiling of the synthetic benchmark: how the scores of what each image shows match its labels.

The labels of the synthetic world are its exact truth, so the truth itself scores 1.000 on every bounded number.
One flaw pair is invisible, though: when a group's missing object and its extra object cancel, the image shows the
prompt's count, shape and colour while the labels mark the count and shape words misaligned
(``rahf.data.synthetic.cancelled_groups``). A model that sees only the image cannot score those labels, so the
ceiling it can reach is what ``visible_scores`` (the labels with those words counted as aligned) gets against the
labels. Plausibility and aesthetics do not depend on the pair: their ceiling stays 1.000.

With ``--model NAME=DIR`` (repeatable) each trained model scores the split (through its folder's read-out, as it
is shipped), and its alignment and overall scores are correlated with both the labels and the visible scores. The
second says how much of what the images show the model reads; the gap between the two is what the invisible pair
costs it.

Usage: python benchmarks/visible_ceiling.py --data SPLIT_FOLDER [--split test] [--model NAME=DIR ...]
       [--threads 2] [--out ceiling.md]
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

#: the scores a model's rows report (the two the invisible pair moves)
MODEL_SCORES = ("alignment", "overall")


def split_scores(data: Path, split: str) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The rows of ``data``/``split`` (a split folder of the synthetic world: ``<split>.jsonl`` with each image's
    flaws beside ``<split>.tfrecord``), their labels and their visible scores, both (N, 4) in SCORE_NAMES order."""
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
    return rows, truth, seen


def visible_ceiling(data: Path, split: str) -> dict[str, object]:
    """PLCC / SRCC of the visible scores against the labels for every score of ``data``/``split``."""
    return ceiling_of(*split_scores(data, split))


def ceiling_of(rows: Sequence[dict], truth: np.ndarray, seen: np.ndarray) -> dict[str, object]:
    """:func:`visible_ceiling` of the rows, labels and visible scores :func:`split_scores` returns."""
    hidden = sum(1 for r in rows if cancelled_groups(r["flaws"]))
    per_score = {
        s: {"plcc": plcc(seen[:, j], truth[:, j]), "srcc": srcc(seen[:, j], truth[:, j])}
        for j, s in enumerate(SCORE_NAMES)
    }
    return {"images": len(rows), "with_cancelled_pair": hidden, "scores": per_score}


def against_both(predicted: np.ndarray, truth: np.ndarray, seen: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Per score of MODEL_SCORES: PLCC / SRCC of ``predicted`` against the labels (``truth``) and against the
    visible scores (``seen``); all three (N, 4) in SCORE_NAMES order."""
    out = {}
    for s in MODEL_SCORES:
        j = SCORE_NAMES.index(s)
        out[s] = {
            ref: {"plcc": plcc(predicted[:, j], y[:, j]), "srcc": srcc(predicted[:, j], y[:, j])}
            for ref, y in (("labels", truth), ("visible", seen))
        }
    return out


def model_scores(model: str, data: Path, split: str, threads: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(M, 4) scores of ``model`` (its read-out applied when the folder has one) for the rows of ``data``/``split``
    it could score, the (M,) indices of those rows, and ``"<image>: <why>"`` for each it could not."""
    import torch

    from benchmarks import score_each, synthetic_rows
    from rahf.scorer import RAHFScorer

    torch.set_num_threads(threads)
    rows = synthetic_rows(data, split)
    scorer = RAHFScorer.from_pretrained(model)
    scored, skipped = score_each(scorer, [r["prompt"] for r in rows], [data / r["image"] for r in rows])
    predicted = np.array([[fb.scores[s] for s in SCORE_NAMES] for _, fb in scored], np.float64)
    return predicted.reshape(-1, len(SCORE_NAMES)), np.array([i for i, _ in scored], np.int64), skipped


def markdown(
    result: dict, data: Path, split: str, models: dict[str, dict] | None = None, skipped: Sequence[str] = ()
) -> str:
    lines = [
        f"Image-only ceiling on `{data}` split `{split}`: {result['with_cancelled_pair']} of {result['images']} "
        "images have a group whose missing and extra objects cancel.",
        "",
        "| score | PLCC | SRCC |",
        "|---|---:|---:|",
    ]
    lines += [f"| {s} | {v['plcc']:.3f} | {v['srcc']:.3f} |" for s, v in result["scores"].items()]
    if models:
        lines += [
            "",
            "Models (scores through each folder's read-out), PLCC / SRCC against the labels and against the visible "
            "scores:",
            "",
            "| model | score | labels | visible |",
            "|---|---|---:|---:|",
        ]
        for name, table in models.items():
            for s, refs in table.items():
                cells = [f"{refs[r]['plcc']:.3f} / {refs[r]['srcc']:.3f}" for r in ("labels", "visible")]
                lines.append(f"| {name} | {s} | {cells[0]} | {cells[1]} |")
    from benchmarks import with_skipped

    return with_skipped(lines, skipped)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="split folder of the synthetic world")
    ap.add_argument("--split", default="test", help="split to measure (default: test)")
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME=DIR of a trained RAHF to score too (repeatable; default: none)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    # the repository root is on sys.path under pytest and when run as a script
    from benchmarks import emit, named_models

    rows, truth, seen = split_scores(args.data, args.split)
    models, skipped = {}, []
    for name, path in named_models(args.model):
        predicted, kept, bad = model_scores(path, args.data, args.split, args.threads)
        models[name] = against_both(predicted, truth[kept], seen[kept])
        skipped += [x for x in bad if x not in skipped]  # the same file fails for every model
    text = markdown(ceiling_of(rows, truth, seen), args.data, args.split, models, skipped)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
