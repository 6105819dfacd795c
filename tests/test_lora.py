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
    logged = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").open()]
    assert logged and all(row["grad_norm"] > 0 for row in logged)  # the norm of every logged step
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
    with pytest.raises(ValueError, match="max_grad_norm"):
        LoraTrainConfig("d", "o", max_grad_norm=-0.5)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        finetune(LoraTrainConfig("d", "o"), keep_checkpoints=0)


# -- heatmap weighting -------------------------------------------------------------------------------------------


def make_heat_folder(tmp_path, images, heats) -> str:
    """An exported folder with each image's implausibility heatmap (``heatmaps/<id>.png``)."""
    from PIL import Image

    records = []
    for g, heat in zip(images, heats):
        src = tmp_path / "src"
        src.mkdir(parents=True, exist_ok=True)
        (src / f"{g.id}.png").write_bytes(encode_png(g.image))
        Image.fromarray(np.rint(heat * 255).astype(np.uint8)).save(src / f"{g.id}-heat.png")
        rec = ImageRecord.from_generated(g, str(src / f"{g.id}.png"))
        rec.heatmap_uris = {"implausibility": str(src / f"{g.id}-heat.png")}
        records.append(rec)
    out = tmp_path / "data"
    result = export_dataset(records, str(out), heatmap="implausibility")
    assert result.failed == []
    return str(out)


def test_export_writes_heatmaps_with_provenance_and_they_read_back(four_images, tmp_path):
    from finetune.dataset import read_metadata
    from finetune.lora import heat_weights, load_heatmaps

    heats = [np.zeros((64, 64), np.float32) for _ in four_images]
    heats[0][:32] = 1.0  # the top half of the first image is implausible
    data = make_heat_folder(tmp_path, four_images, heats)
    rows = read_metadata(data)
    assert all(r["heatmap"] == f"heatmaps/{r['id']}.png" for r in rows)
    assert all(r["heatmap_source"]["name"] == "implausibility" for r in rows)
    maps = {r["id"]: m for r, m in zip(rows, load_heatmaps(data))}
    assert maps[four_images[0].id][:32].min() == 1.0 and maps[four_images[0].id][32:].max() == 0.0
    w = heat_weights([maps[four_images[0].id]], (4, 4))
    assert torch.equal(w[0], torch.tensor([[0.0] * 4] * 2 + [[1.0] * 4] * 2))
    # a record without the heatmap fails the export; a folder without the column cannot be weighted
    bare = ImageRecord.from_generated(four_images[1], "unused")
    failed = export_dataset([bare], str(tmp_path / "bare"), heatmap="implausibility").failed
    assert failed[0][1].startswith("record has no")
    with pytest.raises(ValueError, match="no heatmap"):
        load_heatmaps(make_folder(tmp_path / "plain", four_images))


@pytest.mark.slow  # builds both tiny generators: about 25 s
@pytest.mark.parametrize("preset", ["amused-tiny", "sd-tiny"])
def test_heatmap_weights_of_one_keep_the_loss_and_zero_weight_removes_a_region(preset, four_images):
    from finetune.lora import _AmusedTask, _StableDiffusionTask, heat_weights
    from generators import build_generator

    torch.manual_seed(0)
    gen = build_generator(preset)
    task_cls = _AmusedTask if preset == "amused-tiny" else _StableDiffusionTask
    images, prompts = [g.image for g in four_images], [g.prompt for g in four_images]
    plain = task_cls(gen, images, prompts, torch.device("cpu"))
    index = torch.arange(4)

    def loss_and_grad(task):
        seen = {}

        def hook(module, args, output):
            out = output if torch.is_tensor(output) else output.sample
            out.retain_grad()
            seen["out"] = out

        handle = task.denoiser.register_forward_hook(hook)
        loss = task.loss(index, torch.Generator().manual_seed(5))
        handle.remove()
        loss.backward()
        task.denoiser.zero_grad()
        return loss.detach(), seen["out"].grad

    ref, _ = loss_and_grad(plain)
    ones = task_cls(gen, images, prompts, torch.device("cpu"), [np.zeros((64, 64), np.float32)] * 4)
    assert torch.allclose(loss_and_grad(ones)[0], ref, rtol=1e-6, atol=0)
    # heat 1 on the top half of every image: weight 0 on the top half of the grid
    heat = np.zeros((64, 64), np.float32)
    heat[:32] = 1.0
    half = task_cls(gen, images, prompts, torch.device("cpu"), [heat] * 4)
    grid = tuple(half.weights.shape[-2:])
    assert torch.equal(half.weights, heat_weights([heat] * 4, grid))
    loss, grad = loss_and_grad(half)
    top, bottom = grad[..., : grid[0] // 2, :], grad[..., grid[0] // 2 :, :]
    assert float(top.abs().max()) == 0.0 and float(bottom.abs().max()) > 0.0  # no gradient from the zeroed region
    assert not torch.allclose(loss, ref)


def test_finetune_with_heatmap_weighting_trains_and_needs_the_heatmaps(four_images, tmp_path):
    heats = [np.full((64, 64), 0.5, np.float32) for _ in four_images]
    data = make_heat_folder(tmp_path, four_images, heats)
    common = dict(generator="amused-tiny", steps=2, batch_size=2, checkpoint_every=2, heatmap_weighting=True)
    summary = finetune(LoraTrainConfig(data, str(tmp_path / "run"), **common), progress=False)
    assert summary["step"] == 2 and all(np.isfinite(summary["losses"])) and summary["adapter"]
    assert json.loads((tmp_path / "run" / "finetune_config.json").read_text())["heatmap_weighting"] is True
    plain = make_folder(tmp_path / "plain", four_images)
    with pytest.raises(ValueError, match="no heatmap"):
        finetune(LoraTrainConfig(plain, str(tmp_path / "run2"), **common), progress=False)
