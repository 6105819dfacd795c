"""The demo's trained checkpoint is trained once and then reused from the cache; demo prompts are distinct and
drawable; a remote adapter folder is copied to one stable local folder."""

from __future__ import annotations

import subprocess
import sys

from rahf.data.synthetic import parse_prompt, sample_prompts
from rahf.zoo import ensure_synthetic_rahf, recipe_hash

TINY_RECIPE = {
    "data": {"train": 16, "dev": 8, "size": 64, "seed": 0},
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


def test_the_demo_recipe_is_a_valid_training_config_of_the_bar_model():
    from rahf.model import TRAINING_FIELDS
    from rahf.presets import preset_config
    from rahf.train import TrainConfig
    from rahf.zoo import SYNTHETIC_RECIPE

    train = SYNTHETIC_RECIPE["train"]
    cfg = TrainConfig(data_dir="d", out_dir="o", **train)
    overrides = {k: getattr(cfg, k) for k in TRAINING_FIELDS if getattr(cfg, k) is not None}
    config = preset_config(cfg.preset, cfg.variant, overrides)
    assert (config.heatmap_loss, config.heatmap_weights["misalignment"], config.grid_size) == ("bce", 3.0, 16)
    assert cfg.steps * cfg.batch_size <= 4 * SYNTHETIC_RECIPE["data"]["train"]  # a few epochs, not an open budget


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
