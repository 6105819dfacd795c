"""The paper's evaluation suite (§4.2, Tables 1–4), vectorised.

* Scores: PLCC (Pearson) and SRCC (Spearman, average ranks for ties) over samples.
* Heatmaps: MSE over all samples, MSE over samples whose ground truth is all zero, and — per sample with a
  non-empty ground truth, then averaged — CC, KLD, SIM, NSS and AUC-Judd (saliency metrics after Bylinskii et
  al., with ground-truth pixels > 0 as fixations).
* Keywords: precision / recall / F1 of the misaligned class, pooled over all words of all samples, with the
  predicted sequence aligned to the prompt by word (not by position), so a dropped or inserted word shifts
  nothing.

AUC-Judd ties: thresholds are the distinct prediction values at fixations, so pixels with equal values cross a
threshold together. This is deterministic and gives 0.5 for a constant prediction. (The public
reimplementation breaks ties with 1e-7 random jitter and loops in Python over every fixation pixel, counting
the whole map at each; on maps without ties both give the same value.)
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

EPS = 1e-8


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------


def plcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson linear correlation of two (N,) arrays; NaN when either is constant."""
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    p, t = p - p.mean(), t - t.mean()
    den = np.sqrt((p * p).sum() * (t * t).sum())
    return float((p * t).sum() / den) if den > 0 else float("nan")


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given their average rank (N,) -> (N,) float64."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(x)] - 1
    avg = (first + last) / 2.0 + 1.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = avg[group]
    return ranks


def srcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of average ranks."""
    return plcc(rankdata(pred), rankdata(target))


def score_metrics(pred: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{score name: {"plcc", "srcc"}} for every name in ``target``."""
    return {n: {"plcc": plcc(pred[n], target[n]), "srcc": srcc(pred[n], target[n])} for n in target}


# ---------------------------------------------------------------------------------------------------------
# Heatmaps: per-sample saliency metrics on (B, H, W) batches
# ---------------------------------------------------------------------------------------------------------


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"heatmaps must be (B, H, W) or (H, W), got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


def _check(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _flat(pred), _flat(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction {np.shape(pred)} and ground truth {np.shape(gt)} differ in shape")
    if not (np.isfinite(p).all() and np.isfinite(g).all()):
        raise ValueError("heatmaps contain NaN or inf")
    return p, g


def mse(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-sample pixel MSE: (B, H, W) x2 -> (B,)."""
    return _mse(*_check(pred, gt))


def cc(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-sample Pearson correlation over pixels (B,); 0 where either map is constant."""
    return _cc(*_check(pred, gt))


def kld(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-sample KL divergence of the ground truth from the prediction, both normalised to sum 1 (B,)."""
    return _kld(*_check(pred, gt))


def sim(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-sample similarity: sum of the pixelwise minimum of the two normalised maps (B,), in [0, 1]."""
    return _sim(*_check(pred, gt))


def nss(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-sample NSS: prediction standardised (ddof 1), averaged over ground-truth pixels > 0 (B,)."""
    return _nss(*_check(pred, gt))


def auc_judd(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-sample AUC-Judd (B,): fixations = ground-truth pixels > 0; NaN where there are none (or no others).

    At each threshold t among the prediction's values at fixations (highest first): TPR = fixations with
    prediction >= t over all fixations, FPR = other pixels with prediction >= t over all other pixels; the
    area under (0, 0) -> points -> (1, 1) by the trapezoid rule. Counts come from two sorts and a binary
    search per map instead of a pass over the whole map per fixation.
    """
    _check(pred, gt)
    p = np.asarray(pred)
    return _auc_judd(p.reshape(-1, p.shape[-2] * p.shape[-1]), _flat(gt))


# Implementations on flattened (B, N) arrays, checked once by the callers above.


def _mse(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    return ((p - g) ** 2).mean(axis=1)


def _cc(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    p = p - p.mean(axis=1, keepdims=True)
    g = g - g.mean(axis=1, keepdims=True)
    den = np.sqrt((p * p).sum(axis=1) * (g * g).sum(axis=1))
    return np.where(den > 0, (p * g).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)


def _as_distribution(x: np.ndarray) -> np.ndarray:
    return x / (x.sum(axis=1, keepdims=True) + EPS)


def _kld(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    p, q = _as_distribution(p), _as_distribution(g)
    return (q * np.log(EPS + q / (p + EPS))).sum(axis=1)


def _sim(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.minimum(_as_distribution(p), _as_distribution(g)).sum(axis=1)


def _nss(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    std = p.std(axis=1, ddof=1, keepdims=True)
    z = (p - p.mean(axis=1, keepdims=True)) / (std + EPS)
    fix = g > 0
    n = fix.sum(axis=1)
    return np.where(n > 0, (z * fix).sum(axis=1) / np.maximum(n, 1), np.nan)


def _auc_judd(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    out = np.full(p.shape[0], np.nan)
    for i in range(p.shape[0]):
        fix = g[i] > 0
        f, n_other = int(fix.sum()), int((~fix).sum())
        if f == 0 or n_other == 0:
            continue
        fix_sorted = np.sort(p[i][fix])
        other_sorted = np.sort(p[i][~fix])
        thresholds = np.unique(fix_sorted)[::-1]
        tpr = (f - np.searchsorted(fix_sorted, thresholds, side="left")) / f
        fpr = (n_other - np.searchsorted(other_sorted, thresholds, side="left")) / n_other
        out[i] = np.trapezoid(np.r_[0.0, tpr, 1.0], np.r_[0.0, fpr, 1.0])
    return out


def heatmap_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The paper's heatmap table row for one heatmap type over a split.

    Args:
        pred, gt: (B, H, W) float maps in [0, 1].
    Returns:
        mse (all samples), mse_gt0 (samples with an all-zero ground truth; NaN if none), and cc, kld, sim, nss,
        auc_judd averaged over samples with a non-empty ground truth (NaN if none), plus the sample counts.
    """
    p, g = _check(pred, gt)
    empty = g.max(axis=1) <= 0
    errors = _mse(p, g)
    out = {
        "mse": float(errors.mean()) if len(errors) else float("nan"),
        "mse_gt0": float(errors[empty].mean()) if empty.any() else float("nan"),
        "n": len(errors),
        "n_gt0": int(empty.sum()),
    }
    pos = ~empty
    pp, gp = p[pos], g[pos]
    raw = np.asarray(pred).reshape(len(p), -1)[pos]  # AUC ranks the values as given (no float64 ties added)
    for name, fn, a in (
        ("cc", _cc, pp),
        ("kld", _kld, pp),
        ("sim", _sim, pp),
        ("nss", _nss, pp),
        ("auc_judd", _auc_judd, raw),
    ):
        out[name] = float(np.mean(fn(a, gp))) if pos.any() else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------------
# Keywords
# ---------------------------------------------------------------------------------------------------------


def _marked(words: Sequence[str], suffix: str) -> tuple[list[str], list[bool]]:
    base, flags = [], []
    for w in words:
        is_marked = w.endswith(suffix) and len(w) > len(suffix)
        base.append(w[: -len(suffix)] if is_marked else w)
        flags.append(is_marked)
    return base, flags


def marked_words(sequence: str, suffix: str = "_0") -> tuple[list[str], list[bool]]:
    """A keyword sequence's words with ``suffix`` removed, and whether each was marked misaligned."""
    return _marked(sequence.split(), suffix)


def align_words(a: Sequence[str], b: Sequence[str]) -> dict[int, int]:
    """{index in ``a``: index in ``b``} for the words the two sequences share in order (difflib's longest
    matching blocks), so a sequence that drops, adds or changes words still lines up with the other."""
    match = difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False)
    return {block.a + k: block.b + k for block in match.get_matching_blocks() for k in range(block.size)}


def keyword_counts(pred_sequence: str, target_sequence: str, suffix: str = "_0") -> tuple[int, int, int]:
    """(TP, FP, FN) of misaligned-word predictions for one sample.

    The predicted sequence is aligned to the target by word (difflib's longest matching blocks over the words
    with the suffix removed); a marked predicted word that aligns to a marked target word is a TP, a marked
    word aligned to an unmarked one or to nothing is an FP, and a marked target word without a marked
    aligned prediction is an FN.
    """
    pw, pm = _marked(pred_sequence.split(), suffix)
    tw, tm = _marked(target_sequence.split(), suffix)
    aligned = align_words(pw, tw)
    tp = sum(1 for i, m in enumerate(pm) if m and i in aligned and tm[aligned[i]])
    fp = sum(pm) - tp
    fn = sum(tm) - tp
    return tp, fp, fn


def keyword_metrics(pred_sequences: Sequence[str], target_sequences: Sequence[str], suffix: str = "_0"):
    """Pooled precision / recall / F1 of the misaligned class over all samples (paper Table 4)."""
    if len(pred_sequences) != len(target_sequences):
        raise ValueError(f"{len(pred_sequences)} predictions for {len(target_sequences)} targets")
    tp = fp = fn = 0
    for p, t in zip(pred_sequences, target_sequences):
        a, b, c = keyword_counts(p, t, suffix)
        tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
