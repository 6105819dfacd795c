"""Best-of-N selection of finetuning data: hand-built candidate sets with known right answers."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from common.records import ImageRecord
from finetune.select import (
    REASON_BELOW,
    REASON_NO_VALID,
    SelectionConfig,
    select_best,
    selection_value,
)
from generators.base import GeneratorIdentity, image_id

GEN = GeneratorIdentity("synthetic", "world")


def rec(prompt: str, seed: int, params: dict | None = None, error: str | None = None, **scores: float) -> ImageRecord:
    params = params or {}
    rid = image_id(prompt, seed, GEN, params)
    return ImageRecord(rid, prompt, seed, GEN.to_dict(), params, f"/img/{rid}.png", dict(scores), error=error)


# plausibility, aesthetics of seeds 0..7 for three prompts
CAT = [(0.50, 0.9), (0.92, 0.2), (0.70, 0.8), (0.85, 0.9), (0.10, 1.0), (0.60, 0.5), (0.30, 0.4), (0.88, 0.7)]
DOG = [(0.75, 0.9), (0.20, 0.2), (0.70, 0.1), (0.65, 0.3), (0.10, 0.2), (0.60, 0.5), (0.30, 0.4), (0.40, 0.7)]
BIRD = [(0.81, 0.5), (0.95, 0.6), (0.20, 0.9), (0.33, 0.1), (0.50, 0.2), (0.60, 0.5), (0.30, 0.4), (0.80, 0.3)]


def candidates() -> list[ImageRecord]:
    return [
        rec(prompt, seed, plausibility=p, aesthetics=a)
        for prompt, table in (("a cat", CAT), ("a dog", DOG), ("a bird", BIRD))
        for seed, (p, a) in enumerate(table)
    ]


def picked(result) -> list[tuple[str, int]]:
    return [(r.prompt, r.seed) for r in result.selected]


def test_default_is_paper_policy_best_plausibility_over_0_8():
    result = select_best(candidates())
    # prompts in sorted order; the dog's best (0.75) is below 0.8
    assert picked(result) == [("a bird", 1), ("a cat", 1)]
    assert [r.selection["value"] for r in result.selected] == [0.95, 0.92]
    assert all(r.selection["rank"] == 1 and r.selection["candidates"] == 8 for r in result.selected)
    assert result.selected[0].selection["config"] == {
        "score": "plausibility",
        "thresholds": {"plausibility": 0.8},
        "top_k": 1,
        "expected_per_prompt": 8,
    }
    rows = {p.prompt: p for p in result.prompts}
    assert [p.prompt for p in result.prompts] == ["a bird", "a cat", "a dog"]
    assert rows["a dog"].kept == 0 and rows["a dog"].reason == REASON_BELOW and rows["a dog"].best_value == 0.75
    assert rows["a cat"].kept == 1 and rows["a cat"].reason is None and rows["a cat"].valid == 8
    assert result.prompts_without_selection == 1 and result.prompts_short == 0
    assert result.excluded_error == result.excluded_missing == result.duplicates == 0


def test_selection_is_independent_of_input_order_and_leaves_inputs_alone():
    records = candidates()
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    a, b = select_best(records), select_best(shuffled)
    assert [r.id for r in a.selected] == [r.id for r in b.selected]
    assert a.summary() == b.summary()
    assert all(r.selection is None for r in records)  # selected are copies


def test_threshold_cuts_more_prompts_when_raised():
    result = select_best(candidates(), SelectionConfig(thresholds={"plausibility": 0.93}))
    assert picked(result) == [("a bird", 1)]
    assert result.prompts_without_selection == 2


def test_threshold_is_inclusive():
    records = [rec("p", 0, plausibility=0.8), rec("p", 1, plausibility=0.79)]
    assert picked(select_best(records)) == [("p", 0)]


def test_weighted_combination_changes_the_winner():
    config = SelectionConfig(weights={"plausibility": 1.0, "aesthetics": 1.0}, thresholds={})
    result = select_best(candidates(), config)
    # cat: seed 3 (0.85+0.9)/2 = 0.875 beats seed 1 (0.92+0.2)/2 = 0.56; dog: seed 0 (0.825); bird: seed 1 (0.775)
    assert picked(result) == [("a bird", 1), ("a cat", 3), ("a dog", 0)]
    assert [r.selection["value"] for r in result.selected] == pytest.approx([0.775, 0.875, 0.825])
    assert result.selected[0].selection["config"]["weights"] == {"plausibility": 1.0, "aesthetics": 1.0}


def test_weights_override_score_and_zero_weight_is_not_needed():
    config = SelectionConfig(score="overall", weights={"aesthetics": 3.0, "overall": 0.0}, thresholds={})
    assert config.needed_scores() == ["aesthetics"]
    assert selection_value(rec("p", 0, aesthetics=0.4), config) == pytest.approx(0.4)
    assert picked(select_best(candidates(), config)) == [("a bird", 2), ("a cat", 4), ("a dog", 0)]


def test_threshold_gates_candidates_ranked_by_another_score():
    # ranked by aesthetics; only candidates with plausibility >= 0.8 may be kept
    config = SelectionConfig(score="aesthetics", thresholds={"plausibility": 0.8})
    result = select_best(candidates(), config)
    # bird: seed 2 (0.9, plaus 0.2) then seed 1 (0.6, plaus 0.95) clears; cat: seed 4 (1.0, plaus 0.1), then
    # seeds 0 and 3 tie at 0.9 (lower seed first; seed 0 plaus 0.5), seed 3 clears
    assert picked(result) == [("a bird", 1), ("a cat", 3)]
    assert [r.selection["rank"] for r in result.selected] == [2, 3]
    assert {p.prompt: p.best_value for p in result.prompts} == {"a bird": 0.9, "a cat": 1.0, "a dog": 0.9}


def test_ties_broken_by_lower_seed_then_id():
    records = [rec("p", 5, plausibility=0.9), rec("p", 2, plausibility=0.9), rec("p", 1, plausibility=0.85)]
    assert picked(select_best(records)) == [("p", 2)]
    twins = [rec("q", 4, {"steps": s}, plausibility=0.9) for s in (10, 20, 30)]
    assert [r.id for r in select_best(twins).selected] == [min(r.id for r in twins)]


def test_nan_missing_and_error_records_are_excluded_and_counted():
    records = candidates()
    records[1 + 16].scores["plausibility"] = math.nan  # bird's best -> next best is seed 0 (0.81)
    del records[1].scores["plausibility"]  # cat's best -> next best is seed 7 (0.88)
    records[7].error = "CUDA out of memory"  # cat seed 7 -> next is seed 3 (0.85)
    records[8].scores["plausibility"] = math.inf  # dog seed 0
    nothing = [rec("empty", s, error="timeout") for s in range(2)] + [rec("empty", 2, aesthetics=0.9)]
    result = select_best(records + nothing)
    assert picked(result) == [("a bird", 0), ("a cat", 3)]
    assert result.excluded_error == 3 and result.excluded_missing == 4
    rows = {p.prompt: p for p in result.prompts}
    assert (rows["a cat"].candidates, rows["a cat"].valid) == (8, 6)
    assert rows["empty"].reason == REASON_NO_VALID and rows["empty"].best_value is None
    assert rows["a dog"].reason == REASON_BELOW and rows["a dog"].best_value == 0.7
    assert result.selected[1].selection["valid"] == 6


def test_unneeded_score_may_be_missing():
    records = [rec("p", 0, plausibility=0.9, aesthetics=math.nan), rec("p", 1, plausibility=0.95)]
    result = select_best(records)
    assert picked(result) == [("p", 1)] and result.excluded_missing == 0


def test_numpy_scores_count_as_scores():
    records = [rec("p", 0, plausibility=np.float32(0.875)), rec("p", 1, plausibility=np.float64(0.85))]
    result = select_best(records)
    assert picked(result) == [("p", 0)] and result.selected[0].selection["value"] == 0.875
    assert type(result.selected[0].selection["value"]) is float


def test_prompt_with_fewer_candidates_is_processed_and_reported_short():
    records = candidates()[:5] + candidates()[8:]  # the cat has seeds 0..4 only; best is seed 1
    result = select_best(records)
    assert picked(result) == [("a bird", 1), ("a cat", 1)]
    rows = {p.prompt: p for p in result.prompts}
    assert rows["a cat"].short and rows["a cat"].candidates == 5 and not rows["a bird"].short
    assert result.prompts_short == 1
    assert select_best(records, SelectionConfig(expected_per_prompt=None)).prompts_short == 0


def test_top_k_two_keeps_two_that_clear():
    result = select_best(candidates(), SelectionConfig(top_k=2))
    # cat: 0.92 (seed 1), 0.88 (seed 7); bird: 0.95 (seed 1), 0.81 (seed 0); dog: none
    assert picked(result) == [("a bird", 1), ("a bird", 0), ("a cat", 1), ("a cat", 7)]
    assert [r.selection["rank"] for r in result.selected] == [1, 2, 1, 2]
    strict = select_best(candidates(), SelectionConfig(top_k=2, thresholds={"plausibility": 0.9}))
    assert picked(strict) == [("a bird", 1), ("a cat", 1)]  # only one clears per prompt
    assert {p.prompt: p.kept for p in strict.prompts} == {"a bird": 1, "a cat": 1, "a dog": 0}


def test_duplicate_ids_use_the_later_record():
    first = rec("p", 0, plausibility=0.95)
    rescored = rec("p", 0, plausibility=0.5)
    result = select_best([first, rec("p", 1, plausibility=0.85), rescored])
    assert picked(result) == [("p", 1)]
    assert result.duplicates == 1 and result.prompts[0].candidates == 2


def test_summary_is_json_able_and_counts():
    records = candidates()
    records[0].error = "boom"
    summary = select_best(records).summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["selected"] == 2 and summary["prompts"] == 3 and summary["excluded_error"] == 1
    assert summary["per_prompt"][2] == {
        "prompt": "a dog",
        "candidates": 8,
        "valid": 8,
        "best_value": 0.75,
        "kept": 0,
        "reason": "below threshold",
        "short": False,
    }


def test_selection_value_needs_the_score():
    with pytest.raises(ValueError, match="plausibility"):
        selection_value(rec("p", 0, aesthetics=0.5), SelectionConfig())
    assert select_best([]).summary()["prompts"] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"score": "beauty"}, "unknown score"),
        ({"weights": {"plausibility": 1.0, "sharpness": 1.0}}, "unknown score"),
        ({"thresholds": {"realism": 0.5}}, "unknown score"),
        ({"weights": {"plausibility": -1.0, "aesthetics": 2.0}}, "weights"),
        ({"weights": {"plausibility": 0.0, "aesthetics": 0.0}}, "weight"),
        ({"weights": {}}, "weight"),
        ({"thresholds": {"plausibility": 1.5}}, "thresholds"),
        ({"thresholds": {"plausibility": math.nan}}, "thresholds"),
        ({"top_k": 0}, "top_k"),
        ({"expected_per_prompt": 0}, "expected_per_prompt"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**kwargs)
