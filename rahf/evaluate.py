"""``richfeedback eval``: the paper's Tables 1–4 for a model (or a baseline) on a split.

Predictions are compared with the ground truth at the ground truth's resolution (predicted heatmaps are resized
to it). Output: a dict of tables, written as ``metrics.json`` and ``metrics.md``.

Within-prompt ranking. Best-of-N selection and repair only ever compare images *of the same prompt*, so a model
is also measured on groups of images sharing a prompt (when a split has them, and on the loop-gain benchmark's
candidate sets): per prompt, the Spearman correlation of predicted and true scores, the pairwise accuracy (pairs
with different true scores ordered the same way by the prediction; a predicted tie counts half) and the top-1
regret (true score of the truly best image minus that of the predicted best, the first in input order among
tied maxima); each averaged over prompts, with a bootstrap 95 % interval over prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.bootstrap import bootstrap_means
from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.data.richhf import read_split
from rahf.metrics import heatmap_metrics, keyword_metrics, rankdata, score_metrics
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
    records, _ = read_split(data_dir, split)  # lazy: one pass below decodes each record once
    uids, scores, maps, targets = [], {n: [] for n in SCORE_NAMES}, {n: [] for n in HEATMAP_NAMES}, []
    for r in records:
        uids.append(r.example.uid)
        for n in SCORE_NAMES:
            scores[n].append(r.example.scores[n])
        for n in HEATMAP_NAMES:
            maps[n].append(r.example.heatmaps[n])
        targets.append(keyword_sequence(r.prompt, r.example.word_labels, suffix))
    return GroundTruth(
        uids,
        list(records.prompts),
        [records.image(i) for i in range(len(records))],
        {n: np.array(v) for n, v in scores.items()},
        {n: np.stack(v) for n, v in maps.items()},
        targets,
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
    """The four tables as a dict: scores, one table per heatmap, keywords; and ``within_prompt`` (see
    :func:`within_prompt_tables`) when some prompt of the split has two or more images."""
    tables = {"n": len(gt.uids), "scores": score_metrics(pred.scores, gt.scores), "heatmaps": {}}
    for n in HEATMAP_NAMES:
        tables["heatmaps"][n] = heatmap_metrics(_match_size(pred.heatmaps[n], gt.heatmaps[n].shape[1:]), gt.heatmaps[n])
    tables["keywords"] = keyword_metrics(pred.sequences, gt.targets)
    within = within_prompt_tables(pred.scores, gt.scores, gt.prompts)
    if within is not None:
        tables["within_prompt"] = within
    return tables


# ---------------------------------------------------------------------------------------------------------
# Within-prompt ranking
# ---------------------------------------------------------------------------------------------------------

WITHIN_PROMPT_METRICS = ("spearman", "pairwise_accuracy", "top1_regret")


def within_prompt_group(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Ranking metrics of one prompt's images: (n,) predicted and (n,) true scores, n >= 2.

    ``spearman``: Pearson of average ranks, NaN when either side is constant. ``pairwise_accuracy``: over pairs
    with different true scores, 1 when the prediction orders them the same way, 0.5 when it ties them, else 0;
    NaN when every pair is tied in truth. ``top1_regret``: max(true) - true[argmax(pred)] (first maximum), >= 0.
    """
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if p.shape != t.shape or p.ndim != 1 or len(p) < 2:
        raise ValueError(f"need two (n,) arrays with n >= 2, got shapes {p.shape} and {t.shape}")
    rp, rt = rankdata(p), rankdata(t)
    rp, rt = rp - rp.mean(), rt - rt.mean()
    den = np.sqrt((rp * rp).sum() * (rt * rt).sum())
    spearman = float((rp * rt).sum() / den) if den > 0 else float("nan")
    i, j = np.triu_indices(len(p), k=1)
    st, sp = np.sign(t[i] - t[j]), np.sign(p[i] - p[j])
    ordered = st != 0
    agree = np.where(sp == 0, 0.5, (sp == st).astype(np.float64))[ordered]
    pairwise = float(agree.mean()) if agree.size else float("nan")
    return {"spearman": spearman, "pairwise_accuracy": pairwise, "top1_regret": float(t.max() - t[int(p.argmax())])}


def _mean_ci(values: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Mean of the finite values with a percentile bootstrap 95 % interval; NaNs when there are none."""
    v = values[np.isfinite(values)]
    if not v.size:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    lo, hi = np.percentile(bootstrap_means(v[:, None], n_boot, seed)[:, 0], [2.5, 97.5])
    return {"mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


def within_prompt_metrics(
    pred: Sequence[float] | np.ndarray,
    true: Sequence[float] | np.ndarray,
    prompts: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """:func:`within_prompt_group` for every prompt with >= 2 images, averaged over prompts.

    Args:
        pred, true: (N,) predicted and true scores of N images.
        prompts: (N,) the prompt of each image; images of one prompt form a group (input order kept).
        n_boot, seed: bootstrap resamples over prompts and the seed of their RNG.
    Returns:
        ``{"prompts", "images", <metric>: {"mean", "ci_low", "ci_high", "n"}}``; ``n`` counts the prompts where
        the metric is defined (a constant prediction has no Spearman).
    """
    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if not (len(p) == len(t) == len(prompts)):
        raise ValueError(f"pred, true and prompts must have the same length, got {len(p)}, {len(t)}, {len(prompts)}")
    groups: dict[str, list[int]] = {}
    for k, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(k)
    rows = [within_prompt_group(p[idx], t[idx]) for idx in groups.values() if len(idx) >= 2]
    out: dict = {"prompts": len(rows), "images": sum(len(idx) for idx in groups.values() if len(idx) >= 2)}
    for m in WITHIN_PROMPT_METRICS:
        out[m] = _mean_ci(np.array([r[m] for r in rows], np.float64), n_boot, seed)
    return out


def within_prompt_tables(
    pred_scores: dict[str, np.ndarray],
    true_scores: dict[str, np.ndarray],
    prompts: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict] | None:
    """{score name: :func:`within_prompt_metrics`} for every name in ``true_scores``; None when no prompt has two
    or more images (nothing to rank within)."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        counts[prompt] = counts.get(prompt, 0) + 1
    if not any(c >= 2 for c in counts.values()):
        return None
    return {
        n: within_prompt_metrics(pred_scores[n], true_scores[n], prompts, n_boot=n_boot, seed=seed) for n in true_scores
    }


def _fmt_ci(m: dict[str, float]) -> str:
    if not m["n"]:
        return "–"
    return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def within_prompt_markdown(rows: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown lines of the within-prompt table; ``rows``: model name -> :func:`within_prompt_tables` output."""
    out = [
        "| model | score | prompts | Spearman [95% CI] | pairwise accuracy [95% CI] | top-1 regret [95% CI] |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m, table in rows.items():
        for name, t in table.items():
            cells = " | ".join(_fmt_ci(t[k]) for k in WITHIN_PROMPT_METRICS)
            out.append(f"| {m} | {name} | {t['prompts']} | {cells} |")
    return out


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
    within = {m: results[m]["within_prompt"] for m in names if results[m].get("within_prompt")}
    if within:
        out += [
            "",
            "**Within-prompt ranking** (per prompt among its images, averaged over prompts; bootstrap 95 % CI)",
            "",
            *within_prompt_markdown(within),
        ]
    return "\n".join(out) + "\n"


def write_results(out_dir: str | Path, results: dict[str, dict]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "metrics.md").write_text(markdown(results))
