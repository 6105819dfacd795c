"""One LoopConfig for the command line, the flows and prefect.yaml (no drift), the typed stage results, run
folders that remember their generator and RAHF, and the repair stage's ids, empty-mask outcome and ground truth."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import yaml

from flows.config import (
    DEFAULT_GENERATOR,
    DEFAULT_RAHF,
    LOOP_FLAGS,
    REPAIR_FLAGS,
    LoopConfig,
    RunFolderMismatchError,
    claim_run_folder,
    get_path,
    read_run_sources,
)
from flows.results import (
    CompareResult,
    FinetuneResult,
    GenerateResult,
    LoopResult,
    ManifestResult,
    RepairPair,
    RepairStageResult,
    RepairTruth,
    SelectResult,
)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["three green triangles at the top", "a yellow diamond in the middle"]
ORACLE = LoopConfig(generator="synthetic", rahf="ground-truth", per_prompt=2)  # no model to build: fast


# -- one config, no drift -------------------------------------------------------------------------------------------


def test_loop_defaults_are_the_benchmarks_supported_ones():
    c = LoopConfig()
    m = c.repair.mask
    assert (m.threshold_mode, m.threshold, m.floor, m.dilate_frac) == ("relative", 0.4, 0.1, 0.06)
    assert (c.repair.heat_drop, c.repair.margin, c.repair.n, c.repair.score) == (0.02, 0.0, 4, "plausibility")
    assert (c.selection.score, c.selection.thresholds, c.repair_below, c.repair_limit) == (
        "overall",
        {"plausibility": 0.8},
        1.0,
        8,
    )
    assert (DEFAULT_GENERATOR, DEFAULT_RAHF) == ("synthetic", "synthetic-default")
    from compare.loop_gain import LoopGainConfig

    assert LoopGainConfig().repair == c.repair  # the benchmark measures the loop's repair


def _parsed(argv: list[str]):
    from richfeedback.cli import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "flags_name"),
    [
        (["loop"], "LOOP_FLAGS"),
        (["demo"], "LOOP_FLAGS"),
        (["repair", "--out", "x"], "REPAIR_FLAGS"),
        (["select", "--out", "x"], "SELECT_FLAGS"),
        (["compare", "--out", "x"], "COMPARE_FLAGS"),
        (["bench-loop"], "BENCH_REPAIR_FLAGS"),
    ],
)
def test_cli_defaults_are_the_loop_config(argv, flags_name):
    import flows.config
    from flows.config import config_from_args

    args = _parsed(argv)
    flags = getattr(flows.config, flags_name)
    defaults = LoopConfig()
    for f in flags:
        assert getattr(args, "cfg__" + f.path.replace(".", "__")) == get_path(defaults, f.path), f.name
    assert config_from_args(args, flags) == defaults  # no flag changes anything by default
    from richfeedback.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[argv[0]]
    text = sub.format_help()
    for f in flags:
        assert f.name in text
    if "--mask-threshold-mode" in text:
        assert "(default: relative)" in " ".join(text.split())


def test_cli_flags_set_the_nested_fields():
    from flows.config import config_from_args

    args = _parsed(["loop", "--mask-threshold", "0.3", "--repair-margin", "0.05", "--threshold", "0.6"])
    c = config_from_args(args, LOOP_FLAGS)
    assert (c.repair.mask.threshold, c.repair.margin, c.selection.thresholds) == (0.3, 0.05, {"plausibility": 0.6})
    assert c.repair.mask.floor == 0.1 and c.finetune == {}  # the rest stays at the defaults
    args = _parsed(["repair", "--out", "x", "--n", "2", "--limit", "3", "--mask-threshold-mode", "absolute"])
    c = config_from_args(args, REPAIR_FLAGS)
    assert (c.repair.n, c.repair_limit, c.repair.mask.threshold_mode) == (2, 3, "absolute")
    c = config_from_args(_parsed(["loop", "--finetune-steps", "7"]), LOOP_FLAGS)
    assert c.finetune == {"steps": 7}


def test_finetune_flags_are_the_lora_config_fields_with_their_defaults():
    from finetune.lora import LoraTrainConfig
    from richfeedback.cli import FINETUNE_FLAGS

    fields = {f.name: f for f in dataclasses.fields(LoraTrainConfig)}
    assert {n for n, _, _ in FINETUNE_FLAGS} == set(fields) - {"target_modules"}
    for name, typ, text in FINETUNE_FLAGS:
        f = fields[name]
        if f.default is not dataclasses.MISSING and name != "generator":
            assert f"(default: {f.default})" in text, name
            assert isinstance(f.default, typ), name


def test_flows_take_the_config_not_loose_knobs():
    from flows import loop

    allowed = {"root", "prompts", "config", "ids", "lora", "lora_a", "lora_b", "generator_b", "dataset", "gpu_slots"}
    names = ("generate_and_score", "select_finetune_data", "finetune_generator", "repair_images")
    for name in (*names, "compare_checkpoints", "feedback_loop"):
        params = inspect.signature(getattr(loop, name).fn).parameters
        assert set(params) <= allowed and params["config"].default is None, name


def test_prefect_yaml_states_the_loop_config():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    defaults = LoopConfig().to_dict()
    assert doc["definitions"]["loop_config"] == defaults
    fallback = {"generator": DEFAULT_GENERATOR, "rahf": DEFAULT_RAHF}
    for dep in doc["deployments"]:
        config = dep["parameters"]["config"]
        LoopConfig.from_dict(config)  # valid
        for key, value in config.items():
            expected = defaults[key] if defaults[key] is not None else fallback.get(key)
            assert value in (expected, defaults[key]), (dep["name"], key, value)
    loop = next(d for d in doc["deployments"] if d["name"] == "feedback-loop")
    assert loop["parameters"]["config"]["rahf"] == "synthetic-default"


def test_config_dict_form_merges_and_refuses_unknown_or_bad_fields():
    c = LoopConfig.from_dict({"repair": {"mask": {"threshold": 0.3}}, "per_prompt": 2})
    assert (c.repair.mask.threshold, c.repair.mask.floor, c.repair.heat_drop, c.per_prompt) == (0.3, 0.1, 0.02, 2)
    assert LoopConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match=r"repair\.mask\.treshold"):
        LoopConfig.from_dict({"repair": {"mask": {"treshold": 0.3}}})
    with pytest.raises(ValueError, match="threshold_mode"):
        LoopConfig.from_dict({"repair": {"mask": {"threshold_mode": "ratio"}}})
    with pytest.raises(ValueError, match="per_prompt"):
        LoopConfig.from_dict({"per_prompt": "eight"})
    with pytest.raises(ValueError, match="repair_below"):
        LoopConfig.from_dict({"repair_below": 1.5})


# -- typed results -----------------------------------------------------------------------------------------------------


def _loop_result() -> LoopResult:
    truth = RepairTruth(2, 0.04, 0.01, 0.8, 0.95, 0.7, 0.78, accepted=1, truly_worse=0)
    return LoopResult(
        root="/runs/r1",
        generate=GenerateResult(ids=("a", "b", "c"), generated=("a", "b"), scored=("a", "b"), skipped=1),
        selection=SelectResult("/runs/r1/finetune-data", ("a",), candidates=3, prompts_without_selection=1),
        repair=RepairStageResult(
            considered=2, accepted=(RepairPair("a", "a2"),), no_mask=("b",), skipped=0, truth=truth
        ),
        manifest=ManifestResult("/runs/r1/manifest.jsonl", records=4, errors=0),
        finetune=FinetuneResult("/runs/r1/finetune/adapter", "synthetic", reused=False, seconds=1.25),
        compare=CompareResult(
            a={"generator": "synthetic", "lora": None},
            b={"generator": "synthetic", "lora": "x"},
            pairs=2,
            planned=2,
            failed={"a": 0, "b": 0},
            missing={"a": 0, "b": 0},
            scores={
                "overall": {
                    "mean_a": 0.5,
                    "mean_b": 0.6,
                    "diff": 0.1,
                    "ci_low": 0.05,
                    "ci_high": 0.15,
                    "wins": 2,
                    "ties": 0,
                    "losses": 0,
                }
            },
        ),
    )


def test_results_round_trip_through_json_and_say_their_numbers():
    result = _loop_result()
    back = LoopResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result and isinstance(back.repair.accepted[0], RepairPair) and back.generate.ids == ("a", "b", "c")
    text = result.to_markdown()
    assert "generated 2, scored 2, reused 1 finished images, 0 failed, 0 missing (of 3 planned" in text
    assert "selected **1** images from 3 candidates (1 prompts without a selection)" in text
    assert "repair: 1 of 2 images repaired (0 kept their original, 1 had an empty mask, 0 failed" in text
    assert "true implausible area 0.0400 -> 0.0100 (-75%)" in text and "0 of 1 accepted repairs truly worse" in text
    assert "| overall | 0.5000 | 0.6000 | +0.1000 (+0.0500, +0.1500) | 2 / 0 / 0 |" in text
    assert "adapter `/runs/r1/finetune/adapter` on `synthetic` (trained in 1.2 s)" in text
    with pytest.raises(ValueError, match="unknown fields"):
        GenerateResult.from_dict({"ids": [], "bogus": 1})


# -- the run folder remembers --------------------------------------------------------------------------------------


def test_run_folder_records_its_sources_and_refuses_others(tmp_path):
    root = str(tmp_path / "run")
    assert read_run_sources(root) is None
    assert claim_run_folder(root, "sd-tiny", None) == ("sd-tiny", DEFAULT_RAHF)  # first writer records
    assert read_run_sources(root) == {"generator": "sd-tiny", "rahf": DEFAULT_RAHF}
    assert claim_run_folder(root) == ("sd-tiny", DEFAULT_RAHF)  # later: the folder's
    assert claim_run_folder(root, "sd-tiny", DEFAULT_RAHF) == ("sd-tiny", DEFAULT_RAHF)  # given and matching
    with pytest.raises(RunFolderMismatchError, match=r"generator 'sd-tiny'.*not 'synthetic'"):
        claim_run_folder(root, "synthetic")
    with pytest.raises(RunFolderMismatchError, match="rahf"):
        claim_run_folder(root, None, "rahf-tiny")
    fresh = str(tmp_path / "fresh")
    assert claim_run_folder(fresh, write=False) == (DEFAULT_GENERATOR, DEFAULT_RAHF)
    assert read_run_sources(fresh) is None


def test_cli_repair_and_compare_refuse_another_generator_with_exit_2(tmp_path, capsys):
    from richfeedback.cli import main

    root = str(tmp_path / "run")
    claim_run_folder(root, "sd-tiny", "rahf-tiny")
    assert main(["repair", "--out", root, "--generator", "synthetic"]) == 2
    assert "made with generator 'sd-tiny'" in capsys.readouterr().err
    assert main(["compare", "--out", root, "--rahf", "synthetic-default", "--num-prompts", "1"]) == 2
    assert "made with rahf 'rahf-tiny'" in capsys.readouterr().err
    assert main(["loop", "--out", root, "--generator", "amused-tiny", "--num-prompts", "1"]) == 2


def test_finetune_defaults_to_the_datasets_generator_and_refuses_another(tmp_path, capsys):
    from flows import stages
    from richfeedback.cli import main

    root = str(tmp_path / "run")
    stages.generate_and_score(root, PROMPTS[:1], ORACLE)
    data = stages.select_finetune_data(root, ORACLE).dataset
    assert read_run_sources(data) == {"generator": "synthetic", "rahf": "ground-truth"}
    (Path(data) / "run.json").unlink()  # the metadata's generator identity says it too
    assert main(["finetune", "--data-dir", data, "--out-dir", str(tmp_path / "ft"), "--generator", "sd-tiny"]) == 2
    assert "made with generator 'synthetic'" in capsys.readouterr().err
    assert main(["finetune", "--data-dir", data, "--out-dir", str(tmp_path / "ft")]) == 0
    assert "finetuning synthetic on" in capsys.readouterr().err
    assert (tmp_path / "ft" / "adapter" / "flaws.json").is_file()


# -- repair: ids, empty masks, ground truth --------------------------------------------------------------------------


def test_repair_takes_only_the_given_ids_and_reports_ground_truth(tmp_path):
    from flows import stages

    root = str(tmp_path / "run")
    first = stages.generate_and_score(root, PROMPTS[:1], ORACLE)
    second = stages.generate_and_score(root, PROMPTS[1:], ORACLE)
    seen = []
    result = stages.repair_images(root, ORACLE, ids=list(first.ids), progress=lambda d, t: seen.append((d, t)))
    decided = {p.stem for p in (Path(root) / "repairs").glob("*.json")}
    assert decided <= set(first.ids) and not decided & set(second.ids)
    assert result.considered == 2 and seen[-1] == (2, 2)
    assert len(result.accepted) + len(result.rejected) + len(result.no_mask) == 2
    t = result.truth
    records = {r.id: r for r in stages.RunStore(root).records()}
    before = sum(records[i].truth["implausible_area"] for i in first.ids) / 2
    assert t is not None and t.images == 2 and t.implausible_area_before == pytest.approx(before)
    assert t.implausible_area_after < t.implausible_area_before  # the oracle's repairs remove flaws
    assert json.loads((Path(root) / "repair.json").read_text()) == json.loads(json.dumps(result.to_dict()))
    again = stages.repair_images(root, ORACLE, ids=list(first.ids))
    assert again.skipped == 2 and again.truth == t  # decided before: the same ground truth
    missing = stages.repair_images(root, ORACLE, ids=["nope"])
    assert missing.not_found == ("nope",) and "1 given ids have no generated record: nope" in missing.to_markdown()


def test_an_empty_mask_is_its_own_outcome_and_is_tried_again(tmp_path):
    from flows import stages

    root = str(tmp_path / "run")
    stages.generate_and_score(root, PROMPTS, ORACLE)
    blind = ORACLE.with_overrides({"repair": {"mask": {"threshold": 1.0, "threshold_mode": "absolute"}}})
    result = stages.repair_images(root, blind)
    assert (len(result.no_mask), result.rejected, result.accepted, result.considered) == (4, (), (), 4)
    decision = json.loads(next((Path(root) / "repairs").glob("*.json")).read_text())
    assert decision["outcome"] == "no-mask" and not decision["accepted"]
    assert "0 kept their original, 4 had an empty mask" in result.to_markdown()
    again = stages.repair_images(root, ORACLE)  # a mask now: tried again, not skipped as decided
    assert again.skipped == 0 and len(again.accepted) + len(again.rejected) == 4 - len(again.no_mask)


@pytest.mark.slow  # two Prefect flow runs and a CLI run: about 20 s
def test_cli_and_flow_print_the_same_repair_summary_with_ground_truth(prefect_harness, tmp_path, capsys):
    import shutil

    from flows import stages
    from flows.loop import repair_images
    from richfeedback.cli import main

    root = tmp_path / "a"
    stages.generate_and_score(str(root), PROMPTS, ORACLE)
    shutil.copytree(root, tmp_path / "b")
    flow_result = repair_images(root=str(root), config={"repair_limit": 3})
    capsys.readouterr()
    assert main(["repair", "--out", str(tmp_path / "b"), "--limit", "3"]) == 0  # rahf: the folder's
    printed = capsys.readouterr().out
    assert flow_result.truth is not None and flow_result.considered == 3
    assert flow_result.to_markdown() in printed and "true implausible area" in printed
