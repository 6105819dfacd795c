"""Import the public RichHF PyTorch checkpoint (``youweiliang/RichHF``) into our RAHF, once, as safetensors.

That checkpoint is a plain ``state_dict`` ``.pt`` of a model built on ``google/vit-large-patch16-384`` and
``t5-base`` with transformers 4.x parameter names. It is read with ``torch.load(weights_only=True)`` only (no
pickled code runs), every parameter name is mapped to ours, and anything unmatched or mis-shaped stops the
import with the offending names. The result is a normal RAHF folder (``config.json``, ``model.safetensors``,
tokenizer and processor files).

Names, theirs -> ours:

* ``vit.encoder.layer.{i}.attention.attention.{query,key,value}`` -> ``vision.layers.{i}.attention.{q,k,v}_proj``;
  ``...attention.output.dense`` -> ``...attention.o_proj``; ``...intermediate.dense`` / ``...output.dense`` ->
  ``...mlp.fc1`` / ``...mlp.fc2``; embeddings, layer norms unchanged; ``vit.pooler.*`` dropped (RAHF has no
  pooler: the heads read the token grid).
* ``t5.*`` -> ``text.*``; the tied embedding aliases must equal ``t5.shared.weight``.
* ``visual_token_projection`` -> ``visual_projection``.
* ``heatmap_predictor[.{name}].conv_layers.{0,3}`` -> ``heatmap_heads.{name}.stem.{0,1}.conv`` (norm scales at
  ``.2``, ``.5``); ``deconv_layers.{j}.{0,1}`` -> ``up.{j}.{up,up_norm}``; ``conv_layers2.{j}.{0,1,3,4}`` ->
  ``up.{j}.{conv1,norm1,conv2,norm2}``; ``last_conv{1,2}`` -> ``out_conv{1,2}``.
* ``score_predictor[.{name}].conv_layers.{3k,3k+1}`` -> ``score_heads.{name}.blocks.{k}.{conv,norm}``;
  ``linear_layers.{0,2,4}`` -> ``mlp.{0,1,2}``.
* Norm scales are stored as (C, 1, 1) there and (C,) here.

Single-head reference checkpoints map to our ``augmented_prompt`` variant with the reference's task strings.

The imported folder also records how the reference fed its model, so scoring sees what it was trained on: the ViT
image processor's resize (PIL bilinear to the ViT size; rescale 1/255; mean = std = 0.5) and the caption cleaned
by the RichHF-18K split rule (our processor's rule), tokenised with truncation only at t5-base's 512 tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rahf.model import RAHFModel, _untied_state_dict
from rahf.presets import PRESETS, preset_config
from rahf.processor import RAHFProcessor
from rahf.tokenizer import build_offline_t5_tokenizer

DROPPED_PREFIXES = ("vit.pooler.",)
TIED_ALIASES = ("t5.encoder.embed_tokens.weight", "t5.decoder.embed_tokens.weight", "t5.lm_head.weight")

_VIT_LAYER = [
    (r"attention\.attention\.query\.", "attention.q_proj."),
    (r"attention\.attention\.key\.", "attention.k_proj."),
    (r"attention\.attention\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"output\.dense\.", "mlp.fc2."),
    (r"(layernorm_before|layernorm_after)\.", r"\1."),
]
_HEATMAP = [
    (r"conv_layers\.0\.", "stem.0.conv."),
    (r"conv_layers\.2\.scale", "stem.0.norm.scale"),
    (r"conv_layers\.3\.", "stem.1.conv."),
    (r"conv_layers\.5\.scale", "stem.1.norm.scale"),
    (r"deconv_layers\.(\d+)\.0\.", r"up.\1.up."),
    (r"deconv_layers\.(\d+)\.1\.scale", r"up.\1.up_norm.scale"),
    (r"conv_layers2\.(\d+)\.0\.", r"up.\1.conv1."),
    (r"conv_layers2\.(\d+)\.1\.scale", r"up.\1.norm1.scale"),
    (r"conv_layers2\.(\d+)\.3\.", r"up.\1.conv2."),
    (r"conv_layers2\.(\d+)\.4\.scale", r"up.\1.norm2.scale"),
    (r"last_conv1\.", "out_conv1."),
    (r"last_conv2\.", "out_conv2."),
]
# The reference's single-head variant prefixes "<output> {task} </output>" to the caption.
REFERENCE_TASK_PREFIXES = {
    "implausibility": "<output> HEATMAP: implausibility </output>",
    "misalignment": "<output> HEATMAP: misalignment </output>",
    "plausibility": "<output> SCORE: plausibility </output>",
    "alignment": "<output> SCORE: alignment </output>",
    "aesthetics": "<output> SCORE: aesthetics </output>",
    "overall": "<output> SCORE: overall </output>",
    "keywords": "",
}
REFERENCE_RESAMPLE = "bilinear"  # the ViT image processor's resize filter (google/vit-large-patch16-384)
REFERENCE_MAX_TEXT_TOKENS = 512  # the reference tokenises with truncation at the T5 tokenizer's 512 tokens


def _sub_all(rules: list[tuple[str, str]], rest: str) -> str | None:
    for pattern, repl in rules:
        m = re.fullmatch(pattern + r"(.*)", rest)
        if m:
            return m.expand(repl) + m.group(m.lastindex)
    return None


def _score_rest(rest: str) -> str | None:
    m = re.fullmatch(r"conv_layers\.(\d+)\.(.*)", rest)
    if m:
        idx, tail = int(m.group(1)), m.group(2)
        if idx % 3 == 0:
            return f"blocks.{idx // 3}.conv.{tail}"
        if idx % 3 == 1 and tail == "scale":
            return f"blocks.{idx // 3}.norm.scale"
        return None
    m = re.fullmatch(r"linear_layers\.(\d+)\.(.*)", rest)
    if m and int(m.group(1)) % 2 == 0:
        return f"mlp.{int(m.group(1)) // 2}.{m.group(2)}"
    return None


def reference_key_to_ours(key: str, heatmap_names: tuple[str, ...], score_names: tuple[str, ...]) -> str | None:
    """Our parameter name for a reference parameter name, or None when it has no counterpart."""
    if key.startswith("vit."):
        rest = key[4:]
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.*)", rest)
        if m:
            mapped = _sub_all(_VIT_LAYER, m.group(2))
            return None if mapped is None else f"vision.layers.{m.group(1)}.{mapped}"
        if rest.startswith(("embeddings.", "layernorm.")):
            return f"vision.{rest}"
        return None
    if key.startswith("t5."):
        return f"text.{key[3:]}"
    if key.startswith("visual_token_projection."):
        return "visual_projection." + key.split(".", 1)[1]
    for theirs, ours, names, fn in (
        ("heatmap_predictor", "heatmap_heads", heatmap_names, None),
        ("score_predictor", "score_heads", score_names, _score_rest),
    ):
        if not key.startswith(theirs + "."):
            continue
        rest = key[len(theirs) + 1 :]
        head, sep, tail = rest.partition(".")
        name, rest = (head, tail) if head in names and sep else ("shared", rest)
        mapped = fn(rest) if fn else _sub_all(_HEATMAP, rest)
        return None if mapped is None else f"{ours}.{name}.{mapped}"
    return None


def convert_reference_state_dict(state: dict[str, torch.Tensor], model: RAHFModel) -> dict[str, torch.Tensor]:
    """Rename and reshape a reference state dict to ``model``'s names; raise on anything unmatched."""
    own = _untied_state_dict(model)
    cfg = model.config
    shared = state.get("t5.shared.weight")
    out: dict[str, torch.Tensor] = {}
    unmatched, misshaped = [], []
    for key, value in state.items():
        if key.startswith(DROPPED_PREFIXES):
            continue
        if key in TIED_ALIASES and shared is not None and f"text.{key[3:]}" not in own:
            if value.shape != shared.shape or not torch.equal(value, shared):
                raise ValueError(f"{key} differs from t5.shared.weight, but our T5 ties them")
            continue
        ours = reference_key_to_ours(key, cfg.heatmap_names, cfg.score_names)
        if ours is None or ours not in own:
            unmatched.append(key if ours is None else f"{key} -> {ours}")
            continue
        if value.dim() == 3 and own[ours].dim() == 1 and value.shape[1:] == (1, 1):
            value = value.reshape(-1)
        if value.shape != own[ours].shape:
            misshaped.append(f"{key}: {tuple(value.shape)} vs ours {tuple(own[ours].shape)}")
            continue
        out[ours] = value
    missing = sorted(set(own) - set(out))
    if unmatched or misshaped or missing:
        raise ValueError(
            f"reference checkpoint does not fit {cfg.variant} RAHF: "
            f"unmatched {unmatched[:10]}, mis-shaped {misshaped[:10]}, not provided {missing[:10]}"
        )
    return out


def load_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a reference ``.pt`` state dict with ``weights_only=True`` (tensors only, no code)."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DDP wrappers add "module."


def import_reference_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    preset: str = "richhf-base",
    tokenizer_source: str | Path | None = None,
) -> Path:
    """Convert a reference ``.pt`` into a RAHF folder at ``out_dir`` (safetensors) and return its path.

    Args:
        checkpoint: the reference ``model.pt`` / ``model_best.pt``.
        preset: the architecture it was trained with (``richhf-base`` for the published model).
        tokenizer_source: the T5 tokenizer (hub id or folder); defaults to the preset's T5 id. The offline
            tokenizer is used only for presets without one (tests).
    """
    state = load_reference_checkpoint(checkpoint)
    multi = any(re.match(r"heatmap_predictor\.[a-z]+\.conv_layers", k) for k in state)
    variant = "multi_head" if multi else "augmented_prompt"
    config = preset_config(preset, variant, {"max_text_tokens": REFERENCE_MAX_TEXT_TOKENS})
    if variant == "augmented_prompt":
        config.task_prefixes = dict(REFERENCE_TASK_PREFIXES)
    model = RAHFModel(config)
    model.load_state_dict_strict(convert_reference_state_dict(state, model), source=str(checkpoint))
    tokenizer_source = tokenizer_source or PRESETS[preset].text_id
    if tokenizer_source is None:
        tokenizer = build_offline_t5_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    processor = RAHFProcessor(
        tokenizer,
        image_size=config.image_size,
        max_text_tokens=config.max_text_tokens,
        misaligned_suffix=config.misaligned_suffix,
        resample=REFERENCE_RESAMPLE,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
