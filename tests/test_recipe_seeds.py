"""benchmarks/recipe_seeds.py: two recipes over seeds, a gain counted firm only beyond the seeds' spread."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.recipe_seeds import TABLE_NUMBERS, compare, load, markdown


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
    assert "| 0.52 ± 0.02 | 0.605 ± 0.005 | +0.085 | 0.04 | **yes** |" in text
    per_seed = markdown(list(rows.values()), "A", "B", per_seed=True)
    assert "| 0.02 / 0.022 | 0.021 / 0.019 | +0.001 | 0.002 | no |" in per_seed  # a gain inside the spread


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
