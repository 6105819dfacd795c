"""An imported reference checkpoint sees, from a raw image file and a caption, what the reference fed it.

The reference pipeline (youweiliang/RichHF) is written out here independently of the project's processor:
``Image.open(path).convert("RGB")``, ViT image-processor preprocessing (BILINEAR resize to the ViT size,
x / 255, mean = std = 0.5), the caption cleaned by the RichHF-18K split rule and tokenised with the T5 tokenizer
(single-head checkpoints: ``"<output> SCORE: name </output> " + caption``). Those inputs go to the same weights.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_convert import reference_state_dict
from transformers import AutoTokenizer

from rahf.convert import import_reference_checkpoint
from rahf.model import RAHFModel
from rahf.processor import RAHFProcessor
from rahf.scorer import RAHFScorer

CAPTION = 'A red cat, sleeping on "the" mat.  Photo!'


def reference_clean(caption: str) -> str:
    """The reference's caption cleaning: split on each of ``,.?!":;`` and space, drop empty pieces, join."""
    pieces = re.split("|".join(map(re.escape, ',.?!":; ')), caption)
    return " ".join(p for p in pieces if p)


def reference_pixels(path, size: int) -> torch.Tensor:
    """ViT image-processor preprocessing, written with PIL and numpy: (1, 3, size, size) float32."""
    rgb = Image.open(path).convert("RGB").resize((size, size), resample=Image.Resampling.BILINEAR)
    x = np.asarray(rgb, dtype=np.float32) * np.float32(1 / 255)
    x = (x - 0.5) / 0.5
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "raw.png"
    Image.fromarray(rng.integers(0, 256, (71, 97, 3), dtype=np.uint8)).save(path)  # 97×71: resized to 64²
    return path


def _import(tmp_path, multi_heads: bool, seed: int = 3):
    ckpt = tmp_path / "model.pt"
    state = reference_state_dict(multi_heads=multi_heads, seed=seed)
    # The reference's random tensors are N(0, 1); shrink them so the sigmoids are not saturated and the
    # comparison below can see a wrong input.
    torch.save({k: v * 0.2 for k, v in state.items()}, ckpt)
    return import_reference_checkpoint(ckpt, tmp_path / "imported", preset="rahf-tiny")


def test_import_records_the_reference_preprocessing(tmp_path):
    folder = _import(tmp_path, multi_heads=True)
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["resample"] == "bilinear"
    assert (config["image_mean"], config["image_std"]) == (0.5, 0.5)
    assert config["max_text_tokens"] == 512  # the reference truncates only at t5-base's 512 tokens
    processor = RAHFProcessor.from_pretrained(folder)
    assert processor.resample == "bilinear" and processor.max_text_tokens == 512


def test_reference_preprocessing_written_here_matches_the_vit_image_processor(image_file):
    """Guards the hand-written reference preprocessing against transformers' own ViT processor (PIL backend)."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    vit = ViTImageProcessorPil(
        size={"height": 64, "width": 64}, resample=2, rescale_factor=1 / 255, image_mean=0.5, image_std=0.5
    )
    theirs = vit(Image.open(image_file).convert("RGB"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(reference_pixels(image_file, 64), theirs, atol=1e-6, rtol=0)


def reference_outputs(model: RAHFModel, tokenizer, caption: str, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score (1,) and heatmap (1, S, S) the way the reference computes them: one unpadded caption, no mask;
    a single-head model runs once per output with ``<output> KIND: name </output>`` before the caption."""
    cfg = model.config
    tasks = [(n, "HEATMAP") for n in cfg.heatmap_names] + [(n, "SCORE") for n in cfg.score_names]
    outs = {}
    with torch.no_grad():
        if cfg.variant == "multi_head":
            ids = tokenizer([caption], return_tensors="pt", padding=True, truncation=True).input_ids
            out = model(pixels, ids, torch.ones_like(ids), keywords=False)
            return {**out.heatmaps, **out.scores}
        for name, kind in tasks:
            ids = tokenizer([f"<output> {kind}: {name} </output> {caption}"], return_tensors="pt").input_ids[:, None]
            maps, scores = ((name,), ()) if kind == "HEATMAP" else ((), (name,))
            out = model(pixels, ids, torch.ones_like(ids), heatmaps=maps, scores=scores, keywords=False)
            outs[name] = {**out.heatmaps, **out.scores}[name]
    return outs


@pytest.mark.parametrize("multi_heads", [True, False], ids=["multi_head", "single_head"])
def test_imported_model_scores_a_raw_file_like_the_reference(tmp_path, image_file, multi_heads):
    folder = _import(tmp_path, multi_heads=multi_heads)
    (ours,) = RAHFScorer.from_pretrained(folder).score(CAPTION, [image_file], keywords=False)

    model = RAHFModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    size = model.config.image_size
    clean = reference_clean(CAPTION)
    assert clean == "A red cat sleeping on the mat Photo"
    ref = reference_outputs(model, tokenizer, clean, reference_pixels(image_file, size))
    for name in model.config.score_names:
        assert ours.scores[name] == pytest.approx(float(ref[name][0]), abs=1e-5), name
    for name in model.config.heatmap_names:
        np.testing.assert_allclose(ours.heatmaps[name], ref[name][0].numpy(), atol=1e-5, rtol=0, err_msg=name)

    # The comparison tells a wrong input apart: bicubic pixels or the uncleaned caption give other scores.
    bicubic = Image.open(image_file).convert("RGB").resize((size, size), resample=Image.Resampling.BICUBIC)
    bicubic_px = (torch.from_numpy(np.asarray(bicubic, dtype=np.float32) / 255).permute(2, 0, 1)[None] - 0.5) / 0.5
    wrong = {
        "bicubic": reference_outputs(model, tokenizer, clean, bicubic_px),
        "raw caption": reference_outputs(model, tokenizer, CAPTION, reference_pixels(image_file, size)),
    }
    for label, out in wrong.items():
        gap = max(abs(ours.scores[n] - float(out[n][0])) for n in model.config.score_names)
        assert gap > 1e-4, (label, gap)


def test_nonfinite_reference_checkpoint_is_refused(tmp_path):
    state = reference_state_dict()
    state["score_predictor.overall.linear_layers.4.bias"][0] = math.nan
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt: non-finite .*score_heads\.overall\.mlp\.2\.bias"):
        import_reference_checkpoint(tmp_path / "model.pt", tmp_path / "out", preset="rahf-tiny")
    assert not (tmp_path / "out").exists()
