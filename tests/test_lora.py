"""LoRA finetuning on the tiny presets: the loss falls when overfitting 4 images, the saved adapter reloads and
changes outputs for a fixed seed, an interrupted run resumes to the same adapter; the synthetic world's fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.records import ImageRecord
from finetune.dataset import export_dataset
from finetune.lora import LoraTrainConfig, finetune
from finetune.synthetic import SyntheticFitConfig, fit_synthetic
from generators.base import encode_png
from generators.synthetic import SyntheticGenerator
from rahf.data.synthetic import FlawModel

PROMPTS = ["two red circles at the left", "a blue square at the bottom"]


def make_folder(tmp_path, images) -> str:
    records = []
    for g in images:
        path = tmp_path / "src" / f"{g.id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(g.image))
        rec = ImageRecord.from_generated(g, str(path))
        rec.scores = dict(g.truth["scores"]) if g.truth else {"plausibility": 0.9}
        records.append(rec)
    out = tmp_path / "data"
    export_dataset(records, str(out))
    return str(out)


@pytest.fixture(scope="module")
def four_images():
    return SyntheticGenerator().generate(PROMPTS, 2)


def _mean(xs):
    return float(np.mean(xs))


@pytest.mark.parametrize("preset", ["amused-tiny", "sd-tiny"])
def test_loss_falls_and_adapter_changes_outputs(preset, four_images, tmp_path):
    data = make_folder(tmp_path, four_images)
    # the tiny UNet has one cross-attention block: attention-only LoRA is too small to overfit in 40 steps, so the
    # test also adapts its feed-forward and residual convolutions (peft LoRA wraps Conv2d too)
    extra = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2") if preset == "sd-tiny" else ()
    cfg = LoraTrainConfig(
        data,
        str(tmp_path / "run"),
        generator=preset,
        target_modules=("to_q", "to_k", "to_v", "to_out.0", *extra),
        rank=4,
        alpha=8,
        lr=1e-2,
        steps=40,
        batch_size=4,
        checkpoint_every=20,
        seed=0,
    )
    summary = finetune(cfg)
    losses = summary["losses"]
    assert summary["step"] == 40 and len(losses) == 40
    # overfitting 4 fixed images: the loss under the same fixed masks / noise falls clearly, and so does the
    # training loss on average (it is noisy: a random mask ratio or timestep per step)
    assert summary["fixed_loss_after"] < 0.8 * summary["fixed_loss_before"], summary
    assert _mean(losses[-10:]) < _mean(losses[:10])
    from generators import build_generator

    base = build_generator(preset)
    tuned = build_generator(preset, lora=summary["adapter"])
    a = np.asarray(base.generate([PROMPTS[0]], 1, seeds=[0])[0].image, np.int16)
    b = np.asarray(tuned.generate([PROMPTS[0]], 1, seeds=[0])[0].image, np.int16)
    assert tuned.identity.adapter_hash is not None and (a != b).mean() > 0.05


def test_resume_after_interruption_gives_the_same_adapter(four_images, tmp_path, monkeypatch):
    import finetune.lora as lora

    data = make_folder(tmp_path, four_images)
    common = dict(generator="amused-tiny", lr=5e-3, steps=6, batch_size=2, checkpoint_every=2, seed=3)
    whole = finetune(LoraTrainConfig(data, str(tmp_path / "whole"), **common))
    killed = LoraTrainConfig(data, str(tmp_path / "part"), **common)
    part = finetune(killed, stop_after=3, keep_checkpoints=1)  # the "kill": stops after step 3
    assert part["step"] == 3 and part["adapter"] is None
    batch_index = lora.batch_index

    def crash(k, *args):  # a crash inside step 5 of the resumed run (its micro-batch 4)
        if k == 4:
            raise RuntimeError("killed")
        return batch_index(k, *args)

    monkeypatch.setattr(lora, "batch_index", crash)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(killed, keep_checkpoints=1)  # resumes from step 2, checkpoints step 4, dies in step 5
    monkeypatch.setattr(lora, "batch_index", batch_index)
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step-4"]  # keep_checkpoints=1
    resumed = finetune(killed, keep_checkpoints=1)
    assert resumed["step"] == 6 and len(resumed["losses"]) == 2 and resumed["losses"] == whole["losses"][4:]
    w = load_file(whole["adapter"] + "/pytorch_lora_weights.safetensors")
    r = load_file(resumed["adapter"] + "/pytorch_lora_weights.safetensors")
    assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in w)  # bit-identical
    assert (tmp_path / "part" / "log.jsonl").read_text() == (tmp_path / "whole" / "log.jsonl").read_text()
    saved = tmp_path / "part" / "checkpoints" / "step-6"
    assert sorted(p.name for p in saved.iterdir()) == [
        "lora.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    dumped = json.loads((tmp_path / "part" / "finetune_config.json").read_text())
    assert LoraTrainConfig(**dumped) == killed  # the config dump reads back as the same config


def test_synthetic_fit_lowers_the_flaw_rate_of_selected_clean_images(tmp_path):
    shapes = ("circle", "square", "triangle", "diamond")
    images = SyntheticGenerator().generate(PROMPTS, 8)
    clean = [g for g in images if not any(f.startswith("distortion") for f in g.truth["flaws"])]
    data = make_folder(tmp_path, clean)
    summary = fit_synthetic(SyntheticFitConfig(data, str(tmp_path / "run"), prior_strength=1.0))
    fitted = SyntheticGenerator.from_pretrained(summary["adapter"])
    assert fitted.flaws.distortion["circle"] < FlawModel().distortion["circle"]
    assert fitted.flaws.distortion["square"] < FlawModel().distortion["square"]
    assert set(fitted.flaws.distortion) == set(shapes) and fitted.identity.adapter_hash
    assert summary["examples"] == len(clean) and summary["flaws"] == fitted.flaws.to_dict()
    assert json.loads((tmp_path / "run" / "fit_config.json").read_text()) == {
        "data_dir": data,
        "out_dir": str(tmp_path / "run"),
        "prior_strength": 1.0,
    }
    # the LoRA entry point hands generator="synthetic" over to the same fit (the command line's route)
    via_lora = finetune(LoraTrainConfig(data, str(tmp_path / "cli"), generator="synthetic", prior_strength=1.0))
    assert via_lora["flaws"] == summary["flaws"] and via_lora["losses"] == []
    assert not (tmp_path / "cli" / "finetune_config.json").exists()
    # the loop's finetune stage runs the fit with its own config; LoRA-only options do not apply to it
    from flows.config import LoopConfig
    from flows.stages import finetune_generator

    options = {"prior_strength": 1.0, "steps": 5}
    staged = finetune_generator(str(tmp_path / "root"), data, LoopConfig(generator="synthetic", finetune=options))
    assert staged.details["config"] == {
        "data_dir": data,
        "out_dir": str(tmp_path / "root" / "finetune"),
        "prior_strength": 1.0,
    }
    assert staged.details["flaws"] == summary["flaws"] and staged.generator == "synthetic"
    with pytest.raises(ValueError, match=r"unknown finetuning options \['bogus'\]"):
        finetune_generator(str(tmp_path / "root2"), data, LoopConfig(generator="synthetic", finetune={"bogus": 1}))
    with pytest.raises(ValueError, match="prior_strength"):
        SyntheticFitConfig(data, str(tmp_path / "x"), prior_strength=-1.0)


def test_config_errors():
    with pytest.raises(ValueError, match="rank"):
        LoraTrainConfig("d", "o", rank=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        LoraTrainConfig("d", "o", mixed_precision="fp8")
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        finetune(LoraTrainConfig("d", "o"), keep_checkpoints=0)
