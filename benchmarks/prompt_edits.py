"""Does a RAHF model notice when the prompt asks for something else? A counterfactual probe (a diagnostic).

For every image of a split whose prompt words are all labelled aligned, the model scores the image twice: with
its own prompt and with the prompt with one word swapped for another of its class (``rahf.words.swap_word``: a
colour for another colour, a count for another count...). The image is unchanged, so a model that grounds that
class of word gives the edited prompt a lower alignment score, heats the misalignment map and marks the new word.
Per class this reports the edits made, the mean alignment score of the own and the edited prompts and the mean
drop, the share of images whose edited prompt scores lower (ties count half: 0.5 is blind, 1.0 is perfect), the
share of edited prompts whose new word the keyword sequence marks, and the mean misalignment-map peak of each.
On the synthetic world a one-word edit of a one-group prompt lowers the true alignment by 1/3.

Which word is swapped is drawn from ``--seed``, per image and class, so runs and models see the same edits.

Usage: python benchmarks/prompt_edits.py --data SPLIT_FOLDER --model NAME=RUN/best [--model ...]
       [--classes synthetic|classes.json] [--split test] [--seed 0] [--threads 2] [--out edits.md]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.names import HEATMAP_NAMES, SCORE_NAMES

ALIGNMENT, MISALIGNMENT = SCORE_NAMES[1], HEATMAP_NAMES[1]
COLUMNS = ("edits", "own", "edited", "drop", "lower", "new word marked", "own peak", "edited peak")


def class_name(words: Sequence[str]) -> str:
    """A short label of a word class for the table: its first two words (``"red/green…"``)."""
    return "/".join(words[:2]) + ("…" if len(words) > 2 else "")


def edits_of(prompts: Sequence[str], classes: Sequence[Sequence[str]], seed: int) -> list[tuple[int, int, str]]:
    """(prompt index, class index, edited prompt) for every prompt and every class it has a word of; the edit
    of prompt i and class c is drawn from a generator seeded by (seed, i, c)."""
    from rahf.words import swap_word

    out = []
    for i, prompt in enumerate(prompts):
        for c, cls in enumerate(classes):
            edited = swap_word(prompt, [cls], np.random.default_rng((seed, i, c)))
            if edited is not None:
                out.append((i, c, edited))
    return out


def new_word(own: str, edited: str) -> str:
    """The word of ``edited`` that differs from ``own`` (same word count, one word changed)."""
    from rahf.words import prompt_words

    return next(b for a, b in zip(prompt_words(own), prompt_words(edited)) if a != b)


def summarise(pairs: Sequence[tuple[int, Any, Any]], n_classes: int) -> np.ndarray:
    """(n_classes, len(COLUMNS)) table from (class index, own feedback, edited feedback) pairs; a class with no
    pair is a row of NaN."""
    table = np.full((n_classes, len(COLUMNS)), np.nan)
    for c in range(n_classes):
        rows = [(own, ed) for k, own, ed in pairs if k == c]
        if not rows:
            continue
        a = np.array([own.scores[ALIGNMENT] for own, _ in rows])
        b = np.array([ed.scores[ALIGNMENT] for _, ed in rows])
        marked = [
            new_word(own.prompt, ed.prompt).lower() in {w.lower() for w in ed.misaligned_keywords} for own, ed in rows
        ]
        table[c] = (
            len(rows),
            a.mean(),
            b.mean(),
            (a - b).mean(),
            np.mean((a > b) + 0.5 * (a == b)),
            np.mean(marked),
            np.mean([float(np.max(own.heatmaps[MISALIGNMENT])) for own, _ in rows]),
            np.mean([float(np.max(ed.heatmaps[MISALIGNMENT])) for _, ed in rows]),
        )
    return table


def model_table(
    model: str, data: Path, split: str, classes: Sequence[Sequence[str]], seed: int, threads: int
) -> tuple[np.ndarray, list[str]]:
    """The :func:`summarise` table of one model on the fully aligned images of a split, and ``"<image>: <why>"``
    for each image that could not be scored (its edits are left out)."""
    import torch

    from benchmarks import score_each
    from rahf.data.richhf import RichHFSplit
    from rahf.scorer import RAHFScorer

    torch.set_num_threads(threads)
    split_data = RichHFSplit(data, split)
    keep = [r for r in split_data if r.example.word_labels and all(x == 1 for x in r.example.word_labels)]
    prompts = [r.prompt for r in keep]
    images = [r.image for r in keep]
    edits = edits_of(prompts, classes, seed)
    scorer = RAHFScorer.from_pretrained(model)
    own, skipped = score_each(scorer, prompts, images)
    own_of = dict(own)
    edited, _ = score_each(scorer, [e for _, _, e in edits], [images[i] for i, _, _ in edits])
    pairs = [(edits[j][1], own_of[edits[j][0]], fb) for j, fb in edited if edits[j][0] in own_of]
    return summarise(pairs, len(classes)), skipped


def markdown(tables: dict[str, np.ndarray], classes: Sequence[Sequence[str]], skipped: Sequence[str]) -> str:
    lines = [
        "One-word prompt edits on fully aligned images: mean alignment score with the own and the edited prompt, "
        "their drop, the share of images the edit scores lower, the share of edits whose new word is marked, and "
        "the misalignment-map peak with each prompt.",
        "",
        "| model | class | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for name, table in tables.items():
        for cls, row in zip(classes, table):
            if not np.isnan(row[0]):
                cells = [str(int(row[0]))] + [f"{v:.3f}" for v in row[1:]]
                lines.append(f"| {name} | {class_name(cls)} | " + " | ".join(cells) + " |")
    from benchmarks import with_skipped

    return with_skipped(lines, skipped)


def main(argv: Sequence[str] | None = None) -> int:
    # the repository root is on sys.path under pytest and when run as a script
    from benchmarks import diagnostic_parser, emit, named_models

    ap = diagnostic_parser(
        __doc__, "split folder (<split>.tfrecord + <split>.jsonl)", "NAME=PATH of a RAHF folder (repeatable)"
    )
    ap.add_argument("--classes", default="synthetic", help="'synthetic' or a JSON list of word lists")
    ap.add_argument("--split", default="test", help="split to measure (default: test)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the edits (default: 0)")
    args = ap.parse_args(argv)
    from rahf.words import load_swap_classes

    try:
        classes = load_swap_classes(args.classes)
    except (OSError, ValueError) as err:
        print(f"error: --classes: {err}", file=sys.stderr)
        return 2
    tables: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    for name, path in named_models(args.model):
        tables[name], bad = model_table(path, args.data, args.split, classes, args.seed, args.threads)
        skipped += [x for x in bad if x not in skipped]
    emit(markdown(tables, classes, skipped), args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
