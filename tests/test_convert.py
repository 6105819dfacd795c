"""Importing the public RichHF PyTorch checkpoint: names and shapes written here from the reference's layout
(transformers 4.x ViT names, its head modules), at rahf-tiny sizes, independently of our converter's tables."""

from __future__ import annotations

import itertools

import pytest
import torch

from rahf.convert import convert_reference_state_dict, import_reference_checkpoint
from rahf.model import RAHFModel
from rahf.presets import preset_config


class Payload:
    """An arbitrary Python object inside a checkpoint (what weights_only refuses to unpickle)."""


def reference_state_dict(multi_heads: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict shaped like the reference RAHF at rahf-tiny sizes, every tensor distinct random values."""
    cfg = preset_config("rahf-tiny")
    v, t = cfg.vision, cfg.text
    hv, p, g = v["hidden_size"], v["patch_size"], cfg.grid_size
    d, ff, vocab, nh = t["d_model"], t["d_ff"], t["vocab_size"], t["num_heads"]
    inner = t["d_kv"] * nh
    shapes: dict[str, tuple[int, ...]] = {
        "vit.embeddings.cls_token": (1, 1, hv),
        "vit.embeddings.position_embeddings": (1, 1 + g * g, hv),
        "vit.embeddings.patch_embeddings.projection.weight": (hv, 3, p, p),
        "vit.embeddings.patch_embeddings.projection.bias": (hv,),
        "vit.layernorm.weight": (hv,),
        "vit.layernorm.bias": (hv,),
        "vit.pooler.dense.weight": (hv, hv),
        "vit.pooler.dense.bias": (hv,),
        "visual_token_projection.weight": (d, hv),
        "visual_token_projection.bias": (d,),
        "t5.shared.weight": (vocab, d),
        "t5.encoder.final_layer_norm.weight": (d,),
        "t5.decoder.final_layer_norm.weight": (d,),
    }
    for i in range(v["num_hidden_layers"]):
        pre = f"vit.encoder.layer.{i}."
        for name in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        ):
            shapes[pre + name + ".weight"], shapes[pre + name + ".bias"] = (hv, hv), (hv,)
        shapes[pre + "intermediate.dense.weight"], shapes[pre + "intermediate.dense.bias"] = (
            (v["intermediate_size"], hv),
            (v["intermediate_size"],),
        )
        shapes[pre + "output.dense.weight"], shapes[pre + "output.dense.bias"] = (hv, v["intermediate_size"]), (hv,)
        for ln in ("layernorm_before", "layernorm_after"):
            shapes[f"{pre}{ln}.weight"], shapes[f"{pre}{ln}.bias"] = (hv,), (hv,)
    for stack, n_layers in (("encoder", t["num_layers"]), ("decoder", t["num_decoder_layers"])):
        for i in range(n_layers):
            pre = f"t5.{stack}.block.{i}.layer."
            for w in "qkvo":
                shapes[f"{pre}0.SelfAttention.{w}.weight"] = (inner, d) if w != "o" else (d, inner)
            if i == 0:
                shapes[f"{pre}0.SelfAttention.relative_attention_bias.weight"] = (
                    t["relative_attention_num_buckets"],
                    nh,
                )
            shapes[f"{pre}0.layer_norm.weight"] = (d,)
            ffn = 1
            if stack == "decoder":
                for w in "qkvo":
                    shapes[f"{pre}1.EncDecAttention.{w}.weight"] = (inner, d) if w != "o" else (d, inner)
                shapes[f"{pre}1.layer_norm.weight"] = (d,)
                ffn = 2
            shapes[f"{pre}{ffn}.DenseReluDense.wi.weight"] = (ff, d)
            shapes[f"{pre}{ffn}.DenseReluDense.wo.weight"] = (d, ff)
            shapes[f"{pre}{ffn}.layer_norm.weight"] = (d,)

    def heatmap(prefix: str) -> None:
        c0, c1 = cfg.heatmap_stem_channels
        shapes.update(
            {
                f"{prefix}conv_layers.0.weight": (c0, d, 3, 3),
                f"{prefix}conv_layers.0.bias": (c0,),
                f"{prefix}conv_layers.2.scale": (c0, 1, 1),
                f"{prefix}conv_layers.3.weight": (c1, c0, 3, 3),
                f"{prefix}conv_layers.3.bias": (c1,),
                f"{prefix}conv_layers.5.scale": (c1, 1, 1),
            }
        )
        c = c1
        for j, co in enumerate(cfg.heatmap_up_channels):
            shapes.update(
                {
                    f"{prefix}deconv_layers.{j}.0.weight": (c, co, 3, 3),
                    f"{prefix}deconv_layers.{j}.0.bias": (co,),
                    f"{prefix}deconv_layers.{j}.1.scale": (co, 1, 1),
                }
            )
            for k in (0, 3):
                shapes[f"{prefix}conv_layers2.{j}.{k}.weight"] = (co, co, 3, 3)
                shapes[f"{prefix}conv_layers2.{j}.{k}.bias"] = (co,)
                shapes[f"{prefix}conv_layers2.{j}.{k + 1}.scale"] = (co, 1, 1)
            c = co
        o = cfg.heatmap_out_channels
        shapes.update(
            {
                f"{prefix}last_conv1.weight": (o, c, 3, 3),
                f"{prefix}last_conv1.bias": (o,),
                f"{prefix}last_conv2.weight": (1, o, 3, 3),
                f"{prefix}last_conv2.bias": (1,),
            }
        )

    def score(prefix: str) -> None:
        c = d
        for k, co in enumerate(cfg.score_channels):
            shapes.update(
                {
                    f"{prefix}conv_layers.{3 * k}.weight": (co, c, 3, 3),
                    f"{prefix}conv_layers.{3 * k}.bias": (co,),
                    f"{prefix}conv_layers.{3 * k + 1}.scale": (co, 1, 1),
                }
            )
            c = co
        dims = [c * g * g, *cfg.score_mlp_widths, 1]
        for k, (a, b) in enumerate(itertools.pairwise(dims)):
            shapes[f"{prefix}linear_layers.{2 * k}.weight"], shapes[f"{prefix}linear_layers.{2 * k}.bias"] = (
                (b, a),
                (b,),
            )

    if multi_heads:
        for n in cfg.heatmap_names:
            heatmap(f"heatmap_predictor.{n}.")
        for n in cfg.score_names:
            score(f"score_predictor.{n}.")
    else:
        heatmap("heatmap_predictor.")
        score("score_predictor.")
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    for alias in ("t5.encoder.embed_tokens.weight", "t5.decoder.embed_tokens.weight", "t5.lm_head.weight"):
        state[alias] = state["t5.shared.weight"].clone()
    return state


def test_every_reference_tensor_lands_in_its_place():
    state = reference_state_dict()
    model = RAHFModel(preset_config("rahf-tiny"))
    model.load_state_dict_strict(convert_reference_state_dict(state, model))
    ours = dict(model.named_parameters())
    checks = {
        "vit.encoder.layer.1.attention.attention.query.weight": "vision.layers.1.attention.q_proj.weight",
        "vit.encoder.layer.0.attention.output.dense.bias": "vision.layers.0.attention.o_proj.bias",
        "vit.encoder.layer.1.intermediate.dense.weight": "vision.layers.1.mlp.fc1.weight",
        "vit.encoder.layer.1.output.dense.weight": "vision.layers.1.mlp.fc2.weight",
        "t5.decoder.block.1.layer.1.EncDecAttention.k.weight": "text.decoder.block.1.layer.1.EncDecAttention.k.weight",
        "heatmap_predictor.misalignment.deconv_layers.2.0.weight": "heatmap_heads.misalignment.up.2.up.weight",
        "heatmap_predictor.implausibility.conv_layers2.1.3.bias": "heatmap_heads.implausibility.up.1.conv2.bias",
        "score_predictor.aesthetics.conv_layers.15.weight": "score_heads.aesthetics.blocks.5.conv.weight",
        "score_predictor.overall.linear_layers.4.weight": "score_heads.overall.mlp.2.weight",
        "visual_token_projection.weight": "visual_projection.weight",
    }
    for theirs, mine in checks.items():
        assert torch.equal(ours[mine], state[theirs]), theirs
    # Norm scales: (C, 1, 1) there, (C,) here.
    assert torch.equal(
        ours["heatmap_heads.implausibility.stem.1.norm.scale"],
        state["heatmap_predictor.implausibility.conv_layers.5.scale"].flatten(),
    )
    # Every parameter of ours came from some reference tensor (all reference values are distinct).
    sources = {tuple(v.flatten()[:4].tolist()) for v in state.values()}
    for name, param in ours.items():
        key = tuple(param.detach().flatten()[:4].tolist())
        assert key in sources, name


def test_converted_model_matches_a_hand_computed_score_head():
    """Run the converted overall-score head against the reference's op order written out here."""
    state = reference_state_dict(seed=1)
    model = RAHFModel(preset_config("rahf-tiny")).eval()
    model.load_state_dict_strict(convert_reference_state_dict(state, model))
    grid = torch.randn(2, model.config.text["d_model"], model.config.grid_size, model.config.grid_size)
    x = grid
    pre = "score_predictor.overall."
    for k in range(6):
        x = torch.nn.functional.conv2d(
            x, state[f"{pre}conv_layers.{3 * k}.weight"], state[f"{pre}conv_layers.{3 * k}.bias"], padding=1
        )
        x = x * (x.square().mean(1, keepdim=True) + 1e-8).rsqrt() * state[f"{pre}conv_layers.{3 * k + 1}.scale"]
        x = torch.relu(x)
    x = x.flatten(1)
    for k in range(3):
        x = torch.nn.functional.linear(
            x, state[f"{pre}linear_layers.{2 * k}.weight"], state[f"{pre}linear_layers.{2 * k}.bias"]
        )
        x = torch.relu(x) if k < 2 else torch.sigmoid(x)
    with torch.no_grad():
        torch.testing.assert_close(model.score_heads["overall"](grid), x.squeeze(1), atol=1e-5, rtol=1e-5)


def test_import_pt_to_safetensors_folder(tmp_path):
    state = reference_state_dict()
    ckpt = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, ckpt)  # DDP-style prefix is accepted
    out = import_reference_checkpoint(ckpt, tmp_path / "rahf", preset="rahf-tiny")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = RAHFModel.from_pretrained(out)
    assert loaded.config.variant == "multi_head"
    assert torch.equal(
        loaded.vision.layers[0].attention.k_proj.weight, state["vit.encoder.layer.0.attention.attention.key.weight"]
    )


def test_single_head_reference_maps_to_augmented_prompt(tmp_path):
    ckpt = tmp_path / "single.pt"
    state = reference_state_dict(multi_heads=False)
    torch.save(state, ckpt)
    loaded = RAHFModel.from_pretrained(import_reference_checkpoint(ckpt, tmp_path / "out", preset="rahf-tiny"))
    assert loaded.config.variant == "augmented_prompt"
    assert loaded.config.task_prefixes["plausibility"] == "<output> SCORE: plausibility </output>"
    assert torch.equal(loaded.heatmap_heads["shared"].out_conv2.weight, state["heatmap_predictor.last_conv2.weight"])


@pytest.mark.parametrize("damage", ["extra", "missing", "shape", "untied"])
def test_mismatches_fail_loudly(damage):
    state = reference_state_dict()
    if damage == "extra":
        state["heatmap_predictor.implausibility.conv_layers.9.weight"] = torch.zeros(1)
        match = "unmatched.*conv_layers.9"
    elif damage == "missing":
        del state["score_predictor.alignment.linear_layers.2.bias"]
        match = "not provided.*score_heads.alignment.mlp.1.bias"
    elif damage == "shape":
        state["visual_token_projection.weight"] = torch.zeros(3, 3)
        match = "mis-shaped.*visual_token_projection.weight"
    else:
        state["t5.lm_head.weight"] = torch.zeros_like(state["t5.lm_head.weight"])
        match = "lm_head.weight differs"
    with pytest.raises(ValueError, match=match):
        convert_reference_state_dict(state, RAHFModel(preset_config("rahf-tiny")))


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint carrying arbitrary objects is not loaded."""
    ckpt = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, ckpt)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported|global"):
        import_reference_checkpoint(ckpt, tmp_path / "out", preset="rahf-tiny")
