"""The demo's trained checkpoint is trained once and then reused from the cache; demo prompts are distinct and
drawable; a remote adapter folder is copied to one stable local folder."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.names import SCORE_NAMES
from rahf.data.synthetic import parse_prompt, sample_prompts
from rahf.zoo import ensure_synthetic_rahf, recipe_hash

TINY_RECIPE = {
    "data": {"train": 16, "dev": 12, "size": 64, "seed": 0},
    "train": {
        "preset": "rahf-tiny",
        "steps": 2,
        "batch_size": 8,
        "checkpoint_every": 2,
        "eval_every": 2,
        "log_every": 1,
        "warmup_steps": 1,
        "seed": 0,
    },
    "readout": {"split": "dev", "lam": 10.0, "area_threshold": 0.25, "map_gates": True},
}


def test_trained_once_then_reused_from_the_cache(tmp_path):
    messages: list[str] = []
    first = ensure_synthetic_rahf(tmp_path, TINY_RECIPE, log=messages.append)
    assert first.name == f"rahf-tiny-synthetic-{recipe_hash(TINY_RECIPE)}"
    assert (first / "model.safetensors").is_file() and (first / "processor_config.json").is_file()
    assert any("training" in m for m in messages)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    messages.clear()
    again = ensure_synthetic_rahf(tmp_path, TINY_RECIPE, log=messages.append)
    assert again == first and messages == [] and (again / "model.safetensors").stat().st_mtime_ns == stamp
    from rahf.scorer import RAHFScorer

    scorer = RAHFScorer.from_pretrained(first)
    assert scorer.identity["weights_hash"] and scorer.identity["source"] == str(first)
    assert scorer.score_readout is not None and scorer.score_readout.info["examples"] == 12  # fit on the dev split


def test_the_demo_recipe_is_a_valid_training_config_of_the_bar_model():
    from rahf.model import TRAINING_FIELDS
    from rahf.presets import preset_config
    from rahf.train import TrainConfig
    from rahf.words import load_swap_classes
    from rahf.zoo import SYNTHETIC_RECIPE

    train = SYNTHETIC_RECIPE["train"]
    cfg = TrainConfig(data_dir="d", out_dir="o", **train)
    overrides = {k: getattr(cfg, k) for k in TRAINING_FIELDS if getattr(cfg, k) is not None}
    config = preset_config(cfg.preset, cfg.variant, overrides)
    assert (config.heatmap_loss, config.heatmap_weights["misalignment"], config.grid_size) == ("bce", 3.0, 16)
    assert cfg.steps * cfg.batch_size <= 4 * SYNTHETIC_RECIPE["data"]["train"]  # a few epochs, not an open budget
    # the recipe spells out the synthetic world's swap classes (so its hash covers them); they must stay the world's
    assert train["itm_swaps"] == load_swap_classes("synthetic") and config.itm_swaps


def test_sample_prompts_are_distinct_parseable_and_seeded():
    a = sample_prompts(20, seed=0)
    assert len(set(a)) == 20 and a == sample_prompts(20, seed=0) and a != sample_prompts(20, seed=1)
    assert all(parse_prompt(p) for p in a)


def test_remote_adapter_cache_folder_is_the_same_in_every_process(tmp_path):
    code = (
        "from flows.storage import RunStore\n"
        "from flows.stages import _local_folder\n"
        "RunStore('memory://bucket/adapter').write_bytes('flaws.json', b'{}')\n"
        "print(_local_folder('memory://bucket/adapter'))\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True) for _ in "ab"]
    paths = [r.stdout.strip() for r in runs]
    assert paths[0] == paths[1] and paths[0].endswith(tuple("0123456789abcdef"))


# -- the shipped demo model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_writes_a_bundle_that_reproduces_bit_for_bit_and_ships(tmp_path):
    import json

    from rahf import zoo

    shipped = tmp_path / "shipped"
    first = zoo.build_demo_model(tmp_path / "a", TINY_RECIPE, test_size=8, shipped=shipped, ship=True, log=lambda m: 0)
    bundle = tmp_path / "a" / "model"
    assert first["bundle"] == str(bundle) and "vs_shipped" not in first  # nothing shipped before
    records = ("manifest.json", "summary.json", "metrics.json", "metrics.md", "samples.json")
    files = (*zoo.bundle_files(TINY_RECIPE), *records)
    assert "score_readout.safetensors" in files
    for name in files:
        assert (bundle / name).is_file() and (shipped / name).is_file(), name
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert manifest["recipe_hash"] == recipe_hash(TINY_RECIPE) and manifest["recipe"] == TINY_RECIPE
    assert manifest["files"]["model.safetensors"] == zoo.file_sha256(shipped / "model.safetensors")
    assert zoo.shipped_model_problem(TINY_RECIPE, shipped) is None
    assert zoo.shipped_model_problem(zoo.SYNTHETIC_RECIPE, shipped).endswith(f"not {recipe_hash(zoo.SYNTHETIC_RECIPE)}")
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert set(metrics["demo model"]) >= {"scores", "heatmaps", "keywords"}
    samples = json.loads((bundle / "samples.json").read_text())
    assert len(samples) == 6 and all(set(v) == set(SCORE_NAMES) for v in samples.values())
    assert samples == zoo.score_samples(shipped)  # stored values are what the shipped files score
    summary = json.loads((bundle / "summary.json").read_text())
    assert summary["step"] == 2 and summary["test_examples"] == 8
    assert summary["score_readout"]["examples"] == 12 and summary["score_readout"]["split"] == "dev"
    assert manifest["files"]["score_readout.safetensors"] == zoo.file_sha256(shipped / "score_readout.safetensors")
    from rahf.scorer import RAHFScorer

    assert RAHFScorer.from_pretrained(shipped).score_readout is not None  # the bundle scores through its read-out

    # a second build from scratch in another folder: the same bits, reported as a zero difference
    second = zoo.build_demo_model(tmp_path / "b", TINY_RECIPE, test_size=8, shipped=shipped, log=lambda m: 0)
    assert second["vs_shipped"]["max_abs_diff"] == 0.0 and second["vs_shipped"]["missing"] == []
    assert second["vs_shipped"]["max_sample_score_diff"] == 0.0


def test_weights_difference_names_the_tensor_that_moved(tmp_path):
    import torch
    from safetensors.torch import save_file

    from rahf.zoo import weights_difference

    a = {"w": torch.zeros(3, 2), "b": torch.ones(4)}
    save_file(a, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(3, 2), "b": torch.tensor([1.0, 1.5, 1.0, 0.75])}, tmp_path / "b.safetensors")
    diff = weights_difference(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert (diff["max_abs_diff"], diff["tensor"], diff["tensors"], diff["missing"]) == (0.5, "b", 2, [])
    save_file({"w": torch.zeros(3, 2)}, tmp_path / "c.safetensors")
    assert weights_difference(tmp_path / "a.safetensors", tmp_path / "c.safetensors")["missing"] == ["b"]


@pytest.mark.slow
def test_ensure_uses_a_matching_shipped_folder_and_trains_when_it_does_not_match(tmp_path, monkeypatch):
    from rahf import zoo

    shipped = tmp_path / "shipped"
    zoo.build_demo_model(tmp_path / "a", TINY_RECIPE, test_size=8, shipped=shipped, ship=True, log=lambda m: 0)
    monkeypatch.setattr(zoo, "SHIPPED_DIR", shipped)
    messages: list[str] = []
    assert zoo.ensure_synthetic_rahf(tmp_path / "cache", TINY_RECIPE, log=messages.append) == shipped
    assert messages == [] and not (tmp_path / "cache").exists()  # nothing trained, nothing cached

    weights = shipped / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte off
    assert zoo.shipped_model_problem(TINY_RECIPE, shipped).endswith("SHA-256 differs from manifest.json")
    got = zoo.ensure_synthetic_rahf(tmp_path / "cache", TINY_RECIPE, log=messages.append)
    assert got == tmp_path / "cache" / f"rahf-tiny-synthetic-{recipe_hash(TINY_RECIPE)}"
    assert any("training" in m for m in messages)


def test_the_shipped_demo_model_is_the_recipes_and_scores_the_samples_to_the_stored_values(tmp_path):
    import json

    from rahf import zoo

    manifest = json.loads((zoo.SHIPPED_DIR / "manifest.json").read_text())
    assert manifest["recipe"] == zoo.SYNTHETIC_RECIPE and manifest["recipe_hash"] == recipe_hash(zoo.SYNTHETIC_RECIPE)
    assert zoo.shipped_model_problem(zoo.SYNTHETIC_RECIPE) is None  # every file matches its SHA-256
    stored = json.loads((zoo.SHIPPED_DIR / "samples.json").read_text())
    now = zoo.score_samples(zoo.SHIPPED_DIR)
    assert stored.keys() == now.keys()
    for name, scores in stored.items():
        for k, v in scores.items():
            assert abs(now[name][k] - v) < 1e-5, (name, k, now[name][k], v)
    messages: list[str] = []
    assert zoo.ensure_synthetic_rahf(tmp_path, log=messages.append) == zoo.SHIPPED_DIR and messages == []


@pytest.mark.slow
def test_reuse_run_packages_a_finished_run_of_the_recipe_and_refuses_another(tmp_path):
    import copy

    from rahf import zoo

    first = zoo.build_demo_model(tmp_path / "a", TINY_RECIPE, test_size=8, shipped=tmp_path / "none", log=lambda m: 0)
    run = tmp_path / "a" / "work" / "run"
    again = zoo.build_demo_model(
        tmp_path / "b", TINY_RECIPE, test_size=8, shipped=tmp_path / "a" / "model", reuse_run=run, log=lambda m: 0
    )
    assert again["summary"]["seconds"] is None and again["summary"]["reused_run"] == "run"
    assert first["summary"]["threads"] >= 1 and again["summary"]["threads"] is None  # not this process's count
    assert again["summary"]["step"] == first["summary"]["step"] == 2
    assert again["vs_shipped"]["max_abs_diff"] == 0.0  # the same weights, packaged again
    other = copy.deepcopy(TINY_RECIPE)
    other["train"]["steps"] = 3
    with pytest.raises(ValueError, match=r"other settings than the recipe: \['steps'\]"):
        zoo.build_demo_model(tmp_path / "c", other, test_size=8, reuse_run=run, log=lambda m: 0)
