"""How much of a trained RAHF's score error a linear read-out of its own outputs removes (a diagnostic).

For every image of a fit split (default ``dev``) and an evaluation split (default ``test``) of a split folder the
model's outputs are summarised as features: the four scores, each heatmap's mean, maximum and area above
``--area-threshold``, the number of marked keywords and their share of the prompt's words. A ridge regression
(standardised features, intercept unpenalised, penalty ``--lam``) is fit on the fit split for each score and
applied to the evaluation split. The table shows PLCC / SRCC of the score head as trained beside those of the
read-out. A large gain says the head underuses what the model already computes (its maps, its keywords); no gain
says the missing information is not in the outputs at all.

With ``--mirror`` every image is also scored mirrored left to right, with "left" and "right" swapped in its
prompt (the same scene seen the other way round), and each feature is the mean of the two views: a test-time
augmentation. A gain from it says the model's errors are noise that a second view averages out; none says they
are what the model does not see in either view.

Nothing here changes the model; it tells where a better score head would come from. A model folder's own score
read-out (``richfeedback calibrate``, :mod:`rahf.readout`, the same fit without the keyword features) is ignored:
the heads are what is compared.

Usage: python benchmarks/score_readout.py --data SPLIT_FOLDER --model RUN/best [--model ...]
       [--fit-split dev] [--eval-split test] [--lam 10] [--mirror] [--threads 2] [--out readout.md]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.metrics import plcc, srcc
from rahf.readout import feature_names, fit_ridge, output_features, predict

#: word swaps that describe a scene mirrored left to right
MIRRORED_WORDS = {"left": "right", "right": "left"}

#: the features of one image, in column order (scores, then per heatmap mean / max / area, then keywords)
FEATURE_NAMES: tuple[str, ...] = (*feature_names(SCORE_NAMES, HEATMAP_NAMES), "keywords/count", "keywords/share")


def features(
    scores: dict[str, float],
    heatmaps: dict[str, np.ndarray],
    keywords: Sequence[str],
    prompt: str,
    area_threshold: float = 0.25,
) -> np.ndarray:
    """(len(FEATURE_NAMES),) float64: one image's summary of the model's outputs (maps in [0, 1]): the read-out's
    features (:func:`rahf.readout.output_features`), then the keyword count and its share of the prompt's words."""
    import torch

    outputs = output_features(
        {s: torch.tensor([float(scores[s])]) for s in SCORE_NAMES},
        {h: torch.as_tensor(np.asarray(heatmaps[h]))[None] for h in HEATMAP_NAMES},
        SCORE_NAMES,
        HEATMAP_NAMES,
        area_threshold,
    )[0]
    n_words = max(1, len(prompt.split()))
    return np.asarray([*outputs.tolist(), float(len(keywords)), len(keywords) / n_words], np.float64)


def mirror_prompt(prompt: str) -> str:
    """The prompt of the image mirrored left to right: "left" and "right" swapped as whole words (case kept for
    the rest; a swapped word is written in lower case)."""
    return " ".join(MIRRORED_WORDS.get(w.lower(), w) for w in prompt.split())


def readout_table(
    x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, lam: float
) -> dict[str, dict[str, float]]:
    """Per score: PLCC / SRCC of the head (its own column of x_eval) and of the read-out fit on (x_fit, y_fit).

    y_* are (N, 4) true scores in SCORE_NAMES order; x_* (N, F) features whose first 4 columns are the head's scores.
    """
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(SCORE_NAMES):
        readout = predict(x_eval, fit_ridge(x_fit, y_fit[:, j], lam))
        out[name] = {
            "head_plcc": plcc(x_eval[:, j], y_eval[:, j]),
            "head_srcc": srcc(x_eval[:, j], y_eval[:, j]),
            "readout_plcc": plcc(readout, y_eval[:, j]),
            "readout_srcc": srcc(readout, y_eval[:, j]),
        }
    return out


def split_features(
    model: str,
    data: Path,
    split: str,
    threads: int,
    batch_size: int,
    area_threshold: float,
    mirror: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(N, F) features of ``model``'s outputs and (N, 4) true scores for every example of ``data``/``split`` that
    could be scored, and ``"<image>: <why>"`` for each one that could not (an unreadable image skips that example).
    With ``mirror``, each row is the mean of the features of the image and of its mirrored view."""
    import torch

    from benchmarks import score_each
    from rahf.data.richhf import read_split
    from rahf.scorer import RAHFScorer

    torch.set_num_threads(threads)
    records, _ = read_split(data, split)
    scorer = RAHFScorer.from_pretrained(model, batch_size=batch_size, score_readout=False)  # the heads' own scores
    scored, skipped = score_each(scorer, records.prompts, [records.image(i) for i in range(len(records))])
    labels = records.read(i for i, _ in scored)
    rows = [
        features(fb.scores, fb.heatmaps, fb.misaligned_keywords, r.prompt, area_threshold)
        for (_, fb), r in zip(scored, labels, strict=True)
    ]
    if mirror and rows:
        from PIL import Image, ImageOps

        views = [ImageOps.mirror(Image.open(r.image).convert("RGB")) for r in labels]
        flipped = scorer.score([mirror_prompt(r.prompt) for r in labels], views)
        rows = [
            (row + features(fb.scores, fb.heatmaps, fb.misaligned_keywords, mirror_prompt(r.prompt), area_threshold))
            / 2
            for row, fb, r in zip(rows, flipped, labels, strict=True)
        ]
    truth = [[r.example.scores[s] for s in SCORE_NAMES] for r in labels]
    if not rows:
        raise ValueError(f"no example of {data}/{split} could be scored: {skipped[:1]}")
    return np.stack(rows), np.asarray(truth, np.float64), skipped


def markdown(
    tables: dict[str, dict[str, dict[str, float]]],
    lam: float,
    fit: str,
    evaluated: str,
    skipped: Sequence[str] = (),
    mirror: bool = False,
) -> str:
    views = " (each the mean of the image and its mirrored view)" if mirror else ""
    lines = [
        f"Score heads as trained and a ridge read-out (λ = {lam:g}) of {len(FEATURE_NAMES)} outputs{views}, fit "
        f"on `{fit}`, PLCC / SRCC on `{evaluated}`:",
        "",
        "| model | score | head | read-out | PLCC gain |",
        "|---|---|---:|---:|---:|",
    ]
    for model, table in tables.items():
        for name, t in table.items():
            lines.append(
                f"| {model} | {name} | {t['head_plcc']:.3f} / {t['head_srcc']:.3f} | "
                f"{t['readout_plcc']:.3f} / {t['readout_srcc']:.3f} | {t['readout_plcc'] - t['head_plcc']:+.3f} |"
            )
    from benchmarks import with_skipped

    return with_skipped(lines, skipped, "example")


def main(argv: Sequence[str] | None = None) -> int:
    # the repository root is on sys.path under pytest and when run as a script
    from benchmarks import diagnostic_parser, emit

    ap = diagnostic_parser(
        __doc__, "split folder with the fit and evaluation splits", "a trained RAHF folder (repeatable)"
    )
    ap.add_argument("--fit-split", default="dev", help="split the read-out is fit on (default: dev)")
    ap.add_argument("--eval-split", default="test", help="split it is measured on (default: test)")
    ap.add_argument("--lam", type=float, default=10.0, help="ridge penalty on standardised features (default: 10)")
    ap.add_argument("--area-threshold", type=float, default=0.25, help="heat level of the area feature (0.25)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    ap.add_argument(
        "--mirror",
        action="store_true",
        help="also score each image mirrored left to right (prompt's left/right swapped); features are the mean "
        "of both views (default: off)",
    )
    args = ap.parse_args(argv)
    tables, skipped = {}, []
    for model in args.model:
        x_fit, y_fit, bad_fit = split_features(
            model, args.data, args.fit_split, args.threads, args.batch_size, args.area_threshold, args.mirror
        )
        x_eval, y_eval, bad_eval = split_features(
            model, args.data, args.eval_split, args.threads, args.batch_size, args.area_threshold, args.mirror
        )
        skipped += [x for x in bad_fit + bad_eval if x not in skipped]  # the same file fails for every model
        tables[model] = readout_table(x_fit, y_fit, x_eval, y_eval, args.lam)
    text = markdown(tables, args.lam, args.fit_split, args.eval_split, skipped, args.mirror)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
