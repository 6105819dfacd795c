"""Loading a saved RAHF folder safely: weights must be finite, config files must be well-formed and well-typed.

Every refusal names the file and the field (or tensor) at fault, and happens at load time, not at scoring time.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rahf.model import RAHFConfig, RAHFModel, _untied_state_dict
from rahf.presets import build_rahf, preset_config
from rahf.processor import PROCESSOR_NAME, RAHFProcessor
from rahf.scorer import RAHFScorer
from rahf.tokenizer import build_offline_t5_tokenizer


@pytest.fixture
def saved(tmp_path) -> Path:
    """A rahf-tiny folder (seed 0) on disk."""
    model, processor = build_rahf("rahf-tiny", seed=0)
    RAHFScorer(model, processor).save_pretrained(tmp_path)
    return tmp_path


def _poison(folder: Path, values: dict[str, float]) -> None:
    """Overwrite one element of each named tensor in model.safetensors."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    for name, value in values.items():
        state[name].view(-1)[0] = value
    save_file(state, str(path))


# ---------------------------------------------------------------------------------------------------------
# Non-finite weights
# ---------------------------------------------------------------------------------------------------------


def test_nan_and_inf_weights_are_refused_at_load_naming_the_tensors(saved):
    _poison(
        saved,
        {
            "vision.layers.0.attention.q_proj.weight": math.nan,
            "score_heads.overall.mlp.2.bias": math.inf,
            "heatmap_heads.misalignment.out_conv2.weight": -math.inf,
        },
    )
    with pytest.raises(ValueError) as info:
        RAHFModel.from_pretrained(saved)
    msg = str(info.value)
    assert str(saved / "model.safetensors") in msg
    assert "3 tensor" in msg
    for name in (
        "vision.layers.0.attention.q_proj.weight",
        "score_heads.overall.mlp.2.bias",
        "heatmap_heads.misalignment.out_conv2.weight",
    ):
        assert name in msg
    # The scorer loads through the same check: no model that would give NaN scores gets built.
    with pytest.raises(ValueError, match="non-finite"):
        RAHFScorer.from_pretrained(saved)


def test_finite_weights_load_unchanged(saved):
    model = RAHFModel.from_pretrained(saved)
    state = load_file(str(saved / "model.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_load_state_dict_strict_refuses_nonfinite_without_touching_the_model():
    model, _ = build_rahf("rahf-tiny", seed=0)
    before = model.score_heads["overall"].mlp[2].bias.detach().clone()
    state = {k: v.clone() for k, v in _untied_state_dict(model).items()}
    state["score_heads.overall.mlp.2.bias"][0] = math.nan
    with pytest.raises(ValueError, match=r"my\.ckpt: non-finite .*score_heads\.overall\.mlp\.2\.bias"):
        model.load_state_dict_strict(state, source="my.ckpt")
    assert torch.equal(model.score_heads["overall"].mlp[2].bias, before)


# ---------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(keys: str, value):
    def edit(data):
        *parents, last = keys.split(".")
        for k in parents:
            data = data[k]
        data[last] = value

    return edit


def _delete(keys: str):
    def edit(data):
        *parents, last = keys.split(".")
        for k in parents:
            data = data[k]
        del data[last]

    return edit


MODEL_CONFIG_DAMAGE = {
    "string size": (_set("vision.hidden_size", "big"), "field vision.hidden_size: expected int, got str"),
    "null dict": (_set("task_prefixes", None), "field task_prefixes: expected dict, got null"),
    "null sub-config": (_set("text", None), "field text: expected dict, got null"),
    "negative size": (_set("heatmap_out_channels", -3), "field heatmap_out_channels: expected int >= 1, got -3"),
    "negative in list": (
        _set("score_channels", [64, -1, 16, 8, 8, 4]),
        r"field score_channels\[1\]: expected int >= 1",
    ),
    "null list": (_set("score_mlp_widths", None), "field score_mlp_widths: expected list, got null"),
    "bool as int": (_set("max_text_tokens", True), "field max_text_tokens: expected int, got bool"),
    "float as int": (_set("text.d_model", 64.5), "field text.d_model: expected int, got float"),
    "string weight": (_set("score_loss_weight", "1"), "field score_loss_weight: expected float, got str"),
    "negative weight": (_set("token_loss_weight", -1), "field token_loss_weight: expected float >= 0, got -1"),
    "dict value": (
        _set("heatmap_weights", {"misalignment": "x"}),
        r"field heatmap_weights\[misalignment\]: expected float, got str",
    ),
    "prior out of range": (_set("heatmap_prior", 1.5), r"field heatmap_prior: expected float in \(0, 1\), got 1.5"),
    "bad choice": (_set("variant", "two_heads"), "field variant: expected one of .*multi_head.*, got 'two_heads'"),
    "unknown key": (_set("bogus", 1), r"unknown RAHFConfig fields: \['bogus'\]"),
    "unknown sub-key": (_set("vision.hiden_size", 64), r"unknown vision fields: \['hiden_size'\]"),
    "missing key": (_delete("vision"), r"missing RAHFConfig fields: \['vision'\]"),
    "missing sub-key": (_delete("text.d_model"), r"missing text fields: \['d_model'\]"),
    "wrong sub-type": (_set("vision.qkv_bias", "yes"), "field vision.qkv_bias: expected bool, got str"),
    "negative id": (_set("text.pad_token_id", -1), "field text.pad_token_id: expected int >= 0, got -1"),
}


@pytest.mark.parametrize("damage", sorted(MODEL_CONFIG_DAMAGE))
def test_bad_model_config_is_refused_naming_file_and_field(saved, damage):
    edit, message = MODEL_CONFIG_DAMAGE[damage]
    path = saved / "config.json"
    _edit_json(path, edit)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        RAHFModel.from_pretrained(saved)


@pytest.mark.parametrize(
    "text, where",
    [('{"vision": {"image_size": 64,', "line 1 column 30"), ('{\n  "variant": multi\n}', "line 2 column 14")],
)
def test_bad_json_names_file_and_position(saved, text, where):
    path = saved / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": not valid JSON: .*" + where):
        RAHFModel.from_pretrained(saved)


def test_config_that_is_not_an_object(saved):
    path = saved / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": expected a JSON object, got list"):
        RAHFConfig.load(saved)


def test_nan_in_json_is_refused(saved):
    path = saved / "config.json"
    path.write_text(path.read_text().replace('"heatmap_prior": 0.05', '"heatmap_prior": NaN'))
    with pytest.raises(ValueError, match="field heatmap_prior: expected a finite float, got nan"):
        RAHFConfig.load(saved)


def test_direct_construction_uses_the_same_checks():
    cfg = preset_config("rahf-tiny")
    with pytest.raises(ValueError, match=r"field vision\.patch_size: expected int, got str"):
        RAHFConfig(vision={**cfg.vision, "patch_size": "8"}, text=dict(cfg.text))
    with pytest.raises(ValueError, match="field vision: expected dict, got null"):
        RAHFConfig(vision=None, text=dict(cfg.text))  # type: ignore[arg-type]


def test_valid_config_roundtrips_with_normalised_values(saved):
    """JSON lists come back as tuples and integer weights as floats; nothing else changes."""
    cfg = RAHFConfig.load(saved)
    assert cfg == preset_config("rahf-tiny")
    assert isinstance(cfg.score_channels, tuple) and isinstance(cfg.score_loss_weight, float)
    _edit_json(saved / "config.json", _set("score_loss_weight", 2))
    assert RAHFConfig.load(saved).score_loss_weight == 2.0


# ---------------------------------------------------------------------------------------------------------
# processor_config.json
# ---------------------------------------------------------------------------------------------------------


PROCESSOR_DAMAGE = {
    "string size": (_set("image_size", "big"), "field image_size: expected int, got str"),
    "negative size": (_set("image_size", -64), "field image_size: expected int >= 1, got -64"),
    "zero std": (_set("image_std", 0), "field image_std: expected float > 0, got 0"),
    "null mean": (_set("image_mean", None), "field image_mean: expected float, got null"),
    "bad filter": (_set("resample", "cubic"), "field resample: expected one of .*'bilinear'.*, got 'cubic'"),
    "unknown key": (_set("do_resize", True), r"unknown processor fields: \['do_resize'\]"),
    "missing key": (_delete("image_size"), r"missing processor fields: \['image_size'\]"),
}


@pytest.mark.parametrize("damage", sorted(PROCESSOR_DAMAGE))
def test_bad_processor_config_is_refused_naming_file_and_field(saved, damage):
    edit, message = PROCESSOR_DAMAGE[damage]
    path = saved / PROCESSOR_NAME
    _edit_json(path, edit)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        RAHFProcessor.from_pretrained(saved)


def test_bad_processor_json_names_file_and_position(saved):
    path = saved / PROCESSOR_NAME
    path.write_text('{"image_size": 64 "resample": "bicubic"}')
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": not valid JSON: .*line 1 column 19"):
        RAHFProcessor.from_pretrained(saved)


def test_processor_config_roundtrip_keeps_resample(tmp_path):
    tok = build_offline_t5_tokenizer()
    RAHFProcessor(tok, image_size=32, resample="bilinear").save_pretrained(tmp_path)
    again = RAHFProcessor.from_pretrained(tmp_path)
    assert (again.image_size, again.resample, again.image_mean, again.image_std) == (32, "bilinear", 0.5, 0.5)
    with pytest.raises(ValueError, match="field resample: expected one of"):
        RAHFProcessor(tok, image_size=32, resample="cubic")


def test_saved_processor_without_resample_keeps_bicubic(saved):
    """Folders saved before the filter was recorded keep the filter they were scored with."""
    _edit_json(saved / PROCESSOR_NAME, _delete("resample"))
    assert RAHFProcessor.from_pretrained(saved).resample == "bicubic"
