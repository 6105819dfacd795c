"""``richfeedback eval``: the paper's Tables 1–4 for a model (or a baseline) on a split.

Predictions are compared with the ground truth at the ground truth's resolution (predicted heatmaps are resized
to it). Output: a dict of tables, written as ``metrics.json`` and ``metrics.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rahf.data.richhf import read_split
from rahf.metrics import heatmap_metrics, keyword_metrics, score_metrics
from rahf.model import HEATMAP_NAMES, SCORE_NAMES
from rahf.words import keyword_sequence


@dataclass
class GroundTruth:
    """A split's answers: scores name -> (N,), heatmaps name -> (N, H, W), keyword target sequences."""

    uids: list[str]
    prompts: list[str]
    images: list[Path]
    scores: dict[str, np.ndarray]
    heatmaps: dict[str, np.ndarray]
    targets: list[str]


@dataclass
class Predictions:
    scores: dict[str, np.ndarray]
    heatmaps: dict[str, np.ndarray]
    sequences: list[str]


def load_ground_truth(data_dir: str | Path, split: str, suffix: str = "_0") -> GroundTruth:
    """Read a split (``<split>.tfrecord`` + ``<split>.jsonl``); examples without a usable prompt are skipped."""
    records, _ = read_split(data_dir, split)
    scores = {n: np.array([r.example.scores[n] for r in records]) for n in SCORE_NAMES}
    maps = {n: np.stack([r.example.heatmaps[n] for r in records]) for n in HEATMAP_NAMES}
    targets = [keyword_sequence(r.prompt, r.example.word_labels, suffix) for r in records]
    return GroundTruth(
        [r.example.uid for r in records], [r.prompt for r in records], [r.image for r in records], scores, maps, targets
    )


def predict_with_scorer(scorer, gt: GroundTruth) -> Predictions:
    """Run a RAHFScorer over the split's images and prompts."""
    results = scorer.score(gt.prompts, gt.images)
    return Predictions(
        scores={n: np.array([r.scores[n] for r in results]) for n in SCORE_NAMES},
        heatmaps={n: np.stack([r.heatmaps[n] for r in results]) for n in HEATMAP_NAMES},
        sequences=[r.keyword_sequence or "" for r in results],
    )


def _match_size(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if maps.shape[1:] == shape:
        return maps
    t = torch.from_numpy(maps.astype(np.float32))[:, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()


def evaluate(pred: Predictions, gt: GroundTruth) -> dict:
    """The four tables as a dict: scores, one table per heatmap, keywords."""
    tables = {"n": len(gt.uids), "scores": score_metrics(pred.scores, gt.scores), "heatmaps": {}}
    for n in HEATMAP_NAMES:
        tables["heatmaps"][n] = heatmap_metrics(_match_size(pred.heatmaps[n], gt.heatmaps[n].shape[1:]), gt.heatmaps[n])
    tables["keywords"] = keyword_metrics(pred.sequences, gt.targets)
    return tables


def markdown(results: dict[str, dict], names: Sequence[str] | None = None) -> str:
    """Tables 1–4 as markdown, one row per evaluated model (``results``: model name -> evaluate() output)."""
    names = list(names or results)
    out = [
        "**Table 1 — scores (PLCC / SRCC)**",
        "",
        "| model | " + " | ".join(SCORE_NAMES) + " |",
        "|---|" + "---:|" * len(SCORE_NAMES),
    ]
    for m in names:
        s = results[m]["scores"]
        out.append(f"| {m} | " + " | ".join(f"{s[n]['plcc']:.3f} / {s[n]['srcc']:.3f}" for n in SCORE_NAMES) + " |")
    cols = ["mse", "mse_gt0", "cc", "kld", "sim", "nss", "auc_judd"]
    for i, hm in enumerate(HEATMAP_NAMES):
        out += [
            "",
            f"**Table {2 + i} — {hm} heatmap** (MSE on all, MSE on GT = 0; the rest on GT > 0)",
            "",
            "| model | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for m in names:
            h = results[m]["heatmaps"][hm]
            out.append(f"| {m} | " + " | ".join(f"{h[c]:.4f}" for c in cols) + " |")
    out += [
        "",
        "**Table 4 — misaligned keywords** (pooled over all words)",
        "",
        "| model | precision | recall | F1 |",
        "|---|---:|---:|---:|",
    ]
    for m in names:
        k = results[m]["keywords"]
        out.append(f"| {m} | {k['precision']:.3f} | {k['recall']:.3f} | {k['f1']:.3f} |")
    return "\n".join(out) + "\n"


def write_results(out_dir: str | Path, results: dict[str, dict]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "metrics.md").write_text(markdown(results))
