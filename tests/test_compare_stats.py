"""compare.stats: pairing, paired means, bootstrap interval, win/tie/loss and five-bin fractions (known answers)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import common.bootstrap
import compare.stats as cs
from common.names import SCORE_NAMES
from common.records import ImageRecord
from compare.stats import BINS, BinThresholds, ComparisonStats, bin_differences, compare_scores, pair_records


def rec(prompt: str, seed: int, scores: dict[str, float] | None = None, **kw) -> ImageRecord:
    return ImageRecord(f"{prompt}-{seed}", prompt, seed, {"backend": "test"}, scores=dict(scores or {}), **kw)


def same_scores(v: float) -> dict[str, float]:
    return {n: v for n in SCORE_NAMES}


def random_pairs(n_prompts: int, n_seeds: int, shift: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    a, b = [], []
    for p in range(n_prompts):
        for s in range(n_seeds):
            sa = {n: float(x) for n, x in zip(SCORE_NAMES, rng.uniform(0, 0.85, len(SCORE_NAMES)))}
            a.append(rec(f"prompt {p}", s, sa))
            b.append(rec(f"prompt {p}", s, {n: v + shift for n, v in sa.items()}))
    return pair_records(a, b)


def test_identical_checkpoints_give_zero_difference_and_all_ties():
    st = compare_scores(random_pairs(5, 4), n_boot=2000)
    assert st.n_pairs == 20 and list(st.scores) == list(SCORE_NAMES)
    for s in st.scores.values():
        assert s.diff == 0.0 and (s.ci_low, s.ci_high) == (0.0, 0.0)
        assert s.mean_a == s.mean_b
        assert (s.wins, s.ties, s.losses) == (0, 20, 0)
        assert s.bin_fractions == {"much_better": 0.0, "better": 0.0, "same": 1.0, "worse": 0.0, "much_worse": 0.0}


def test_constant_improvement_gives_exact_difference_and_interval():
    st = compare_scores(random_pairs(4, 3, shift=0.1), n_boot=2000)
    for s in st.scores.values():
        assert s.diff == pytest.approx(0.1, abs=1e-12)
        assert s.ci_low == pytest.approx(0.1, abs=1e-12) and s.ci_high == pytest.approx(0.1, abs=1e-12)
        assert s.mean_b - s.mean_a == pytest.approx(0.1, abs=1e-12)
        assert (s.wins, s.ties, s.losses) == (12, 0, 0)
        assert s.bin_fractions["better"] == 1.0 and s.bin_counts["better"] == 12


def hand_pairs():
    """Eight pairs of one prompt; d = B − A on every score as written, chosen around the default thresholds."""
    a_vals = [0.50, 0.60, 0.40, 0.40, 0.60, 0.30, 0.80, 0.500]
    b_vals = [0.50, 0.62, 0.45, 0.35, 0.75, 0.50, 0.50, 0.479]
    # d:      0     .02   .05   -.05  .15   .20   -.30  -.021
    a = [rec("p", i, same_scores(v)) for i, v in enumerate(a_vals)]
    b = [rec("p", i, same_scores(v)) for i, v in enumerate(b_vals)]
    return pair_records(a, b), a_vals, b_vals


def test_hand_made_bins_default_thresholds():
    pairs, a_vals, b_vals = hand_pairs()
    st = compare_scores(pairs, n_boot=100)
    s = st.scores["plausibility"]
    # 0 and 0.02 (= tie) -> same; 0.05 and 0.15 (= strong) -> better; -0.05, -0.021 -> worse; 0.2 ≫; -0.3 ≪
    assert s.bin_counts == {"much_better": 1, "better": 2, "same": 2, "worse": 2, "much_worse": 1}
    assert s.bin_fractions == {
        "much_better": 1 / 8,
        "better": 2 / 8,
        "same": 2 / 8,
        "worse": 2 / 8,
        "much_worse": 1 / 8,
    }
    assert (s.wins, s.ties, s.losses) == (3, 2, 3)
    assert s.mean_a == pytest.approx(sum(a_vals) / 8) and s.mean_b == pytest.approx(sum(b_vals) / 8)
    assert s.diff == pytest.approx((sum(b_vals) - sum(a_vals)) / 8)


def test_hand_made_bins_custom_thresholds():
    pairs, _, _ = hand_pairs()
    s = compare_scores(pairs, n_boot=100, thresholds=BinThresholds(tie=0.05, strong=0.2)).scores["overall"]
    # |d| <= .05: 0, .02, .05, -.05, -.021 -> same; .15 and .2 (= strong) -> better; -.3 -> ≪
    assert s.bin_counts == {"much_better": 0, "better": 2, "same": 5, "worse": 0, "much_worse": 1}
    assert (s.wins, s.ties, s.losses) == (2, 5, 1)


def test_bin_differences_signs_and_edges():
    d = np.array([0.0, 0.02, -0.02, 0.0201, -0.0201, 0.15, -0.15, 0.1501, -0.1501, 1.0, -1.0])
    assert bin_differences(d, BinThresholds()).tolist() == [2, 2, 2, 1, 3, 1, 3, 0, 4, 0, 4]


def reference_bootstrap(d: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Plain loop: one resample at a time from the same generator, then the linear-interpolation percentile."""
    rng = np.random.default_rng(seed)
    n = len(d)
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        means.append(sum(float(d[i]) for i in idx) / n)
    means.sort()

    def pct(q: float) -> float:
        pos = q / 100 * (n_boot - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n_boot - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    return pct(2.5), pct(97.5)


@pytest.mark.parametrize("chunk_elems", [4_000_000, 20])  # one chunk, and many chunks of whole resamples
def test_bootstrap_interval_matches_plain_loop(monkeypatch, chunk_elems):
    monkeypatch.setattr(common.bootstrap, "_BOOT_CHUNK_ELEMS", chunk_elems)
    pairs = random_pairs(3, 3, seed=5)
    rng = np.random.default_rng(11)  # give B its own noise so the interval is not degenerate
    for _, rb in pairs:
        rb.scores = {n: float(np.clip(v + rng.normal(0, 0.1), 0, 1)) for n, v in rb.scores.items()}
    st = compare_scores(pairs, n_boot=999, seed=3)
    for name, s in st.scores.items():
        d = np.array([rb.scores[name] - ra.scores[name] for ra, rb in pairs])
        lo, hi = reference_bootstrap(d, 999, 3)
        assert s.ci_low == pytest.approx(lo, abs=1e-12) and s.ci_high == pytest.approx(hi, abs=1e-12)
        assert s.ci_low < s.diff < s.ci_high


def test_bootstrap_of_two_pairs_known_interval():
    # d = (0, 1): a resample mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4 -> 95 % interval [0, 1]
    pairs = pair_records(
        [rec("p", 0, {"overall": 0.0}), rec("p", 1, {"overall": 0.0})],
        [rec("p", 0, {"overall": 0.0}), rec("p", 1, {"overall": 1.0})],
    )
    s = compare_scores(pairs, n_boot=10_000).scores["overall"]
    assert (s.diff, s.ci_low, s.ci_high) == (0.5, 0.0, 1.0)
    boot = cs.bootstrap_means(np.array([[0.0], [1.0]]), 10_000, 0)
    assert set(np.unique(boot)) == {0.0, 0.5, 1.0}
    assert np.mean(boot == 0.5) == pytest.approx(0.5, abs=0.02)


def test_seeded_determinism():
    pairs = random_pairs(3, 4, seed=2)
    for _, rb in pairs:
        rb.scores["overall"] = float(np.clip(rb.scores["overall"] + 0.05 * (rb.seed - 1.5), 0, 1))
    d1 = compare_scores(pairs, n_boot=500, seed=7).to_dict()
    d2 = compare_scores(pairs, n_boot=500, seed=7).to_dict()
    d3 = compare_scores(pairs, n_boot=500, seed=8).to_dict()
    assert d1 == d2
    assert d1["scores"]["overall"]["ci_low"] != d3["scores"]["overall"]["ci_low"]


def test_pairing_reports_everything_left_out(caplog):
    a = [
        rec("p1", 0, same_scores(0.5)),
        rec("p1", 1, same_scores(0.5)),
        rec("p1", 1, same_scores(0.9)),  # duplicate key in A: the first one is used
        rec("p2", 0, same_scores(0.5)),  # B failed on this one
        rec("p2", 1, same_scores(0.5)),  # B has no scores
        rec("p3", 0, same_scores(0.5)),  # only in A
    ]
    b = [
        rec("p1", 1, same_scores(0.6)),
        rec("p1", 0, same_scores(0.4)),
        rec("p2", 0, error="CUDA out of memory"),
        rec("p2", 1),
        rec("p4", 0, same_scores(0.5)),  # only in B
    ]
    with caplog.at_level(logging.WARNING, logger="compare.stats"):
        pairs = pair_records(a, b)
    r = pairs.report
    assert [(ra.prompt, ra.seed, rb.scores["overall"]) for ra, rb in pairs] == [("p1", 0, 0.4), ("p1", 1, 0.6)]
    assert pairs[1][0].scores["overall"] == 0.5
    assert (r.n_a, r.n_b, r.n_pairs, r.n_dropped) == (6, 5, 2, 5)
    assert r.only_a == [{"prompt": "p3", "seed": 0, "error": None}]
    assert r.only_b == [{"prompt": "p4", "seed": 0, "error": None}]
    assert r.errored == [
        {"prompt": "p2", "seed": 0, "error_a": None, "error_b": "CUDA out of memory"},
        {"prompt": "p2", "seed": 1, "error_a": None, "error_b": "no scores"},
    ]
    assert r.duplicates_a == [{"prompt": "p1", "seed": 1, "id": "p1-1"}] and r.duplicates_b == []
    assert "2 pairs of 6 A / 5 B records" in r.summary() and "2 errored" in r.summary()
    assert "1 only in A" in caplog.text
    st = compare_scores(pairs, n_boot=10)
    assert st.pairing is r and st.to_dict()["pairing"]["n_dropped"] == 5


def test_per_prompt_rows_and_order():
    a = [rec("x", 0, {"overall": 0.2}), rec("x", 1, {"overall": 0.4}), rec("y", 0, {"overall": 0.5})]
    b = [rec("x", 0, {"overall": 0.6}), rec("x", 1, {"overall": 0.6}), rec("y", 0, {"overall": 0.4})]
    st = compare_scores(pair_records(a, b), n_boot=10)
    x, y = st.prompts
    assert (x.prompt, x.seeds, y.prompt, y.seeds) == ("x", [0, 1], "y", [0])
    assert x.mean_a["overall"] == pytest.approx(0.3) and x.mean_b["overall"] == pytest.approx(0.6)
    assert x.diff["overall"] == pytest.approx(0.3) and y.diff["overall"] == pytest.approx(-0.1)
    assert [p.prompt for p in st.prompt_order()] == ["x", "y"]


def test_json_round_trip(tmp_path):
    st = compare_scores(random_pairs(2, 2, shift=0.05), n_boot=50)
    path = st.write_json(tmp_path / "out" / "comparison.json")
    d = json.loads(path.read_text())
    assert d == json.loads(json.dumps(st.to_dict())) and d["bins"] == list(BINS)
    assert d["thresholds"] == {"tie": 0.02, "strong": 0.15}
    assert ComparisonStats.from_dict(d) == st
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_inputs():
    with pytest.raises(ValueError, match="no pairs"):
        compare_scores([])
    with pytest.raises(ValueError, match="tie < strong"):
        BinThresholds(tie=0.2, strong=0.1)
    with pytest.raises(ValueError, match="n_boot"):
        compare_scores(random_pairs(1, 1), n_boot=0)
    bad = pair_records([rec("p", 0, {"overall": 0.5})], [rec("p", 0, {"overall": 1.5})])
    with pytest.raises(ValueError, match=r"'p', seed 0\) side B: overall = 1.5"):
        compare_scores(bad)
    missing = pair_records([rec("p", 0, {"overall": 0.5})], [rec("p", 0, {"aesthetics": 0.5})])
    with pytest.raises(ValueError, match="side B: overall = None"):
        compare_scores(missing)


def truth_pairs():
    """Two pairs: RAHF sees +0.1 overall on both; the truth is +0.2 on one and 0 on the other; the implausible area
    shrinks from 0.3 to 0.1 on the first."""
    a = [
        rec("x", 0, same_scores(0.5), truth={"scores": same_scores(0.4), "implausible_area": 0.3}),
        rec("y", 0, same_scores(0.5), truth={"scores": same_scores(0.6), "implausible_area": 0.0}),
    ]
    b = [
        rec("x", 0, same_scores(0.6), truth={"scores": same_scores(0.6), "implausible_area": 0.1}),
        rec("y", 0, same_scores(0.6), truth={"scores": same_scores(0.6), "implausible_area": 0.0}),
    ]
    return pair_records(a, b)


def test_truth_is_compared_beside_the_scores_when_every_record_has_it(tmp_path):
    st = compare_scores(truth_pairs(), n_boot=500)
    assert st.scores["overall"].diff == pytest.approx(0.1)
    t = st.truth
    assert t is not None and list(t.scores) == [*SCORE_NAMES, "implausible_area"] and t.truth is None
    o = t.scores["overall"]
    assert (o.mean_a, o.mean_b, o.diff) == (pytest.approx(0.5), pytest.approx(0.6), pytest.approx(0.1))
    # two pairs of differences 0.2 and 0.0: resampled means are 0, 0.1 or 0.2
    assert (o.ci_low, o.ci_high) == (pytest.approx(0.0), pytest.approx(0.2))
    assert (o.wins, o.ties, o.losses) == (1, 1, 0)
    area = t.scores["implausible_area"]
    assert (area.mean_a, area.mean_b, area.diff) == (pytest.approx(0.15), pytest.approx(0.05), pytest.approx(-0.1))
    path = st.write_json(tmp_path / "comparison.json")
    d = json.loads(path.read_text())
    assert d["truth"]["scores"]["overall"]["mean_b"] == pytest.approx(0.6)
    assert ComparisonStats.from_dict(d) == st


def test_no_truth_section_when_a_record_lacks_truth():
    pairs = truth_pairs()
    pairs[1][1].truth = None
    st = compare_scores(pairs, n_boot=50)
    assert st.truth is None and st.to_dict()["truth"] is None
    assert compare_scores(random_pairs(2, 2), n_boot=50).truth is None
