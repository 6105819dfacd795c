"""LoRA finetuning on the tiny presets: the loss falls when overfitting 4 images, the saved adapter reloads and
changes outputs for a fixed seed, an interrupted run resumes to the same adapter; the synthetic world's fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.records import ImageRecord
from finetune.dataset import export_dataset
from finetune.lora import LoraTrainConfig, finetune
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


def test_resume_after_interruption_gives_the_same_adapter(four_images, tmp_path):
    data = make_folder(tmp_path, four_images)
    common = dict(generator="amused-tiny", lr=5e-3, steps=6, batch_size=2, checkpoint_every=2, seed=3)
    whole = finetune(LoraTrainConfig(data, str(tmp_path / "whole"), **common))
    part = finetune(LoraTrainConfig(data, str(tmp_path / "part"), **common), stop_after=3)
    assert part["step"] == 3 and part["adapter"] is None
    resumed = finetune(LoraTrainConfig(data, str(tmp_path / "part"), **common))
    assert resumed["step"] == 6 and len(resumed["losses"]) == 4  # the last checkpoint before the kill: step 2
    w = load_file(whole["adapter"] + "/pytorch_lora_weights.safetensors")
    r = load_file(resumed["adapter"] + "/pytorch_lora_weights.safetensors")
    assert w.keys() == r.keys() and all(torch.allclose(w[k], r[k], atol=1e-6) for k in w)


def test_synthetic_fit_lowers_the_flaw_rate_of_selected_clean_images(tmp_path):
    shapes = ("circle", "square", "triangle", "diamond")
    images = SyntheticGenerator().generate(PROMPTS, 8)
    clean = [g for g in images if not any(f.startswith("distortion") for f in g.truth["flaws"])]
    data = make_folder(tmp_path, clean)
    summary = finetune(LoraTrainConfig(data, str(tmp_path / "run"), generator="synthetic", prior_strength=1.0))
    fitted = SyntheticGenerator.from_pretrained(summary["adapter"])
    assert fitted.flaws.distortion["circle"] < FlawModel().distortion["circle"]
    assert fitted.flaws.distortion["square"] < FlawModel().distortion["square"]
    assert set(fitted.flaws.distortion) == set(shapes) and fitted.identity.adapter_hash


def test_config_errors():
    with pytest.raises(ValueError, match="rank"):
        LoraTrainConfig("d", "o", rank=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        LoraTrainConfig("d", "o", mixed_precision="fp8")
