"""Where users see the true gains: the selection stage's ground-truth summary (synthetic world), at the end of the
loop's summary, and the truth beside RAHF in a comparison's summary; absent when the records carry no truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.names import SCORE_NAMES
from flows import stages
from flows.config import LoopConfig
from flows.results import (
    CompareResult,
    GenerateResult,
    LoopResult,
    ManifestResult,
    RepairStageResult,
    SelectionTruth,
    SelectResult,
)
from flows.storage import RunStore

PROMPTS = ["three green triangles at the top", "a yellow diamond in the middle"]


def _config(**kw) -> LoopConfig:
    cfg = LoopConfig(generator="synthetic", rahf="rahf-tiny", per_prompt=3, **kw)
    cfg.selection.thresholds = {"plausibility": 0.0}
    cfg.compare.n_boot = 200
    return cfg


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("truth") / "run")
    generated = stages.generate_and_score(root, PROMPTS, _config())
    return root, generated


def test_selection_stage_reports_true_gains_computed_from_the_records(synthetic_run):
    root, generated = synthetic_run
    result = stages.select_finetune_data(root, _config(), ids=list(generated.ids))
    assert result.truth is not None and (result.truth.prompts, result.truth.images) == (2, 2)
    assert result.truth.select_by == "overall" and result.truth.n_boot == 200
    records = {r.id: r for r in RunStore(root).records()}
    for name in ("overall", "plausibility"):
        sel, rnd, orc, rsel, rrnd = [], [], [], [], []
        for prompt in PROMPTS:
            cands = [r for r in records.values() if r.prompt == prompt]
            (pick,) = [records[i] for i in result.selected if records[i].prompt == prompt]
            true = [r.truth["scores"][name] for r in cands]
            sel.append(pick.truth["scores"][name])
            rnd.append(np.mean(true))
            orc.append(max(true))
            rsel.append(pick.scores[name])
            rrnd.append(np.mean([r.scores[name] for r in cands]))
        s = result.truth.scores[name]
        assert s["true_selected"] == pytest.approx(np.mean(sel))
        assert s["true_random_pick"] == pytest.approx(np.mean(rnd))
        assert s["true_oracle_pick"] == pytest.approx(np.mean(orc))
        assert s["rahf_selected"] == pytest.approx(np.mean(rsel))
        assert s["rahf_random_pick"] == pytest.approx(np.mean(rrnd))
        if np.mean(orc) > np.mean(rnd):
            expected = (np.mean(sel) - np.mean(rnd)) / (np.mean(orc) - np.mean(rnd))
            assert s["share_of_oracle_gain"] == pytest.approx(expected)
    # stored and printed the same way
    stored = RunStore(root).read_json("selection.json")
    assert SelectResult.from_dict(stored) == result
    text = result.to_markdown()
    overall = result.truth.scores["overall"]
    assert "share of oracle gain" in text and f"{overall['true_selected']:.3f}" in text


def test_a_run_without_truth_has_no_truth_summary(synthetic_run, tmp_path):
    root, generated = synthetic_run
    bare = str(tmp_path / "bare")
    store, out = RunStore(root), RunStore(bare)
    out.write_bytes("run.json", store.read_bytes("run.json"))
    for r in store.records():  # the same images as a generator without ground truth would record them
        r.truth = None
        out.put_record(r)
    result = stages.select_finetune_data(bare, _config(), ids=list(generated.ids))
    assert len(result.selected) == 2 and result.truth is None
    assert "true" not in result.to_markdown() and "oracle" not in result.to_markdown()


def _truth(share: float | None = 0.5) -> SelectionTruth:
    row = {
        "rahf_selected": 0.8,
        "rahf_random_pick": 0.6,
        "rahf_gain": 0.2,
        "true_selected": 0.7,
        "true_random_pick": 0.5,
        "true_oracle_pick": 0.9,
        "true_gain": 0.2,
        "true_gain_ci_low": 0.1,
        "true_gain_ci_high": 0.3,
        "share_of_oracle_gain": share,
        "share_ci_low": None if share is None else 0.25,
        "share_ci_high": None if share is None else 0.75,
    }
    return SelectionTruth(prompts=2, images=2, select_by="overall", n_boot=200, scores={n: row for n in SCORE_NAMES})


def _loop(truth: SelectionTruth | None, compare: CompareResult | None = None) -> LoopResult:
    return LoopResult(
        root="r",
        generate=GenerateResult(ids=("a", "b")),
        selection=SelectResult(dataset="d", selected=("a",), candidates=2, truth=truth),
        repair=RepairStageResult(considered=0),
        manifest=ManifestResult(manifest="m", records=2, errors=0),
        compare=compare,
    )


def test_loop_summary_ends_with_this_rounds_true_gains():
    loop = _loop(_truth(), _compare(truth=True))
    text = loop.to_markdown()
    tail = text[text.index("This round's selection in truth") :]
    assert "Finetuning" not in tail and "repair" not in tail  # the last section
    assert text.count("This round's selection in truth") == 1  # not repeated by the selection line
    row = next(line for line in tail.splitlines() if line.startswith("| overall |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["overall", "0.800", "0.600", "+0.200", "0.700", "0.500", "0.900", "+0.200 [+0.100, +0.300]",
                     "0.50 [0.25, 0.75]"]  # fmt: skip
    assert LoopResult.from_dict(json.loads(json.dumps(loop.to_dict()))) == loop
    assert "–" in _truth(None).to_markdown()  # an oracle without gain: no share
    assert "in truth" not in _loop(None).to_markdown()


def _compare(truth: bool) -> CompareResult:
    s = {"mean_a": 0.5, "mean_b": 0.6, "diff": 0.1, "ci_low": 0.05, "ci_high": 0.15, "wins": 3, "ties": 1, "losses": 0}
    t = {**s, "mean_a": 0.4, "mean_b": 0.45, "diff": 0.05, "ci_low": -0.01, "ci_high": 0.11}
    gt = {**{n: t for n in SCORE_NAMES}, "implausible_area": {**t, "mean_a": 0.1, "mean_b": 0.05, "diff": -0.05}}
    return CompareResult(
        a={}, b={}, pairs=4, planned=4, failed={}, missing={}, scores={n: s for n in SCORE_NAMES},
        ground_truth=gt if truth else None,
    )  # fmt: skip


def test_comparison_summary_puts_the_truth_beside_rahf():
    text = _compare(truth=True).to_markdown()
    row = next(line for line in text.splitlines() if line.startswith("| overall |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["overall", "0.5000", "0.6000", "+0.1000 (+0.0500, +0.1500)", "3 / 1 / 0", "0.4000", "0.4500",
                     "+0.0500 (-0.0100, +0.1100)"]  # fmt: skip
    area = next(line for line in text.splitlines() if line.startswith("| implausible_area |"))
    assert "–" in area and "-0.0500" in area
    plain = _compare(truth=False).to_markdown()
    assert "true" not in plain.lower() and "implausible_area" not in plain


def test_comparison_stage_truth_has_intervals(tmp_path, one_torch_thread):
    cfg = _config()
    cfg.compare.per_prompt = 2
    result = stages.compare_checkpoints(str(tmp_path / "cmp"), PROMPTS, cfg)
    gt = result.ground_truth
    assert gt is not None and set(SCORE_NAMES) <= set(gt) and "implausible_area" in gt
    for s in gt.values():
        if "ci_low" in s:
            assert s["ci_low"] <= s["diff"] <= s["ci_high"]
    # A and B are the same checkpoint: the same images, no true difference
    assert gt["overall"]["diff"] == pytest.approx(0.0) and gt["overall"]["mean_a"] == gt["overall"]["mean_b"]
    stored = json.loads((tmp_path / "cmp" / "compare" / "comparison.json").read_text())
    assert stored["truth"]["scores"]["overall"]["mean_a"] == pytest.approx(gt["overall"]["mean_a"])
    html = (tmp_path / "cmp" / "compare" / "report" / "index.html").read_text()
    assert 'class="truth"' in html


def test_selection_stage_exports_the_heatmaps_when_finetuning_weights_by_them(synthetic_run, tmp_path):
    from finetune.dataset import read_metadata
    from finetune.lora import load_heatmaps

    root, generated = synthetic_run
    plain = read_metadata(stages.select_finetune_data(root, _config(), ids=list(generated.ids)).dataset)
    assert all("heatmap" not in r for r in plain)
    cfg = _config(finetune={"heatmap_weighting": True})
    data = stages.select_finetune_data(root, cfg, ids=list(generated.ids)).dataset
    rows = read_metadata(data)
    assert len(rows) == 2 and all(r["heatmap"] == f"heatmaps/{r['id']}.png" for r in rows)
    records = {r.id: r for r in RunStore(root).records()}
    assert all(r["heatmap_source"]["uri"] == records[r["id"]].heatmap_uris["implausibility"] for r in rows)
    assert [m.shape for m in load_heatmaps(data)] == [(64, 64), (64, 64)]
