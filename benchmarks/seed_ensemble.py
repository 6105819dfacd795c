"""Score a split with several RAHF models at once and evaluate their mean (a seed-ensemble diagnostic).

Each model scores every image of the split; the ensemble's scores and heatmaps are the element-wise means of the
models', and its keyword sequence marks a prompt word when more than half of the models mark it. The result is
evaluated like one model (Tables 1-4 and the within-prompt ranking) and written as ``metrics.json`` /
``metrics.md`` beside each model's own tables. It measures how much of the spread between training seeds an
ensemble removes, at the cost of one forward pass per model (docs/results.md, round 19).

Usage: python benchmarks/seed_ensemble.py --data SPLIT_DIR --model A=DIR --model B=DIR ... --out FOLDER
       [--split test] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.evaluate import Predictions, evaluate, load_ground_truth, predict_with_scorer, write_results
from rahf.metrics import align_words, marked_words


def vote_keywords(prompt: str, sequences: Sequence[str], suffix: str = "_0") -> str:
    """The prompt with ``suffix`` on each word that more than half of ``sequences`` mark. Each sequence is aligned
    to the prompt by word (its words with the suffix removed), so a sequence that drops or adds words still votes
    for the words it shares with the prompt."""
    words = prompt.split()
    votes = [0] * len(words)
    for seq in sequences:
        seq_words, marks = marked_words(seq, suffix)
        for i, j in align_words(seq_words, words).items():
            votes[j] += marks[i]
    return " ".join(w + suffix if 2 * v > len(sequences) else w for w, v in zip(words, votes, strict=True))


def ensemble(preds: Sequence[Predictions], prompts: Sequence[str]) -> Predictions:
    """The mean of several models' predictions on the same examples: scores (N,) and heatmaps (N, H, W) averaged,
    keywords by :func:`vote_keywords`."""
    if not preds:
        raise ValueError("no predictions to combine")
    for n in HEATMAP_NAMES:
        shapes = sorted({p.heatmaps[n].shape for p in preds})
        if len(shapes) > 1:
            raise ValueError(f"the models' {n} heatmaps differ in shape {shapes}: combine models of one resolution")
    return Predictions(
        scores={n: np.mean([p.scores[n] for p in preds], axis=0) for n in SCORE_NAMES},
        heatmaps={n: np.mean([p.heatmaps[n] for p in preds], axis=0) for n in HEATMAP_NAMES},
        sequences=[vote_keywords(q, [p.sequences[i] for p in preds]) for i, q in enumerate(prompts)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="split folder (richfeedback synth output or RichHF-18K format)")
    p.add_argument("--split", default="test", help="split name (default: test)")
    p.add_argument("--model", action="append", required=True, help="NAME=DIR of a RAHF model; give two or more")
    p.add_argument("--out", required=True, help="folder for metrics.json / metrics.md")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = p.parse_args(argv)
    models = [m.partition("=") for m in args.model]
    if len(models) < 2 or any(not name or not folder for name, _, folder in models):
        p.error("give two or more --model NAME=DIR")
    names = [name for name, _, _ in models]
    if len(set(names)) < len(names):
        p.error(f"--model names must differ, got {names}")
    torch.set_num_threads(args.threads)
    from rahf.scorer import RAHFScorer

    try:
        gt = load_ground_truth(args.data, args.split)
        scorers = []
        for name, _, folder in models:  # every model loads before any scoring, so a bad folder fails fast
            try:
                scorers.append(RAHFScorer.from_pretrained(folder, device="cpu"))
            except (OSError, ValueError, SafetensorError) as err:
                raise ValueError(f"model {name} ({folder}) does not load: {err}") from err
        preds = [predict_with_scorer(scorer, gt) for scorer in scorers]
        results = {name: evaluate(pred, gt) for name, pred in zip(names, preds, strict=True)}
        results["ensemble of " + " + ".join(names)] = evaluate(ensemble(preds, gt.prompts), gt)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_results(args.out, results)
    print((Path(args.out) / "metrics.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
