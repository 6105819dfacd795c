"""benchmarks/recipe_seeds.py: two recipes over seeds, a gain counted firm only beyond the seeds' spread."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.recipe_seeds import TABLE_NUMBERS, compare, load, load_loops, loop_numbers, markdown


def _tables(plcc: float, mse: float) -> dict:
    return {"scores": {"plausibility": {"plcc": plcc}}, "heatmaps": {"implausibility": {"mse": mse}}}


def test_gain_is_in_the_better_direction_and_firm_only_beyond_the_spread():
    base = [_tables(0.50, 0.020), _tables(0.54, 0.022)]  # spreads 0.04 and 0.002
    new = [_tables(0.60, 0.021), _tables(0.61, 0.019)]
    rows = {r["metric"]: r for r in compare(base, new)}
    assert set(rows) == {"plausibility/plcc", "implausibility/mse"}  # numbers missing in the tables are skipped
    plcc, mse = rows["plausibility/plcc"], rows["implausibility/mse"]
    assert abs(plcc["gain"] - 0.085) < 1e-12 and abs(plcc["spread"] - 0.04) < 1e-12 and plcc["firm"]
    assert abs(mse["gain"] - 0.001) < 1e-12 and not mse["firm"]  # lower is better; 0.001 < spread 0.002
    text = markdown(list(rows.values()), "A", "B")
    assert "B better on 2 of 2; by more than the seeds' spread on 1." in text
    assert plcc["beyond_own"] and plcc["every_seed"]  # 0.085 > B's spread 0.01; 0.60 > 0.54
    assert not mse["beyond_own"] and not mse["every_seed"]  # 0.001 < 0.002; B's worst 0.021 > A's best 0.020
    assert (
        "Weaker readings: by more than the spread of B alone on 1; every seed of B better than every seed of A on 1."
        in text
    )
    assert "| 0.52 ± 0.02 | 0.605 ± 0.005 | +0.085 | 0.04 | **yes** |" in text
    per_seed = markdown(list(rows.values()), "A", "B", per_seed=True)
    assert "| 0.02 / 0.022 | 0.021 / 0.019 | +0.001 | 0.002 | no |" in per_seed  # a gain inside the spread


def test_the_three_readings_differ():
    def plcc_row(base: list[float], new: list[float]) -> dict:
        rows = compare([_tables(v, 0.01) for v in base], [_tables(v, 0.01) for v in new])
        return next(r for r in rows if r["metric"] == "plausibility/plcc")

    readings = ("firm", "beyond_own", "every_seed")
    # one outlying base seed: gain 1.33 beyond both spreads (1.0), yet B's worst seed only ties A's best
    assert [plcc_row([0.0, 0.0, 1.0], [1.0, 2.0, 2.0])[k] for k in readings] == [True, True, False]
    # B steady, A spread wide: gain 0.3 beyond B's spread (0) but not A's (1.0), and the seeds overlap
    assert [plcc_row([0.0, 1.0], [0.8, 0.8])[k] for k in readings] == [False, True, False]
    # B spread wide above a steady A: every seed better, gain 0.55 inside B's spread 0.8
    assert [plcc_row([0.0, 0.1], [0.2, 1.0])[k] for k in readings] == [False, False, True]


def test_a_loss_reads_worse_and_a_tie_tie():
    rows = compare([_tables(0.6, 0.01)], [_tables(0.5, 0.01)])
    plcc = next(r for r in rows if r["metric"] == "plausibility/plcc")
    assert plcc["gain"] < 0 and not plcc["firm"]
    mse = next(r for r in rows if r["metric"] == "implausibility/mse")
    assert math.copysign(1.0, mse["gain"]) == 1.0  # lower is better: -(0.01 - 0.01) is -0.0 unless normalised
    text = markdown(rows, "A", "B")
    assert "| 0.6 | 0.5 | -0.1 | 0 | worse |" in text
    assert "| 0.01 | 0.01 | +0 | 0 | tie |" in text  # lower is better: -0.0 must not read as a loss


def test_the_25_numbers_and_loading(tmp_path):
    assert len(TABLE_NUMBERS) == 25
    (tmp_path / "metrics.json").write_text(json.dumps({"m": _tables(0.5, 0.01)}))
    assert load(tmp_path)["scores"]["plausibility"]["plcc"] == 0.5
    assert load(tmp_path, "m")["scores"]["plausibility"]["plcc"] == 0.5
    (tmp_path / "metrics.json").write_text(json.dumps({"a": _tables(0.5, 0.01), "b": _tables(0.6, 0.02)}))
    for model in (None, "c"):  # two models and none named, or a name that is not there
        with pytest.raises(ValueError, match=r"holds \['a', 'b'\]: name one of them with --model"):
            load(tmp_path, model)
    assert load(f"{tmp_path}:b")["scores"]["plausibility"]["plcc"] == 0.6  # FOLDER:MODEL names the model
    assert load(f"{tmp_path}:a", "b")["scores"]["plausibility"]["plcc"] == 0.5  # ... and overrides --model
    with pytest.raises(ValueError, match="holds"):
        load(f"{tmp_path}:c")


def _loop(folder, shares: list[float], final_overall: float, area_diff: float, prompts: int = 32) -> None:
    """A bench-loop output with only the fields the loop comparison reads (the RAHF scorer's and the config)."""

    def selection(share: float) -> dict:
        within = {"overall": {"spearman": {"mean": share / 2}}}
        return {
            "share_of_oracle_gain": {"mean": share},
            "true": {"plausibility": {"gain": share / 10}},
            "within_prompt": within,
        }

    rounds = [{"scorers": {"rahf": {"selection": selection(s), "repair": {"area_diff": area_diff}}}} for s in shares]
    curve = [{"overall": {"mean": 0.8}, "plausibility": {"mean": 0.86}}] * len(shares)
    curve.append({"overall": {"mean": final_overall}, "plausibility": {"mean": final_overall + 0.05}})
    folder.mkdir()
    data = {"config": {"prompts": prompts, "seed": 0}, "rounds": rounds, "curve": {"rahf": curve, "oracle": curve}}
    (folder / "loop_gain.json").write_text(json.dumps(data))


def test_the_loop_numbers_of_two_recipes(tmp_path):
    for name, shares, final, area in [
        ("a0", [0.6, 0.3], 0.93, -0.010),
        ("a1", [0.4, 0.3], 0.89, -0.014),
        ("b0", [0.2, 0.1], 0.82, -0.003),
        ("b1", [0.5, 0.2], 0.90, -0.008),
    ]:
        _loop(tmp_path / name, shares, final, area)
    base, new = load_loops([tmp_path / "a0", tmp_path / "a1"]), load_loops([tmp_path / "b0", tmp_path / "b1"])
    assert base[0]["rounds"] == 2 and len(loop_numbers(2)) == 7
    rows = {r["metric"]: r for r in compare(base, new, loop_numbers(2))}
    assert len(rows) == 7
    share = rows["round 1 share of the oracle's gain"]
    assert share["base"] == [0.6, 0.4] and share["new"] == [0.2, 0.5]
    assert abs(share["gain"] - (0.35 - 0.5)) < 1e-12 and abs(share["spread"] - 0.3) < 1e-12
    assert rows["round 1 within-prompt Spearman, overall"]["new"] == [0.1, 0.25]
    assert abs(rows["held-out true plausibility after the last round"]["base"][1] - 0.94) < 1e-12
    area = rows["round 1 repair: true implausible area change"]  # lower is better: b removes less area
    assert not area["higher"] and abs(area["gain"] - (-(-0.0055 - -0.012))) < 1e-12
    text = markdown(list(rows.values()), "A", "B", per_seed=True)
    assert "| loop selection | round 1 share of the oracle's gain | higher | 0.6 / 0.4 | 0.2 / 0.5 |" in text


def test_the_loop_comparison_refuses_other_settings_and_a_run_without_rahf(tmp_path):
    _loop(tmp_path / "a", [0.5], 0.9, -0.01)
    _loop(tmp_path / "b", [0.5], 0.9, -0.01, prompts=16)
    with pytest.raises(ValueError, match=r"b was run with other loop settings than .*a \(prompts\)"):
        load_loops([tmp_path / "a", tmp_path / "b"])
    data = json.loads((tmp_path / "a" / "loop_gain.json").read_text())
    del data["curve"]["rahf"]
    (tmp_path / "a" / "loop_gain.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no RAHF scorer \(scorers: \['oracle'\]\); run bench-loop --rahf"):
        load_loops([tmp_path / "a"])
