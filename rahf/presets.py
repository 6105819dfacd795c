"""Named RAHF presets, all built from the same classes.

* ``rahf-tiny``: a small ViT and T5 at random init with the offline tokenizer; builds anywhere in milliseconds.
* ``rahf-tiny-p4``: ``rahf-tiny`` with 4-pixel patches (a 16×16 token grid at 64 px, two upsampling stages in
  the heatmap heads): the model of the synthetic benchmark's bar (docs/results.md), about 2× slower to train.
* ``rahf-tiny-p4-f4``: ``rahf-tiny-p4`` with four fusion (T5 encoder) layers instead of two, the same width,
  decoder and heads: more steps of image-word exchange for comparing what a word asks with what the image shows.
* ``rahf-small-p4``: ``rahf-tiny-p4`` twice as wide (128 channels in the ViT and the T5, 32 per attention head),
  the same heads; about 1.5× the time of a training step of ``rahf-tiny-p4`` on a CPU.
* ``richhf-base``: ``google/vit-large-patch16-384`` + ``t5-base`` (642.6M parameters), the paper's backbones as
  in the public PyTorch reimplementation. ``pretrained=True`` loads both backbones (hub id or local folder) and
  the T5 tokenizer; ``pretrained=False`` builds the same shapes at random init, offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration, ViTModel

from rahf.model import RAHFConfig, RAHFModel
from rahf.processor import RAHFProcessor
from rahf.tokenizer import build_offline_t5_tokenizer


@dataclass(frozen=True)
class Preset:
    """A named architecture and where its backbone weights live."""

    name: str
    vision: dict[str, Any]
    text: dict[str, Any]
    heads: dict[str, Any] = field(default_factory=dict)  # RAHFConfig head fields
    vision_id: str | None = None  # hub id of pretrained ViT weights
    text_id: str | None = None  # hub id of pretrained T5 weights and tokenizer


_T5_IDS = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}

PRESETS: dict[str, Preset] = {
    "rahf-tiny": Preset(
        name="rahf-tiny",
        vision={
            "image_size": 64,
            "patch_size": 8,
            "num_channels": 3,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "layer_norm_eps": 1e-12,
            "qkv_bias": True,
        },
        text={
            "vocab_size": 672,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "dropout_rate": 0.0,
            "layer_norm_epsilon": 1e-6,
            "feed_forward_proj": "relu",
            "tie_word_embeddings": True,
            **_T5_IDS,
        },
        heads={
            "heatmap_stem_channels": (64, 32),
            "heatmap_up_channels": (32, 16, 16),
            "heatmap_out_channels": 16,
            "score_channels": (64, 32, 16, 8, 8, 4),
            "score_mlp_widths": (32, 16),
            "max_text_tokens": 64,
            "max_keyword_tokens": 96,
        },
    ),
    "richhf-base": Preset(
        name="richhf-base",
        vision={
            "image_size": 384,
            "patch_size": 16,
            "num_channels": 3,
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "layer_norm_eps": 1e-12,
            "qkv_bias": True,
        },
        text={
            "vocab_size": 32128,
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 3072,
            "num_layers": 12,
            "num_decoder_layers": 12,
            "num_heads": 12,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "dropout_rate": 0.1,
            "layer_norm_epsilon": 1e-6,
            "feed_forward_proj": "relu",
            "tie_word_embeddings": True,
            **_T5_IDS,
        },
        heads={},  # RAHFConfig defaults are the published head widths
        vision_id="google/vit-large-patch16-384",
        text_id="t5-base",
    ),
}

PRESETS["rahf-tiny-p4"] = Preset(
    name="rahf-tiny-p4",
    vision={**PRESETS["rahf-tiny"].vision, "patch_size": 4},
    text=dict(PRESETS["rahf-tiny"].text),
    heads={**PRESETS["rahf-tiny"].heads, "heatmap_up_channels": (32, 16)},
)

PRESETS["rahf-tiny-p4-f4"] = Preset(
    name="rahf-tiny-p4-f4",
    vision=dict(PRESETS["rahf-tiny-p4"].vision),
    text={**PRESETS["rahf-tiny-p4"].text, "num_layers": 4},
    heads=dict(PRESETS["rahf-tiny-p4"].heads),
)

PRESETS["rahf-small-p4"] = Preset(
    name="rahf-small-p4",
    vision={**PRESETS["rahf-tiny-p4"].vision, "hidden_size": 128, "intermediate_size": 256},
    text={**PRESETS["rahf-tiny-p4"].text, "d_model": 128, "d_kv": 32, "d_ff": 256},
    heads=dict(PRESETS["rahf-tiny-p4"].heads),
)


def preset_config(name: str, variant: str = "multi_head", overrides: dict[str, Any] | None = None) -> RAHFConfig:
    """The RAHFConfig of a preset, with ``overrides`` of RAHFConfig fields (loss weights, say) applied."""
    if name not in PRESETS:
        raise KeyError(f"unknown RAHF preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    fields = {"vision": dict(p.vision), "text": dict(p.text), "variant": variant, **p.heads, **(overrides or {})}
    return RAHFConfig.from_dict(fields)


def build_rahf(
    name: str,
    *,
    variant: str = "multi_head",
    pretrained: bool = False,
    seed: int = 0,
    vision_source: str | Path | None = None,
    text_source: str | Path | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> tuple[RAHFModel, RAHFProcessor]:
    """Build a preset: random init from ``seed``; with ``pretrained`` the backbones load real weights.

    Args:
        name: preset name (``rahf-tiny``, ``richhf-base``).
        variant: ``multi_head`` or ``augmented_prompt``.
        pretrained: load ViT and T5 weights (and the T5 tokenizer) from ``vision_source`` / ``text_source``,
            which default to the preset's hub ids; the heads stay at random init.
        seed: seeds the random init (same seed -> identical weights).
        config_overrides: RAHFConfig fields to set before the model is built (e.g. ``itm_loss_weight``).
    """
    config = preset_config(name, variant, config_overrides)
    preset = PRESETS[name]
    vision_source = vision_source or preset.vision_id
    text_source = text_source or preset.text_id
    if pretrained and (vision_source is None or text_source is None):
        raise ValueError(f"preset {name!r} has no hub weights; pass vision_source and text_source")
    tokenizer = AutoTokenizer.from_pretrained(str(text_source)) if pretrained else build_offline_t5_tokenizer()
    _check_tokenizer(tokenizer, config)
    torch.manual_seed(seed)
    model = RAHFModel(config)
    if pretrained:
        _load_backbones(model, str(vision_source), str(text_source))
    processor = RAHFProcessor(
        tokenizer,
        image_size=config.image_size,
        max_text_tokens=config.max_text_tokens,
        misaligned_suffix=config.misaligned_suffix,
    )
    return model.eval(), processor


def _check_tokenizer(tokenizer: Any, config: RAHFConfig) -> None:
    if len(tokenizer) > config.text["vocab_size"]:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model vocabulary is {config.text['vocab_size']}"
        )
    if tokenizer.pad_token_id != config.text["pad_token_id"] or tokenizer.eos_token_id != config.text["eos_token_id"]:
        raise ValueError("tokenizer pad/eos ids differ from the T5 config's")


def _load_backbones(model: RAHFModel, vision_source: str, text_source: str) -> None:
    """Copy pretrained ViT and T5 weights into the model; any mismatch of names or shapes raises."""
    vit = ViTModel.from_pretrained(vision_source, add_pooling_layer=False)
    t5 = T5ForConditionalGeneration.from_pretrained(text_source)
    for label, target, source in (("ViT", model.vision, vit), ("T5", model.text, t5)):
        want = target.state_dict()
        got = source.state_dict()
        bad = [k for k in want if k not in got or got[k].shape != want[k].shape]
        if bad or set(got) - set(want):
            raise ValueError(
                f"{label} weights from {vision_source if label == 'ViT' else text_source} do not fit "
                f"the preset: mismatched {bad[:5]}, extra {sorted(set(got) - set(want))[:5]}"
            )
        target.load_state_dict(got, strict=True)
