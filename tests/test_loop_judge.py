"""The independent judge of the loop-gain benchmark (compare.judge, table (e) of compare.loop_gain)."""

from __future__ import annotations

import numpy as np
import pytest

from common.names import SCORE_NAMES
from common.records import RichFeedback


class OffsetJudge:
    """Plausibility 0.5 for the images in ``originals`` (by pixels), 0.5 + ``offset`` for every other image."""

    def __init__(self, originals, offset: float) -> None:
        self.originals = {im.tobytes() for im in originals}
        self.offset = offset
        self.identity = {"source": f"offset judge {offset}"}

    def score(self, prompt, images, **unused):
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        out = []
        for p, im in zip(prompts, images):
            v = 0.5 if im.tobytes() in self.originals else 0.5 + self.offset
            out.append(RichFeedback(p, {n: v for n in SCORE_NAMES}, {}, []))
        return out


def _candidates(n_prompts: int, per_prompt: int, size: int = 32):
    from generators.synthetic import SyntheticGenerator
    from rahf.data.synthetic import sample_prompts

    prompts = sample_prompts(n_prompts, seed=0)
    seeds = [k for _ in prompts for k in range(per_prompt)]
    return SyntheticGenerator(size=size).generate(prompts, per_prompt, seeds)


def test_judge_selection_flags_picks_the_judge_sees_below_average_hand_computed():
    from compare.loop_gain import LoopGainConfig, judge_selection

    cands = _candidates(3, 3)
    assert [g.prompt for g in cands[::3]] == list(dict.fromkeys(g.prompt for g in cands))  # grouped by prompt
    picks = [cands[0], cands[4], cands[7]]  # pick 0 of prompt A, 1 of B, 1 of C
    # A: mean 0.4, pick 0.2: -0.2 -> flagged. B: mean 0.50667, pick 0.52: +0.013 -> kept.
    # C: mean 0.5, pick 0.3: -0.2 -> flagged.
    judged = [0.2, 0.5, 0.5, 0.5, 0.52, 0.5, 0.9, 0.3, 0.3]
    config = LoopGainConfig(select_by="overall", judge_margin=0.05, n_boot=200)
    kept, stats = judge_selection(cands, picks, judged, config)
    true = [g.truth["scores"]["overall"] for g in cands]
    gain = [true[0] - np.mean(true[0:3]), true[4] - np.mean(true[3:6]), true[7] - np.mean(true[6:9])]
    assert [g.id for g in kept] == [cands[4].id]
    assert (stats["picks"], stats["flagged"], stats["flagged_ids"]) == (3, 2, [cands[0].id, cands[7].id])
    assert stats["flagged_gain"]["mean"] == pytest.approx((gain[0] + gain[2]) / 2)
    assert stats["flagged_gain"]["n"] == 2 and stats["flagged_gain"]["ci_low"] == pytest.approx(min(gain[0], gain[2]))
    assert stats["kept_gain"] == {"mean": pytest.approx(gain[1]), "ci_low": None, "ci_high": None, "n": 1}
    assert stats["flagged_not_real"] == int(gain[0] <= 0) + int(gain[2] <= 0)
    assert stats["kept_not_real"] == int(gain[1] <= 0)
    # a wider margin forgives a judge 0.2 below average
    kept, stats = judge_selection(cands, picks, judged, LoopGainConfig(judge_margin=0.25, n_boot=50))
    assert stats["flagged"] == 0 and len(kept) == 3 and stats["flagged_gain"]["mean"] is None
    with pytest.raises(ValueError, match="judge scores"):
        judge_selection(cands, picks, judged[:-1], config)


@pytest.mark.slow  # three repair runs on a small world: about 10 s
def test_judge_repair_flags_accepted_repairs_and_reverts_them_with_drop():
    from compare.loop_gain import LoopGainConfig, _predict, measure_repair
    from generators.synthetic import GroundTruthScorer, SyntheticGenerator
    from rahf.data.synthetic import FlawModel, sample_prompts

    world = SyntheticGenerator(FlawModel(distortion={s: 0.6 for s in FlawModel().distortion}), size=64)
    prompts = sample_prompts(4, seed=3)
    images = world.generate(prompts, 2, [k for _ in prompts for k in range(2)])
    oracle = GroundTruthScorer()
    predicted = _predict(oracle, images)
    config = LoopGainConfig(repair_limit=4, n_boot=50)
    plain = measure_repair(images, predicted, world, oracle, config)
    assert plain["accepted"] >= 1 and "judge" not in plain
    # the sum of true area changes over accepted repairs (rejected ones change nothing)
    accepted_change = plain["area_diff"] * plain["attempted"] / plain["accepted"]

    worse = OffsetJudge([g.image for g in images], -0.1)  # every repaired image looks worse to the judge
    flagged = measure_repair(images, predicted, world, oracle, config, judge=worse)
    j = flagged.pop("judge")
    assert flagged == plain  # report only: the repairs are untouched
    assert (j["checked"], j["flagged"], j["reverted"]) == (plain["accepted"], plain["accepted"], 0)
    assert j["flagged_area_change"]["mean"] == pytest.approx(accepted_change)
    assert j["kept_area_change"]["n"] == 0 and j["flagged_worse"] == plain["false_accepts"]

    better = OffsetJudge([g.image for g in images], +0.1)
    j = measure_repair(images, predicted, world, oracle, config, judge=better)["judge"]
    assert j["flagged"] == 0 and j["kept_area_change"]["mean"] == pytest.approx(accepted_change)

    dropped = measure_repair(images, predicted, world, oracle, replace_drop(config), judge=worse)
    assert dropped["judge"]["reverted"] == plain["accepted"] and dropped["accepted"] == 0
    assert dropped["area_after"] == pytest.approx(dropped["area_before"]) and dropped["false_accepts"] == 0


def replace_drop(config):
    from dataclasses import replace

    return replace(config, judge_drop=True)


@pytest.mark.slow  # three tiny benchmark runs: about 5 s
def test_run_loop_gain_judge_drop_fits_only_on_kept_picks_and_reports_table_e():
    from compare.loop_gain import LoopGainConfig, RandomScorer, _predict, markdown, measure_selection, run_loop_gain
    from generators.synthetic import GroundTruthScorer, SyntheticGenerator
    from rahf.data.synthetic import sample_prompts

    config = LoopGainConfig(
        prompts=6, per_prompt=3, heldout_prompts=2, heldout_per_prompt=2, rounds=1, repair_limit=0, n_boot=50,
        judge_margin=0.05,
    )  # fmt: skip
    oracle = GroundTruthScorer()
    judge = RandomScorer(seed=7)  # an unrelated scorer: it disagrees with the oracle on some picks
    plain = run_loop_gain(config, {"oracle": oracle}, None)["rounds"][0]["scorers"]["oracle"]
    report = run_loop_gain(config, {"oracle": oracle}, None, judge=judge)
    m = report["rounds"][0]["scorers"]["oracle"]
    j = m["selection"]["judge"]
    assert 0 < j["flagged"] < j["picks"] == 6
    assert j["fit_images"] == 6 and m["flaws"] == plain["flaws"]  # report only: the fit is unchanged
    assert report["judge"]["source"] == "random (seed 7)"
    md = markdown(report)
    assert "(e) Independent judge" in md and f"| 1 | oracle | {j['flagged']}/6 |" in md

    dropped = run_loop_gain(replace_drop(config), {"oracle": oracle}, None, judge=judge)
    d = dropped["rounds"][0]["scorers"]["oracle"]
    assert d["selection"]["judge"]["flagged_ids"] == j["flagged_ids"]
    assert d["selection"]["judge"]["fit_images"] == 6 - j["flagged"]
    # the same fit by hand: the oracle's picks minus the flagged ones
    train = sample_prompts(config.prompts + config.heldout_prompts, seed=config.seed)[: config.prompts]
    base = SyntheticGenerator(size=config.size)
    cands = base.generate(train, 3, [k for _ in train for k in range(3)])
    picks, _ = measure_selection(cands, _predict(oracle, cands), config)
    kept = [g.truth for g in picks if g.id not in set(j["flagged_ids"])]
    assert d["flaws"] == base.fit(kept, prior_strength=config.prior_strength).flaws.to_dict()
    assert d["flaws"] != plain["flaws"]
    assert "Flagged picks are left out of the fit" in markdown(dropped)


def test_loop_gain_config_checks_the_judge_settings():
    from compare.loop_gain import LoopGainConfig

    with pytest.raises(ValueError, match="judge_margin"):
        LoopGainConfig(judge_margin=-0.1)
    with pytest.raises(ValueError, match="judge_drop"):
        LoopGainConfig(judge_drop=1)


def test_cli_bench_loop_passes_the_judge_settings(tmp_path, monkeypatch):
    from compare import loop_gain
    from richfeedback.cli import main

    seen = {}
    monkeypatch.setattr(loop_gain, "run_loop_gain", lambda config, scorers, out, log: seen.update(config=config))
    (tmp_path / "loop_gain.md").write_text("")
    args = ["bench-loop", "--out", str(tmp_path), "--scorers", "random", "--judge", "cnn"]
    assert main([*args, "--judge-margin", "0.1", "--judge-drop"]) == 0
    c = seen["config"]
    assert (c.judge, c.judge_margin, c.judge_drop) == ("cnn", 0.1, True)
    assert main(["bench-loop", "--out", str(tmp_path), "--scorers", "random"]) == 0
    c = seen["config"]
    assert (c.judge, c.judge_margin, c.judge_drop) == ("", 0.05, False)


def test_build_judge_rejects_an_unknown_spec(tmp_path):
    from compare.judge import build_judge

    with pytest.raises(ValueError, match="'cnn' or a RAHF model folder"):
        build_judge(str(tmp_path / "missing"))


@pytest.mark.slow  # writes two tiny splits and trains 2 steps: about 5 s
def test_cnn_judge_trains_once_into_the_cache_and_scores_like_a_scorer(tmp_path, one_torch_thread):
    from PIL import Image

    from compare.judge import JudgeRecipe, cnn_judge

    recipe = JudgeRecipe(train=16, dev=8, steps=2, batch_size=4)
    judge = cnn_judge(recipe, root=tmp_path)
    folder = tmp_path / "judges" / f"cnn-{recipe.key()}"
    assert (folder / "model.pt").exists() and judge.identity["weights_hash"] == recipe.key()
    assert set(judge.identity["dev_pearson"]) == set(SCORE_NAMES)
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 200))]
    fb = judge.score("a red circle", images)
    assert all(0.0 <= v <= 1.0 for f in fb for v in f.scores.values())
    assert fb[0].heatmaps["implausibility"].shape == (40, 40) and fb[0].misaligned_keywords == []
    assert judge.score(["a", "b"], images, scores_only=True)[1].heatmaps == {}
    (folder / "data").rename(tmp_path / "moved")  # a second call loads the weights, it does not train
    again = cnn_judge(recipe, root=tmp_path)
    assert again.score("a red circle", images)[1].scores == pytest.approx(fb[1].scores)
    assert not (folder / "data").exists()
