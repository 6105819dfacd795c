"""The evaluation suite against hand-computed answers and a plain per-threshold AUC-Judd loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rahf.metrics import (
    auc_judd,
    cc,
    heatmap_metrics,
    keyword_counts,
    keyword_metrics,
    kld,
    mse,
    nss,
    plcc,
    rankdata,
    score_metrics,
    sim,
    srcc,
)


def judd_loop(pred: np.ndarray, gt: np.ndarray) -> float:
    """AUC-Judd as originally defined: one threshold per fixation, the whole map counted at each."""
    s, f = pred.ravel().astype(np.float64), gt.ravel() > 0
    values = sorted(s[f], reverse=True)
    n_fix, n = len(values), s.size
    tp, fp = [0.0], [0.0]
    for i, t in enumerate(values, start=1):
        above = int((s >= t).sum())
        tp.append(i / n_fix)
        fp.append((above - i) / (n - n_fix))
    tp.append(1.0)
    fp.append(1.0)
    return float(np.trapezoid(tp, fp))


def judd_loop_grouped(pred: np.ndarray, gt: np.ndarray) -> float:
    """The same curve with one point per distinct fixation value (ties cross together)."""
    s, f = pred.ravel(), gt.ravel() > 0
    tp, fp = [0.0], [0.0]
    for t in sorted(set(s[f].tolist()), reverse=True):
        tp.append(float(((s >= t) & f).sum()) / f.sum())
        fp.append(float(((s >= t) & ~f).sum()) / (~f).sum())
    return float(np.trapezoid([*tp, 1.0], [*fp, 1.0]))


def test_score_correlations():
    x = np.array([0.1, 0.4, 0.2, 0.9])
    assert plcc(x, 2 * x + 1) == pytest.approx(1.0)
    assert plcc(x, -x) == pytest.approx(-1.0)
    assert srcc(x, x**3) == pytest.approx(1.0)
    assert math.isnan(plcc(x, np.ones(4)))
    np.testing.assert_array_equal(rankdata(np.array([1.0, 2.0, 2.0, 3.0])), [1.0, 2.5, 2.5, 4.0])
    assert srcc(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(4.5 / math.sqrt(22.5))
    table = score_metrics({"overall": x}, {"overall": x})
    assert table == {"overall": {"plcc": pytest.approx(1.0), "srcc": pytest.approx(1.0)}}


def test_perfect_constant_and_inverted_heatmaps():
    gt = np.zeros((1, 8, 8))
    gt[0, 2:5, 3:6] = 1.0  # 9 fixation pixels of 64
    perfect, constant, inverted = gt.copy(), np.full_like(gt, 0.3), 1.0 - gt
    assert mse(perfect, gt)[0] == 0 and cc(perfect, gt)[0] == pytest.approx(1.0)
    assert kld(perfect, gt)[0] == pytest.approx(0.0, abs=1e-6) and sim(perfect, gt)[0] == pytest.approx(1.0)
    assert auc_judd(perfect, gt)[0] == pytest.approx(1.0)
    assert cc(constant, gt)[0] == 0.0 and nss(constant, gt)[0] == pytest.approx(0.0)
    assert auc_judd(constant, gt)[0] == pytest.approx(0.5)
    assert sim(constant, gt)[0] == pytest.approx(9 / 64)
    assert cc(inverted, gt)[0] == pytest.approx(-1.0)
    # Judd's curve has points only at fixation values: with every fixation below every other pixel, the first
    # threshold already takes FPR to 1 (TPR 1/9), so the area is the triangle 1/(2*9). With all fixations tied
    # at 0 the single point is (1, 1): area 0.5.
    ranked = inverted.copy()
    ranked[gt > 0] = np.arange(1, 10) / 100.0
    assert auc_judd(ranked, gt)[0] == pytest.approx(1 / 18)
    assert auc_judd(inverted, gt)[0] == pytest.approx(0.5)


def test_small_known_maps():
    gt = np.array([[1.0, 0.0], [0.0, 0.0]])
    # One fixation; its prediction 0.3 is beaten by two of three other pixels: curve (0,0)->(2/3,1)->(1,1).
    assert auc_judd(np.array([[0.3, 0.5], [0.1, 0.9]]), gt)[0] == pytest.approx(2 / 3)
    assert auc_judd(np.array([[0.9, 0.1], [0.5, 0.3]]), gt)[0] == pytest.approx(1.0)
    # Uniform prediction against a one-pixel target: KL = log 4.
    assert kld(np.full((2, 2), 0.25), gt)[0] == pytest.approx(math.log(4), rel=1e-6)
    # NSS: prediction [1, 0, 0, 0]: mean 0.25, std (ddof 1) 0.5, fixation z = 1.5.
    assert nss(gt, gt)[0] == pytest.approx(1.5, rel=1e-6)
    assert sim(np.array([[0.5, 0.5], [0.0, 0.0]]), gt)[0] == pytest.approx(0.5)


def test_auc_judd_matches_the_plain_loop_on_random_maps():
    rng = np.random.default_rng(0)
    pred = rng.random((6, 48, 48)).astype(np.float32)
    gt = (rng.random((6, 48, 48)) < 0.1).astype(np.float32) * rng.random((6, 48, 48)).astype(np.float32)
    fast = auc_judd(pred, gt)
    for i in range(6):
        assert abs(fast[i] - judd_loop(pred[i], gt[i])) < 1e-6


def test_auc_judd_with_ties_matches_the_grouped_loop():
    rng = np.random.default_rng(1)
    pred = np.round(rng.random((4, 20, 20)), 1)  # 11 distinct values: many ties
    gt = (rng.random((4, 20, 20)) < 0.2).astype(float)
    fast = auc_judd(pred, gt)
    for i in range(4):
        assert abs(fast[i] - judd_loop_grouped(pred[i], gt[i])) < 1e-12


def test_heatmap_table_splits_empty_and_non_empty_targets():
    gt = np.zeros((3, 4, 4))
    gt[1, 0, 0] = gt[2, 3, 3] = 1.0
    pred = np.zeros((3, 4, 4))
    pred[0] = 0.5  # wrong on the empty target: MSE 0.25
    pred[1, 0, 0] = pred[2, 3, 3] = 1.0  # perfect on the others
    row = heatmap_metrics(pred, gt)
    assert row["n"] == 3 and row["n_gt0"] == 1
    assert row["mse"] == pytest.approx(0.25 / 3) and row["mse_gt0"] == pytest.approx(0.25)
    assert row["cc"] == pytest.approx(1.0) and row["auc_judd"] == pytest.approx(1.0)
    assert row["sim"] == pytest.approx(1.0)


def test_bad_heatmaps_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        cc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        mse(np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)))
    assert math.isnan(auc_judd(np.zeros((2, 2)), np.zeros((2, 2)))[0])


def test_keywords_aligned_by_word_not_position():
    assert keyword_counts("a yellow_0 cat", "a yellow_0 cat") == (1, 0, 0)
    # A dropped leading word shifts positions but not the alignment.
    assert keyword_counts("yellow_0 cat", "a yellow_0 cat") == (1, 0, 0)
    # Marking the wrong word: one false positive, one miss.
    assert keyword_counts("a yellow cat_0", "a yellow_0 cat") == (0, 1, 1)
    # A marked word that is not in the prompt at all is a false positive.
    assert keyword_counts("a yellow_0 dog_0 cat", "a yellow_0 cat") == (1, 1, 0)


def test_keyword_metrics_pooled_over_samples():
    preds = ["a yellow_0 cat", "two dogs_0", "a red car"]
    targets = ["a yellow_0 cat", "two_0 dogs", "a red_0 car_0"]
    m = keyword_metrics(preds, targets)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 3)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.25)
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        keyword_metrics(["a", "b"], ["a"])
