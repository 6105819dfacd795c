"""Guards at two boundaries: finetuning metadata may only name files inside its folder, and a LoRA adapter must fit
the generator it is loaded into (an adapter that would load zero weights is refused, not silently ignored)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from finetune.dataset import METADATA_FILE
from finetune.lora import load_folder

# ---------------------------------------------------------------------------------------------------------
# Row 1: metadata.jsonl file names stay inside the data folder
# ---------------------------------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _folder(tmp_path: Path, names: list[str]) -> Path:
    """``tmp_path/data`` with ``ok.png`` and a metadata row per name; ``tmp_path/secret.png`` lies outside."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes(_png(0))
    (tmp_path / "secret.png").write_bytes(_png(1))
    rows = [{"file_name": n, "text": f"prompt {i}"} for i, n in enumerate(names)]
    (data / METADATA_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("bad", ["../secret.png", "sub/../../secret.png", "..\\secret.png", "", "."])
def test_metadata_file_name_outside_the_folder_is_refused(tmp_path, bad):
    data = _folder(tmp_path, ["ok.png", bad])
    with pytest.raises(ValueError, match=r"line 2") as err:
        load_folder(str(data))
    assert repr(bad) in str(err.value)


def test_absolute_file_name_is_refused(tmp_path):
    secret = str(tmp_path / "secret.png")
    data = _folder(tmp_path, [secret])
    with pytest.raises(ValueError, match=r"line 1.*absolute"):
        load_folder(str(data))


def test_non_string_file_name_is_refused(tmp_path):
    data = _folder(tmp_path, ["ok.png"])
    (data / METADATA_FILE).write_text(json.dumps({"file_name": 3, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1.*file_name"):
        load_folder(str(data))


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    data = _folder(tmp_path, ["ok.png", "link.png"])
    os.symlink(tmp_path / "secret.png", data / "link.png")
    with pytest.raises(ValueError, match=r"'link.png'.*outside"):
        load_folder(str(data))


def test_files_inside_the_folder_still_load(tmp_path):
    data = _folder(tmp_path, ["ok.png", "sub/inner.png", "alias.png"])
    (data / "sub").mkdir()
    (data / "sub" / "inner.png").write_bytes(_png(2))
    os.symlink(data / "ok.png", data / "alias.png")  # a link that stays inside is fine
    images, prompts = load_folder(str(data))
    assert prompts == ["prompt 0", "prompt 1", "prompt 2"]
    arrays = [np.asarray(im) for im in images]
    assert np.array_equal(arrays[0], arrays[2]) and not np.array_equal(arrays[0], arrays[1])


# ---------------------------------------------------------------------------------------------------------
# Row 2: a LoRA adapter must fit the generator it is loaded into
# ---------------------------------------------------------------------------------------------------------

PROMPT = "two red circles at the left"


def _make_adapter(preset: str, folder: Path) -> Path:
    """A LoRA adapter of ``preset`` with non-zero weights (so it changes outputs), saved in the diffusers format."""
    from peft import LoraConfig

    from finetune.lora import save_adapter
    from generators import build_generator

    gen = build_generator(preset)
    model = gen.pipe.transformer if gen.backend == "amused" else gen.pipe.unet
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(gen, model, folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {p: _make_adapter(p, root / p) for p in ("amused-tiny", "sd-tiny")}


@pytest.mark.parametrize(("preset", "foreign"), [("amused-tiny", "sd-tiny"), ("sd-tiny", "amused-tiny")])
def test_adapter_of_another_generator_is_refused(adapters, preset, foreign):
    from generators import build_generator

    with pytest.raises(ValueError, match="does not fit") as err:
        build_generator(preset, lora=str(adapters[foreign]))
    msg = str(err.value)
    assert str(adapters[foreign]) in msg and preset.split("-")[0] in msg and "0 of" in msg


def test_adapter_with_wrong_shapes_is_refused(adapters, tmp_path):
    from generators import build_generator

    weights = load_file(adapters["sd-tiny"] / "pytorch_lora_weights.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 3)
    (tmp_path / "bad").mkdir()
    save_file(weights, str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit.*shape"):
        build_generator("sd-tiny", lora=str(tmp_path / "bad"))


def test_adapter_with_unknown_layers_is_refused(adapters, tmp_path):
    from generators import build_generator

    weights = load_file(adapters["amused-tiny"] / "pytorch_lora_weights.safetensors")
    weights["transformer.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 32)
    weights["transformer.no_such_block.to_q.lora_B.weight"] = torch.zeros(32, 4)
    (tmp_path / "extra").mkdir()
    save_file(weights, str(tmp_path / "extra" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit.*no_such_block"):
        build_generator("amused-tiny", lora=str(tmp_path / "extra"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["amused-tiny", "sd-tiny"])
def test_matching_adapter_loads_and_changes_outputs(adapters, preset):
    from generators import build_generator

    base = build_generator(preset)
    tuned = build_generator(preset, lora=str(adapters[preset]))
    a = np.asarray(base.generate([PROMPT], 1, seeds=[0])[0].image, np.int16)
    b = np.asarray(tuned.generate([PROMPT], 1, seeds=[0])[0].image, np.int16)
    assert tuned.identity.adapter_hash is not None and (a != b).mean() > 0.05
