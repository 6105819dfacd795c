"""The loop-gain benchmark (compare.loop_gain) and the within-prompt ranking metrics (rahf.evaluate)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.names import SCORE_NAMES
from rahf.evaluate import markdown, within_prompt_group, within_prompt_metrics, within_prompt_tables

# -- within-prompt metrics on hand-made scores ---------------------------------------------------------------

# Prompt "a": predictions rank the four images exactly backwards.
#   Spearman -1; pairwise accuracy 0 / 6 = 0; predicted best = index 3 (true 0.1), true best 0.4: regret 0.3.
# Prompt "b": pred (0.3, 0.1, 0.2) ranks (3, 1, 2); true (0.5, 0.9, 0.1) ranks (2, 3, 1); d = (1, -2, 1),
#   sum d^2 = 6, Spearman = 1 - 6 * 6 / (3 * 8) = -0.5. Pairs: (0,1) wrong, (0,2) right, (1,2) wrong: 1/3.
#   Predicted best = index 0 (true 0.5), true best 0.9: regret 0.4.
PRED = [0.1, 0.2, 0.3, 0.4, 0.3, 0.1, 0.2]
TRUE = [0.4, 0.3, 0.2, 0.1, 0.5, 0.9, 0.1]
PROMPTS = ["a"] * 4 + ["b"] * 3


def test_within_prompt_group_hand_computed():
    a = within_prompt_group(np.array(PRED[:4]), np.array(TRUE[:4]))
    assert a["spearman"] == pytest.approx(-1.0)
    assert a["pairwise_accuracy"] == pytest.approx(0.0)
    assert a["top1_regret"] == pytest.approx(0.3)
    b = within_prompt_group(np.array(PRED[4:]), np.array(TRUE[4:]))
    assert b["spearman"] == pytest.approx(-0.5)
    assert b["pairwise_accuracy"] == pytest.approx(1 / 3)
    assert b["top1_regret"] == pytest.approx(0.4)


def test_within_prompt_group_ties():
    # A predicted tie on a truly ordered pair counts half; truly tied pairs are left out of the accuracy.
    g = within_prompt_group(np.array([0.5, 0.5, 0.1]), np.array([0.9, 0.2, 0.2]))
    # pairs (0,1): pred tie, true 0>1 -> 0.5; (0,2): right -> 1; (1,2): true tie -> left out. (0.5 + 1) / 2
    assert g["pairwise_accuracy"] == pytest.approx(0.75)
    # predicted best: first of the tied maxima (index 0, true 0.9) = the true best: regret 0
    assert g["top1_regret"] == pytest.approx(0.0)
    # a constant prediction has no Spearman (NaN), perfect predictions have 1 / 1 / 0
    assert math.isnan(within_prompt_group(np.array([0.3, 0.3]), np.array([0.1, 0.2]))["spearman"])
    p = within_prompt_group(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]))
    assert (p["spearman"], p["pairwise_accuracy"], p["top1_regret"]) == pytest.approx((1.0, 1.0, 0.0))


def test_within_prompt_metrics_averages_over_prompts_with_ci():
    m = within_prompt_metrics(PRED, TRUE, PROMPTS, n_boot=500, seed=0)
    assert m["prompts"] == 2 and m["images"] == 7
    assert m["spearman"]["mean"] == pytest.approx(-0.75)
    assert m["pairwise_accuracy"]["mean"] == pytest.approx(1 / 6)
    assert m["top1_regret"]["mean"] == pytest.approx(0.35)
    # two prompts: every resample's mean is one of the two values or their mean
    assert m["spearman"]["ci_low"] == pytest.approx(-1.0) and m["spearman"]["ci_high"] == pytest.approx(-0.5)
    assert m["top1_regret"]["ci_low"] == pytest.approx(0.3) and m["top1_regret"]["ci_high"] == pytest.approx(0.4)
    assert m["spearman"]["n"] == 2


def test_within_prompt_metrics_skips_singletons_and_checks_lengths():
    m = within_prompt_metrics([*PRED, 0.7], [*TRUE, 0.2], [*PROMPTS, "c"], n_boot=100)
    assert m["prompts"] == 2 and m["images"] == 7  # "c" has one image: no ranking within it
    with pytest.raises(ValueError, match="same length"):
        within_prompt_metrics(PRED, TRUE[:3], PROMPTS)
    assert within_prompt_metrics([0.1], [0.2], ["x"])["prompts"] == 0


def test_within_prompt_tables_only_when_groups_exist_and_markdown_shows_them():
    names = ("plausibility", "overall")
    pred = {n: np.array(PRED) for n in names}
    true = {n: np.array(TRUE) for n in names}
    t = within_prompt_tables(pred, true, PROMPTS, n_boot=100)
    assert set(t) == set(names) and t["overall"]["spearman"]["mean"] == pytest.approx(-0.75)
    assert within_prompt_tables(pred, true, [f"p{i}" for i in range(7)]) is None
    # ``markdown`` prints the within-prompt table beside Tables 1-4 when an evaluation carries one
    zero = {"plcc": 0.0, "srcc": 0.0}
    hm = dict.fromkeys(["mse", "mse_gt0", "cc", "kld", "sim", "nss", "auc_judd"], 0.0)
    res = {
        "n": 7,
        "scores": dict.fromkeys(SCORE_NAMES, zero),
        "heatmaps": {"implausibility": hm, "misalignment": hm},
        "keywords": {"precision": 0.0, "recall": 0.0, "f1": 0.0},
        "within_prompt": t,
    }
    md = markdown({"m": res})
    assert "Within-prompt ranking" in md
    assert "| m | overall | 2 | -0.750" in md


def test_evaluate_adds_within_prompt_only_when_a_prompt_repeats():
    from common.names import HEATMAP_NAMES, SCORE_NAMES
    from rahf.evaluate import GroundTruth, Predictions, evaluate

    rng = np.random.default_rng(0)
    maps = {n: rng.random((7, 4, 4)).astype(np.float32) for n in HEATMAP_NAMES}
    targets = ["a red_0 circle"] * 7

    def run(prompts):
        gt = GroundTruth(
            [f"u{i}" for i in range(7)], prompts, [], {n: np.array(TRUE) for n in SCORE_NAMES}, maps, targets
        )
        return evaluate(Predictions({n: np.array(PRED) for n in SCORE_NAMES}, maps, targets), gt)

    tables = run(PROMPTS)
    assert tables["within_prompt"]["plausibility"]["prompts"] == 2
    assert tables["within_prompt"]["overall"]["top1_regret"]["mean"] == pytest.approx(0.35)
    assert "within_prompt" not in run([f"p{i}" for i in range(7)])


# -- the benchmark at a tiny size ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    from compare.loop_gain import LoopGainConfig, RandomScorer, run_loop_gain
    from generators.synthetic import GroundTruthScorer
    from rahf.scorer import RAHFScorer

    out = tmp_path_factory.mktemp("bench")
    config = LoopGainConfig(
        prompts=4, per_prompt=8, heldout_prompts=4, heldout_per_prompt=2, rounds=1, size=64, repair_limit=4,
        select_by="plausibility", n_boot=200, misalignment_repair=True,
    )  # fmt: skip
    scorers = {
        "random": RandomScorer(seed=0),
        "rahf": RAHFScorer.from_pretrained("rahf-tiny", batch_size=16),
        "oracle": GroundTruthScorer(),
    }
    return run_loop_gain(config, scorers, out), out


@pytest.mark.slow  # the shared fixture runs the benchmark once: about 15 s
def test_bench_oracle_selects_truly_better_and_owns_all_of_its_gain(tiny_bench):
    result, _ = tiny_bench
    r = {s: result["rounds"][0]["scorers"][s] for s in ("random", "rahf", "oracle")}
    sel = {s: r[s]["selection"] for s in r}
    # round 1: every scorer sees the same candidates, so the oracle's pick (by true plausibility) is the best
    tp = {s: sel[s]["true"]["plausibility"] for s in sel}
    assert tp["oracle"]["selected"] >= tp["random"]["selected"]
    assert tp["oracle"]["selected"] >= tp["rahf"]["selected"]
    assert tp["oracle"]["selected"] > tp["oracle"]["random_pick"]
    assert tp["oracle"]["selected"] == pytest.approx(tp["random"]["oracle_pick"])
    assert sel["oracle"]["share_of_oracle_gain"]["mean"] == pytest.approx(1.0)
    assert sel["oracle"]["share_of_oracle_gain"]["ci_low"] == pytest.approx(1.0)
    assert sel["oracle"]["share_of_oracle_gain"]["ci_high"] == pytest.approx(1.0)
    assert sel["oracle"]["within_prompt"]["plausibility"]["top1_regret"]["mean"] == pytest.approx(0.0)
    # the share is (selected - random) / (oracle - random) over the same prompts
    t = tp["rahf"]
    expected = (t["selected"] - t["random_pick"]) / (t["oracle_pick"] - t["random_pick"])
    assert sel["rahf"]["share_of_oracle_gain"]["mean"] == pytest.approx(expected)
    # the same prompts and the same candidates for everyone in round 1: the random-pick expectation agrees
    rnd = {s: sel[s]["true"]["overall"]["random_pick"] for s in sel}
    assert rnd["random"] == pytest.approx(rnd["oracle"]) and rnd["rahf"] == pytest.approx(rnd["oracle"])
    assert sel["oracle"]["diversity"]["prompts"] == 4 and sel["oracle"]["diversity"]["prompts_of"] == 4


@pytest.mark.slow  # the shared fixture runs the benchmark once: about 15 s
def test_bench_oracle_repair_reduces_true_implausible_area(tiny_bench):
    result, _ = tiny_bench
    rep = result["rounds"][0]["scorers"]["oracle"]["repair"]
    assert rep["attempted"] == 4
    assert rep["accepted"] >= 1
    assert rep["area_after"] < rep["area_before"]
    assert rep["false_accepts"] == 0 and rep["false_accept_share"] == 0.0
    assert rep["accept_rate"] == pytest.approx(rep["accepted"] / rep["attempted"])


@pytest.mark.slow  # the shared fixture runs the benchmark once: about 15 s
def test_bench_misalignment_repair_table_agrees_with_its_records(tiny_bench):
    result, out = tiny_bench
    for s in ("random", "rahf", "oracle"):
        rep = result["rounds"][0]["scorers"][s]["misalignment_repair"]
        recs = rep["records"]
        assert rep["attempted"] == len(recs) == 4
        assert rep["accepted"] == sum(r["accepted"] for r in recs)
        assert rep["nothing_to_repair"] == sum(r["reason"] == "nothing to repair" for r in recs)
        for name in ("alignment", "misaligned_area", "plausibility"):
            t = rep["true"][name]
            assert t["before"] == pytest.approx(np.mean([r[f"{name}_before"] for r in recs]))
            assert t["after"] == pytest.approx(np.mean([r[f"{name}_after"] for r in recs]))
            assert t["diff"] == pytest.approx(t["after"] - t["before"]) and t["ci_low"] <= t["diff"] <= t["ci_high"]
        worse = sum(r["accepted"] and r["alignment_after"] < r["alignment_before"] for r in recs)
        assert rep["false_accepts"] == worse
        for r in recs:  # a rejected repair keeps the original
            if not r["accepted"]:
                assert r["alignment_after"] == r["alignment_before"]
                assert r["misaligned_area_after"] == r["misaligned_area_before"]
    # the oracle repairs the truly least aligned images and never accepts a truly less aligned one
    oracle = result["rounds"][0]["scorers"]["oracle"]["misalignment_repair"]
    assert oracle["false_accepts"] == 0 and oracle["accepted"] >= 1
    assert oracle["true"]["alignment"]["after"] > oracle["true"]["alignment"]["before"]
    assert oracle["true"]["misaligned_area"]["after"] < oracle["true"]["misaligned_area"]["before"]
    md = (out / "loop_gain.md").read_text()
    assert "(d) Misalignment repair" in md
    a = oracle["true"]["alignment"]
    assert f"| 1 | oracle | 4 | {oracle['nothing_to_repair']} | {oracle['accepted']} (" in md
    assert f"{a['before']:.3f} → {a['after']:.3f}" in md


def test_random_scorer_maps_both_heatmaps_and_keeps_its_implausibility_draws():
    from compare.loop_gain import RandomScorer
    from generators.synthetic import SyntheticGenerator

    im = SyntheticGenerator(size=32).generate(["a red circle in the middle"], 1)[0].image
    fb = RandomScorer(seed=1).score("a red circle in the middle", [im])[0]
    impl, mis = fb.heatmaps["implausibility"], fb.heatmaps["misalignment"]
    assert impl.shape == mis.shape == (32, 32) and mis.dtype == np.float32
    assert mis.min() >= 0.0 and mis.max() <= 1.0 and mis.std() > 0.01 and not np.allclose(impl, mis)
    assert fb.misaligned_keywords == []


@pytest.mark.slow  # the shared fixture runs the benchmark once: about 15 s
def test_bench_generator_before_after_and_files(tiny_bench):
    result, out = tiny_bench
    gens = {s: result["rounds"][0]["scorers"][s]["generator"] for s in ("random", "rahf", "oracle")}
    # the same held-out prompts and seeds: every scorer's "before" is the same base generator's output
    before = {s: gens[s]["overall"]["mean_a"] for s in gens}
    assert before["random"] == pytest.approx(before["oracle"]) and before["rahf"] == pytest.approx(before["oracle"])
    assert gens["oracle"]["overall"]["n"] == 8
    for name in ("loop_gain.json", "loop_gain.md", "loop_gain.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "loop_gain.json").read_text())
    assert data["config"]["prompts"] == 4 and len(data["rounds"]) == 1
    assert (out / "loop_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "loop_gain.md").read_text()
    assert "| 1 | oracle |" in md and "share of oracle gain" in md


def test_random_scorer_is_deterministic_per_image():
    from compare.loop_gain import RandomScorer
    from generators.synthetic import SyntheticGenerator

    ims = [g.image for g in SyntheticGenerator(size=32).generate(["a red circle in the middle"], 3)]
    a = RandomScorer(seed=1).score("a red circle in the middle", ims)
    b = RandomScorer(seed=1).score("a red circle in the middle", ims[::-1])
    assert [x.scores for x in a] == [x.scores for x in b[::-1]]
    assert a[0].heatmaps["implausibility"].shape == (32, 32)
    assert all(0.0 <= v <= 1.0 for x in a for v in x.scores.values())
    assert a[0].scores != RandomScorer(seed=2).score("a red circle in the middle", ims[:1])[0].scores


def test_loop_gain_config_builds_the_repair_config_and_checks_it():
    from compare.loop_gain import LoopGainConfig
    from inpainting.masks import MaskConfig
    from inpainting.repair import RepairConfig, loop_repair_config

    mask = MaskConfig(threshold=0.4, threshold_mode="relative", floor=0.1, dilate_frac=0.1)
    cfg = LoopGainConfig(repair=RepairConfig(mask=mask, n=6, margin=0.01, heat_drop=0.05), seed=3).repair_config()
    assert (cfg.n, cfg.margin, cfg.heat_drop, cfg.seed, cfg.score) == (6, 0.01, 0.05, 3, "plausibility")
    m = cfg.mask
    assert (m.threshold, m.threshold_mode, m.floor, m.dilate_frac) == (0.4, "relative", 0.1, 0.1)
    assert LoopGainConfig().repair == loop_repair_config()  # the loop's supported settings
    with pytest.raises(ValueError, match="repair"):
        LoopGainConfig(repair={"n": 2})


def test_cli_bench_loop_takes_the_repair_settings_from_the_config(tmp_path, monkeypatch):
    from compare import loop_gain
    from richfeedback.cli import main

    seen = {}
    monkeypatch.setattr(loop_gain, "run_loop_gain", lambda config, scorers, out, log: seen.update(config=config))
    (tmp_path / "loop_gain.md").write_text("")
    args = ["bench-loop", "--out", str(tmp_path), "--scorers", "random", "--mask-floor", "0.2", "--repair-n", "2"]
    args.append("--misalignment-repair")
    assert main(args) == 0
    r = seen["config"].repair
    assert (r.mask.floor, r.n, r.mask.threshold, r.heat_drop) == (0.2, 2, 0.4, 0.02)
    assert seen["config"].misalignment_repair is True


def test_cli_bench_loop_rejects_unknown_scorers(capsys):
    from richfeedback.cli import main

    assert main(["bench-loop", "--scorers", "random,human", "--out", "unused"]) == 2
    assert "random, rahf, oracle" in capsys.readouterr().err


@pytest.mark.slow  # builds rahf-tiny and draws the plot: about 10 s
def test_cli_bench_loop_writes_the_three_files(tmp_path, capsys):
    from richfeedback.cli import main

    args = ["bench-loop", "--out", str(tmp_path), "--rahf", "rahf-tiny", "--scorers", "rahf,oracle", "--rounds", "2"]
    args += ["--prompts", "2", "--per-prompt", "3", "--heldout-prompts", "2", "--heldout-per-prompt", "2"]
    assert main([*args, "--repair-limit", "1", "--n-boot", "50", "--size", "32"]) == 0
    data = json.loads((tmp_path / "loop_gain.json").read_text())
    assert list(data["rounds"][1]["scorers"]) == ["rahf", "oracle"] and data["config"]["size"] == 32
    assert data["scorers"]["rahf"]["source"].startswith("rahf-tiny")
    assert len(data["curve"]["oracle"]) == 3  # the base world and after each of 2 rounds
    assert (tmp_path / "loop_gain.png").stat().st_size > 0
    assert "(a) Selection" in capsys.readouterr().out


# -- one round's selection in truth, from run records ---------------------------------------------------------


def _truth_rec(id_: str, prompt: str, seed: int, rahf: dict[str, float], true: dict[str, float]):
    from common.records import ImageRecord

    others = {n: 0.5 for n in SCORE_NAMES}
    truth = {"scores": {**others, **true}, "implausible_area": 0.0}
    return ImageRecord(id_, prompt, seed, {"backend": "synthetic"}, scores={**others, **rahf}, truth=truth)


def hand_round():
    """Two prompts; RAHF picks c1 (truly mediocre) and d1 (truly best). See the test for the hand sums."""
    r = _truth_rec
    return [
        r("c1", "p1", 0, {"overall": 0.9, "plausibility": 0.3}, {"overall": 0.4, "plausibility": 0.2}),
        r("c2", "p1", 1, {"overall": 0.5, "plausibility": 0.3}, {"overall": 0.8, "plausibility": 0.6}),
        r("c3", "p1", 2, {"overall": 0.1, "plausibility": 0.3}, {"overall": 0.0, "plausibility": 1.0}),
        r("d1", "p2", 0, {"overall": 0.6, "plausibility": 0.7}, {"overall": 0.9, "plausibility": 0.5}),
        r("d2", "p2", 1, {"overall": 0.2, "plausibility": 0.1}, {"overall": 0.3, "plausibility": 0.5}),
    ]


def test_selection_gain_hand_computed():
    from compare.loop_gain import selection_gain

    out = selection_gain(hand_round(), ["c1", "d1"], n_boot=200, seed=0)
    assert (out["prompts"], out["images"]) == (2, 2)
    o, p = out["scores"]["overall"], out["scores"]["plausibility"]
    # overall: RAHF picked (0.9, 0.6) vs the prompts' means (0.5, 0.4)
    assert (o["rahf_selected"], o["rahf_random_pick"]) == (pytest.approx(0.75), pytest.approx(0.45))
    assert o["rahf_gain"] == pytest.approx(0.30)
    # truly (0.4, 0.9) vs means (0.4, 0.6); the truly best are 0.8 and 0.9
    assert (o["true_selected"], o["true_random_pick"]) == (pytest.approx(0.65), pytest.approx(0.5))
    assert (o["true_oracle_pick"], o["true_gain"]) == (pytest.approx(0.85), pytest.approx(0.15))
    assert o["share_of_oracle_gain"] == pytest.approx(0.15 / 0.35)
    assert o["true_gain_ci_low"] <= 0.15 <= o["true_gain_ci_high"]
    assert o["share_ci_low"] <= 0.15 / 0.35 <= o["share_ci_high"]
    # plausibility: the oracle is the truly most plausible (c3 = 1.0, d1 or d2 = 0.5): RAHF lost plausibility
    assert (p["rahf_selected"], p["rahf_random_pick"]) == (pytest.approx(0.5), pytest.approx(0.35))
    assert (p["true_selected"], p["true_random_pick"]) == (pytest.approx(0.35), pytest.approx(0.55))
    assert p["true_oracle_pick"] == pytest.approx(0.75) and p["share_of_oracle_gain"] == pytest.approx(-1.0)
    # every candidate alike in truth: no oracle gain to share
    assert out["scores"]["alignment"]["share_of_oracle_gain"] is None
    assert out["scores"]["alignment"]["true_gain"] == pytest.approx(0.0)


def test_selection_gain_only_with_truth_and_a_selection():
    from dataclasses import replace

    from compare.loop_gain import selection_gain

    records = hand_round()
    assert selection_gain(records, [], n_boot=50) is None
    records[4] = replace(records[4], truth=None)  # one candidate of a selected prompt without truth
    assert selection_gain(records, ["c1", "d1"], n_boot=50) is None
    with pytest.raises(ValueError, match="not among the candidates"):
        selection_gain(hand_round(), ["c1", "zz"], n_boot=50)


# -- heatmap-weighted finetuning ---------------------------------------------------------------------------------


def test_heat_trusted_counts_leave_out_exactly_the_truly_distorted_under_the_oracle_map():
    from compare.loop_gain import heat_trusted_counts
    from generators.synthetic import SyntheticGenerator
    from rahf.data.synthetic import Scene, flaw_counts, sample_prompts

    images = SyntheticGenerator().generate(sample_prompts(4, seed=5), 2)
    maps = [g.truth["maps"]["implausibility"] for g in images]
    counts, stats = heat_trusted_counts(images, maps, 0.15)
    full = [g.truth["counts"] for g in images]
    n_obj = sum(sum(c["objects"].values()) for c in full)
    n_bad = sum(sum(c["distorted"].values()) for c in full)
    assert n_bad > 0
    assert stats == {"objects": n_obj, "excluded": n_bad, "distorted": n_bad, "excluded_distorted": n_bad}
    assert all(sum(c["distorted"].values()) == 0 for c in counts)
    assert sum(sum(c["objects"].values()) for c in counts) == n_obj - n_bad
    # a map of zeros leaves the counts as they are
    zero, stats0 = heat_trusted_counts(images, [np.zeros_like(m) for m in maps], 0.15)
    assert zero == full and stats0["excluded"] == 0
    assert full == [flaw_counts(Scene.from_json(g.image.info["scene"])) for g in images]


def test_loop_gain_config_checks_the_heatmap_weighted_ks():
    from compare.loop_gain import LoopGainConfig

    assert LoopGainConfig(prompts=4, heatmap_weighted_fit=[1, 2]).heatmap_weighted_fit == (1, 2)
    with pytest.raises(ValueError, match="divide"):
        LoopGainConfig(prompts=4, heatmap_weighted_fit=(3,))
    with pytest.raises(ValueError, match="per_prompt"):
        LoopGainConfig(prompts=4, per_prompt=2, heatmap_weighted_fit=(4,))
    with pytest.raises(ValueError, match="heat_threshold"):
        LoopGainConfig(heat_threshold=1.0)


def test_heatmap_weighted_variant_fits_on_the_same_image_count_and_reports_its_rows(tmp_path):
    from compare.loop_gain import LoopGainConfig, run_loop_gain
    from generators.synthetic import GroundTruthScorer
    from rahf.data.synthetic import SHAPES, FlawModel

    config = LoopGainConfig(
        prompts=4, per_prompt=3, heldout_prompts=2, heldout_per_prompt=2, rounds=1, repair_limit=0, n_boot=50,
        heatmap_weighted_fit=(1, 2),
    )  # fmt: skip
    result = run_loop_gain(config, {"oracle": GroundTruthScorer()}, None)
    m = result["rounds"][0]["scorers"]["oracle"]
    hw = m["heatmap_weighted"]
    assert (hw["1"]["prompts"], hw["1"]["images"], hw["2"]["prompts"], hw["2"]["images"]) == (4, 4, 2, 4)
    prior = FlawModel()
    for v in hw.values():
        e = v["exclusion"]
        assert e["excluded"] == e["distorted"] == e["excluded_distorted"]  # the oracle's map: exactly the flawed
        # no distorted object is counted: every fitted distortion rate is the prior shrunk by the clean trials
        for sh in SHAPES:
            rate = v["flaws"]["distortion"][sh]
            assert rate <= prior.distortion[sh] + 1e-12
        assert v["generator"]["overall"]["n"] == 4
        assert v["generator"]["overall"]["mean_a"] == pytest.approx(m["generator"]["overall"]["mean_a"])
    # k = 1 picks what best-of-3 picks; its alignment flaw rates are fitted from the same groups
    assert hw["1"]["flaws"]["wrong_colour"] == pytest.approx(m["flaws"]["wrong_colour"])
    assert len(result["curve_heatmap_weighted"]["oracle, heat-weighted top-2"]) == 2
    from compare.loop_gain import markdown

    md = markdown(result)
    assert "| 1 | oracle, heat-weighted top-2 |" in md and "Heatmap-weighted finetuning" in md


def test_cli_bench_loop_passes_the_heatmap_weighted_ks(tmp_path, monkeypatch):
    from compare import loop_gain
    from richfeedback.cli import main

    seen = {}
    monkeypatch.setattr(loop_gain, "run_loop_gain", lambda config, scorers, out, log: seen.update(config=config))
    (tmp_path / "loop_gain.md").write_text("")
    args = ["bench-loop", "--out", str(tmp_path), "--scorers", "random", "--heatmap-weighted-fit", "1,2"]
    assert main([*args, "--heat-threshold", "0.3"]) == 0
    assert seen["config"].heatmap_weighted_fit == (1, 2) and seen["config"].heat_threshold == 0.3
    assert main(["bench-loop", "--out", str(tmp_path), "--scorers", "random"]) == 0
    assert seen["config"].heatmap_weighted_fit == ()
