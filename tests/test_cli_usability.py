"""The command line as a newcomer meets it: help text and defaults, --threads, the baselines' recipe, Prefect
settings from any working directory, honest score messages, and `data pair`."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rahf.baseline_recipe import BASELINES_RECIPE
from richfeedback import cli
from richfeedback.cli import build_parser, iter_parsers, main

REPO = Path(__file__).resolve().parents[1]
#: the commands whose every flag must carry help text (the others are owned elsewhere and join this list)
DOCUMENTED = (
    "score",
    "samples",
    "train",
    "eval",
    "synth",
    "save-preset",
    "import-richhf",
    "rating-sheet",
    "rating-score",
    "bench-loop",
    "data",
    "data pair",
)


class StopCommandError(Exception):
    """Raised by a stand-in to end a command once the value under test has been seen."""


# ---------------------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------------------


def test_every_flag_of_the_documented_commands_has_help():
    parsers = dict(iter_parsers(build_parser()))
    assert set(DOCUMENTED) <= set(parsers)
    missing = []
    for name in DOCUMENTED:
        for action in parsers[name]._actions:
            if isinstance(action, argparse._SubParsersAction):  # its subcommands need help, not the group
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not (c.help or "").strip()]
            elif not (action.help or "").strip():
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_help_shows_defaults_on_every_subcommand():
    parsers = dict(iter_parsers(build_parser()))
    assert all(p.formatter_class is cli.HelpFormatter for name, p in parsers.items() if name)
    text = " ".join(parsers["score"].format_help().split())
    assert "images per forward pass (default: 8)" in text
    assert "weights and compute dtype (default: fp32)" in text
    # no "(default: None)" or "(default: False)" noise, and no second default where the help names one
    assert "default: None" not in text and "default: False" not in text
    assert text.count("default 1024") == 1 and "(default: 1024)" not in text
    assert "the small CNN's optimizer steps (default: 1100)" in " ".join(parsers["eval"].format_help().split())


def test_train_help_states_the_training_config_defaults():
    import dataclasses

    from rahf.train import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    stated = {}
    for action in dict(iter_parsers(build_parser()))["train"]._actions:
        found = re.search(r"\(TrainConfig default: ([^)]+)\)", action.help or "")
        if found:
            stated[action.dest] = found.group(1)
    assert len(stated) >= 12
    for name, text in stated.items():
        assert type(defaults[name])(text) == defaults[name], name


# ---------------------------------------------------------------------------------------------------------
# --threads
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def thread_calls(monkeypatch):
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    return calls


def test_threads_reaches_torch_in_train(monkeypatch, tmp_path, thread_calls):
    import rahf.train

    seen = {}

    def fake_train(cfg):
        seen["threads_at_start"] = list(thread_calls)
        return {"main_process": False}

    monkeypatch.setattr(rahf.train, "train", fake_train)
    base = ["train", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")]
    assert main([*base, "--threads", "3"]) == 0
    assert seen["threads_at_start"] == [3]
    thread_calls.clear()
    assert main(base) == 0
    assert thread_calls == []  # left as it is


def test_train_prints_its_summary_and_names_the_calibrate_command(monkeypatch, tmp_path, capsys):
    import json

    import rahf.train

    monkeypatch.setattr(rahf.train, "train", lambda cfg: {"main_process": True, "step": 2})
    assert main(["train", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"main_process": True, "step": 2}  # stdout: the summary alone
    assert f"richfeedback calibrate --model {tmp_path / 'run' / 'best'} --data {tmp_path} --split dev" in err


def test_threads_reaches_torch_in_eval_and_score(monkeypatch, tmp_path, thread_calls):
    import rahf.evaluate
    import rahf.scorer

    def stop(*args, **kwargs):
        raise StopCommandError

    monkeypatch.setattr(rahf.evaluate, "load_ground_truth", stop)
    with pytest.raises(StopCommandError):
        main(["eval", "--data", str(tmp_path), "--out", str(tmp_path), "--baselines", "--threads", "2"])
    assert thread_calls == [2]
    monkeypatch.setattr(rahf.scorer.RAHFScorer, "from_pretrained", stop)
    with pytest.raises(StopCommandError):
        main(["score", "--image", "x.png", "--prompt", "a cat", "--out", str(tmp_path), "--threads", "5"])
    assert thread_calls == [2, 5]


# ---------------------------------------------------------------------------------------------------------
# The baselines' recipe
# ---------------------------------------------------------------------------------------------------------


def test_eval_defaults_are_the_bar_recipe():
    args = build_parser().parse_args(["eval", "--data", "d", "--out", "o"])
    assert (
        args.baseline_steps,
        args.baseline_batch_size,
        args.baseline_lr,
        args.baseline_empty_heatmap_weight,
        args.baseline_heatmap_loss,
        args.baseline_seed,
    ) == (1100, 16, 2e-3, 4.0, "mse", 0)
    assert BASELINES_RECIPE.to_dict() == {
        "steps": 1100,
        "batch_size": 16,
        "lr": 2e-3,
        "empty_heatmap_weight": 4.0,
        "heatmap_loss": "mse",
        "seed": 0,
    }


def test_eval_trains_the_small_cnn_with_the_recipe(monkeypatch, tmp_path, one_torch_thread):
    import rahf.baselines
    from rahf.data.synthetic import write_split

    for split in ("train", "test"):
        write_split(tmp_path / "data", split, 3, size=64, seed=0)
    got = {}

    def fake_train_small_cnn(data, **kwargs):
        got.update(kwargs)
        raise StopCommandError

    monkeypatch.setattr(rahf.baselines, "train_small_cnn", fake_train_small_cnn)
    with pytest.raises(StopCommandError):
        main(["eval", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "eval"), "--baselines"])
    assert got == {
        "steps": 1100,
        "batch_size": 16,
        "lr": 2e-3,
        "seed": 0,
        "empty_heatmap_weight": 4.0,
        "heatmap_loss_kind": "mse",
    }


def test_the_recipe_module_imports_no_torch():
    code = "import sys, rahf.baseline_recipe, richfeedback.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# Prefect settings wherever the command line runs
# ---------------------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


PROBE = """
import json, sys
from richfeedback.cli import apply_prefect_defaults
if sys.argv[1] == "apply":
    apply_prefect_defaults()
from prefect.settings import get_current_settings
s = get_current_settings()
print(json.dumps([s.server.analytics_enabled, s.cloud.enable_orchestration_telemetry,
                  s.server.ui.show_promotional_content, s.server.ephemeral.startup_timeout_seconds]))
"""


@pytest.mark.slow
def test_prefect_settings_apply_outside_the_repository(tmp_path):
    def resolved(mode: str, **extra: str) -> list:
        run = subprocess.run(
            [sys.executable, "-c", PROBE, mode], cwd=tmp_path, env=_env(**extra), capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout.strip().splitlines()[-1])

    assert not (tmp_path / "prefect.toml").exists()
    assert resolved("none") == [True, True, True, 20]  # Prefect's own defaults: prefect.toml is not read here
    assert resolved("apply") == [False, False, False, 600]
    # a variable the user set wins
    assert resolved("apply", PREFECT_SERVER_ANALYTICS_ENABLED="true")[0] is True


def test_main_sets_prefect_defaults_before_any_command(monkeypatch, tmp_path):
    for name in cli.PREFECT_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "42")
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", str(tmp_path / "s"), "--train", "0", "--dev", "0", "--test", "0"]) == 0
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY"] == "false"
    assert os.environ["DO_NOT_TRACK"] == "1"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "42"


# ---------------------------------------------------------------------------------------------------------
# score: what it says it wrote
# ---------------------------------------------------------------------------------------------------------


def test_score_messages_name_only_what_was_written(tmp_path, capsys, one_torch_thread):
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 50, 3), 90, dtype=np.uint8)).save(image)
    base = ["score", "--image", str(image), "--prompt", "a grey square"]

    assert main([*base, "--out", str(tmp_path / "a"), "--scores-only"]) == 0
    out = capsys.readouterr().out
    assert "overlays in" not in out and "misaligned" not in out
    assert out.splitlines()[-1].endswith("(--scores-only: the four scores only, no heatmaps or keywords)")
    assert not (tmp_path / "a" / "overlays").exists()

    assert main([*base, "--out", str(tmp_path / "b"), "--no-overlays"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith("(--no-overlays: no overlays)") and "misaligned:" in out
    assert not (tmp_path / "b" / "overlays").exists()

    assert main([*base, "--out", str(tmp_path / "c")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith(f"and overlays in {tmp_path / 'c' / 'overlays'}")
    assert len(list((tmp_path / "c" / "overlays").glob("*.png"))) == 1


# ---------------------------------------------------------------------------------------------------------
# data pair
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def labelled(tmp_path):
    """6 synthetic examples: labels + captions in src/, their images in pics/ less the first two (missing)."""
    from rahf.data.synthetic import write_split

    write_split(tmp_path / "src", "train", 6, size=32, seed=3)
    rows = [json.loads(line) for line in (tmp_path / "src" / "train.jsonl").read_text().splitlines()]
    shutil.copytree(tmp_path / "src" / "train", tmp_path / "pics")
    for row in rows[:2]:
        (tmp_path / "pics" / Path(row["image"]).name).unlink()
    return tmp_path, [r["uid"] for r in rows]


def _split_images(folder: Path) -> list[Path]:
    from rahf.data.richhf import read_split

    records, _ = read_split(folder, "train")
    return [records.image(i) for i in range(len(records))]


def test_data_pair_writes_absolute_paths_and_names_missing_images(labelled, capsys, monkeypatch):
    root, uids = labelled
    args = ["data", "pair", "--labels", str(root / "src" / "train.tfrecord"), "--images", str(root / "pics")]
    assert main([*args, "--captions", str(root / "src" / "train.jsonl"), "--out", str(root / "split")]) == 0
    out, err = capsys.readouterr()
    assert "train: 4 of 6 examples paired" in out and "(image paths absolute)" in out
    assert f"no usable image in {root / 'pics'}: 2 of 6 examples: {uids[0]}, {uids[1]}" in err
    rows = [json.loads(line) for line in (root / "split" / "train.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in rows] == uids[2:]
    assert all(r["image"] == str((root / "pics" / f"{r['uid']}.png").resolve()) for r in rows)
    # the split folder moves and the working directory changes: the images are still found
    shutil.move(root / "split", root / "moved")
    monkeypatch.chdir(root / "src")
    assert [p.name for p in _split_images(root / "moved") if p.is_file()] == [f"{u}.png" for u in uids[2:]]


def test_data_pair_copies_images_with_relative_paths_from_a_split_folder(labelled, capsys):
    root, uids = labelled
    args = ["data", "pair", "--labels", str(root / "src"), "--images", str(root / "pics"), "--out", str(root / "own")]
    assert main([*args, "--copy-images"]) == 0  # captions from the folder's train.jsonl
    assert "(image paths relative)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (root / "own" / "train.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [f"train/{u}.png" for u in uids[2:]]
    shutil.move(root / "own", root / "elsewhere")
    shutil.rmtree(root / "pics")
    images = _split_images(root / "elsewhere")
    assert [p.relative_to(root / "elsewhere").as_posix() for p in images] == [f"train/{u}.png" for u in uids[2:]]
    assert [p.read_bytes() for p in images] == [(root / "src" / "train" / f"{u}.png").read_bytes() for u in uids[2:]]


def test_data_pair_strict_refuses_and_writes_nothing(labelled, capsys):
    root, uids = labelled
    args = ["data", "pair", "--labels", str(root / "src"), "--images", str(root / "pics"), "--out", str(root / "x")]
    assert main([*args, "--strict", "--show", "1"]) == 2
    err = capsys.readouterr().err
    assert f"2 of 6 examples: {uids[0]} and 1 more" in err and "nothing written (--strict)" in err
    assert not (root / "x").exists()


def test_data_pair_refuses_labels_without_captions(labelled, capsys):
    root, _ = labelled
    args = ["data", "pair", "--labels", str(root / "src" / "train.tfrecord"), "--images", str(root / "pics")]
    assert main([*args, "--out", str(root / "y")]) == 2
    assert "give --captions" in capsys.readouterr().err
    rest = ["--images", str(root / "pics"), "--captions", str(root / "src" / "train.jsonl"), "--out", str(root / "y")]
    assert main(["data", "pair", "--labels", str(root / "nope.tfrecord"), *rest]) == 2
    assert "labels not found" in capsys.readouterr().err
    assert not (root / "y").exists()


def test_boolean_finetune_flag_parses_true_and_false_and_refuses_others(capsys):
    from richfeedback.cli import build_parser

    parser = build_parser()
    base = ["finetune", "--data-dir", "d", "--out-dir", "o"]
    assert parser.parse_args([*base, "--heatmap-weighting", "true"]).heatmap_weighting is True
    assert parser.parse_args([*base, "--heatmap-weighting", "False"]).heatmap_weighting is False
    assert parser.parse_args(base).heatmap_weighting is None  # the config's default applies
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--heatmap-weighting", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_train_boolean_flags_switch_both_ways_and_default_to_unset():
    parse = build_parser().parse_args
    base = ["train", "--data-dir", "d", "--out-dir", "o"]
    assert parse(base).score_reads_prompt is None and parse(base).channels_last is None
    assert parse([*base, "--score-reads-prompt"]).score_reads_prompt is True
    assert parse([*base, "--no-score-reads-prompt"]).score_reads_prompt is False
    assert parse([*base, "--no-channels-last"]).channels_last is False
