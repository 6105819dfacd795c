"""Presets: the real weight-loading path, exercised on backbones saved to disk and loaded back offline."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import T5ForConditionalGeneration, ViTModel

from rahf.presets import PRESETS, build_rahf, preset_config
from rahf.tokenizer import build_offline_t5_tokenizer


@pytest.fixture
def backbone_dirs(tmp_path):
    """A ViT and a T5 (with tokenizer) at rahf-tiny shapes, saved the way the hub stores them."""
    cfg = preset_config("rahf-tiny")
    torch.manual_seed(123)
    vit = ViTModel(cfg.vit_config(), add_pooling_layer=True)  # hub ViTs carry a pooler; RAHF ignores it
    t5 = T5ForConditionalGeneration(cfg.t5_config())
    vit.save_pretrained(tmp_path / "vit")
    t5.save_pretrained(tmp_path / "t5")
    build_offline_t5_tokenizer().save_pretrained(tmp_path / "t5")
    return tmp_path / "vit", tmp_path / "t5", vit, t5


def test_pretrained_backbones_load_from_local_folders(backbone_dirs):
    vit_dir, t5_dir, vit, t5 = backbone_dirs
    model, processor = build_rahf("rahf-tiny", pretrained=True, vision_source=vit_dir, text_source=t5_dir)
    assert torch.equal(model.vision.layers[1].mlp.fc2.weight, vit.layers[1].mlp.fc2.weight)
    assert torch.equal(
        model.text.decoder.block[1].layer[2].DenseReluDense.wo.weight,
        t5.decoder.block[1].layer[2].DenseReluDense.wo.weight,
    )
    random, _ = build_rahf("rahf-tiny", seed=0)
    assert not torch.equal(model.vision.layers[1].mlp.fc2.weight, random.vision.layers[1].mlp.fc2.weight)
    assert processor.tokenizer("a red_0 cat")["input_ids"] == build_offline_t5_tokenizer()("a red_0 cat")["input_ids"]


def test_backbone_of_the_wrong_size_is_refused(backbone_dirs, tmp_path):
    _vit_dir, t5_dir, _, _ = backbone_dirs
    cfg = preset_config("rahf-tiny")
    bigger = ViTModel(type(cfg.vit_config())(**{**cfg.vision, "hidden_size": 96}))
    bigger.save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match="do not fit the preset"):
        build_rahf("rahf-tiny", pretrained=True, vision_source=tmp_path / "big", text_source=t5_dir)


def test_pretrained_without_sources_is_clear():
    with pytest.raises(ValueError, match="no hub weights"):
        build_rahf("rahf-tiny", pretrained=True)
    assert PRESETS["richhf-base"].vision_id == "google/vit-large-patch16-384"
    assert PRESETS["richhf-base"].text_id == "t5-base"


def test_richhf_base_hub_ids_fail_clearly_offline():
    """With no hub here the real path fails with the library's own error, not a crash deep inside RAHF."""
    with pytest.raises(OSError):
        build_rahf("richhf-base", pretrained=True)


def test_tiny_p4_is_tiny_with_a_finer_token_grid():
    tiny, p4 = preset_config("rahf-tiny"), preset_config("rahf-tiny-p4")
    assert (tiny.grid_size, p4.grid_size) == (8, 16)
    assert p4.text == tiny.text
    assert {k: v for k, v in p4.vision.items() if k != "patch_size"} == {
        k: v for k, v in tiny.vision.items() if k != "patch_size"
    }
    model, processor = build_rahf("rahf-tiny-p4", seed=0)
    pixels = processor.preprocess_images([Image.new("RGB", (64, 64), (200, 30, 30))])
    text = processor.tokenize(["a red circle"])
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, keywords=False)
    assert out.heatmaps["implausibility"].shape == (1, 64, 64)
    assert 0.0 < float(out.heatmaps["implausibility"].mean()) < 1.0


def test_small_p4_is_tiny_p4_twice_as_wide_with_the_same_heads():
    p4, small = preset_config("rahf-tiny-p4"), preset_config("rahf-small-p4")
    assert (small.vision["hidden_size"], small.text["d_model"], small.text["d_kv"] * small.text["num_heads"]) == (
        128,
        128,
        128,
    )
    assert small.grid_size == p4.grid_size == 16
    assert (small.heatmap_up_channels, small.score_channels) == (p4.heatmap_up_channels, p4.score_channels)
    model, processor = build_rahf("rahf-small-p4", seed=0)
    assert 1.8e6 < model.num_parameters() < 1.9e6  # rahf-tiny-p4: 0.88M
    pixels = processor.preprocess_images([Image.new("RGB", (64, 64), (30, 200, 30))])
    text = processor.tokenize(["a green square"])
    with torch.no_grad():
        out = model(pixels, text.input_ids, text.attention_mask, keywords=False)
    assert out.heatmaps["misalignment"].shape == (1, 64, 64) and out.scores["overall"].shape == (1,)


def test_f4_is_tiny_p4_with_four_fusion_layers_and_the_same_everything_else():
    p4, f4 = preset_config("rahf-tiny-p4"), preset_config("rahf-tiny-p4-f4")
    assert (f4.text["num_layers"], p4.text["num_layers"]) == (4, 2)
    assert f4.text["num_decoder_layers"] == p4.text["num_decoder_layers"] == 2
    assert {**f4.text, "num_layers": 2} == p4.text and f4.vision == p4.vision
    assert (f4.heatmap_up_channels, f4.score_channels) == (p4.heatmap_up_channels, p4.score_channels)
    model, _ = build_rahf("rahf-tiny-p4-f4", seed=0)
    assert len(model.text.encoder.block) == 4 and len(model.text.decoder.block) == 2
    assert 0.93e6 < model.num_parameters() < 0.95e6  # rahf-tiny-p4: 0.88M
