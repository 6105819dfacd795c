"""Generator backends: determinism per seed, batch independence, save/load round trips, inpainting that leaves
pixels outside the mask bit-identical, LoRA adapters changing outputs, and clear errors on bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.records import ImageRecord
from generators.base import decode_png, encode_png, image_id
from generators.synthetic import SyntheticGenerator
from rahf.data.synthetic import FlawModel, parse_prompt, prompt_of

PROMPTS = ["two red circles at the left and a blue square at the bottom", "a green triangle in the middle"]


def px(im: Image.Image) -> np.ndarray:
    return np.asarray(im, np.int16)


def box_mask(size: int = 64, box=(16, 16, 40, 40)) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    m.paste(255, box)
    return m


# -- synthetic world -------------------------------------------------------------------------------------------


def test_prompt_grammar_round_trips_and_rejects_other_text():
    for p in PROMPTS:
        assert " ".join(prompt_of(parse_prompt(p))[0]) == p
    for bad in ["a photo of a cat", "two red circles", "and a red circle at the left", ""]:
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_synthetic_same_seed_same_image_whatever_the_batch():
    g = SyntheticGenerator()
    batch = g.generate(PROMPTS, 4)
    alone = g.generate([PROMPTS[1]], 1, seeds=[2])[0]
    assert [b.seed for b in batch] == [0, 1, 2, 3] * 2 and batch[6].prompt == PROMPTS[1]
    assert np.array_equal(px(batch[6].image), px(alone.image)) and batch[6].id == alone.id
    assert len({px(b.image).tobytes() for b in batch}) == 8  # different seeds differ
    assert len({b.id for b in batch}) == 8


def test_synthetic_inpainting_keeps_outside_pixels_and_recomputes_truth():
    g = SyntheticGenerator(FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 1.0), 0, 0, 0))
    src = g.generate([PROMPTS[0]], 1)[0]
    image = decode_png(encode_png(src.image))  # the scene travels in the PNG
    assert np.array_equal(px(image), px(src.image))
    mask = Image.fromarray(np.where(src.truth["maps"]["implausibility"] > 0, 255, 0).astype(np.uint8))
    clean = SyntheticGenerator(FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 0.0), 0, 0, 0))
    for cand in clean.inpaint(image, mask, src.prompt, 3, seeds=[5, 6, 7]):
        outside = np.asarray(mask) == 0
        assert np.array_equal(px(cand.image)[outside], px(image)[outside])
        # a flawless inpainter removes every blotch the mask covers: nothing implausible remains
        assert cand.truth["implausible_area"] == 0.0 and cand.truth["scores"]["plausibility"] == 1.0
    assert src.truth["implausible_area"] > 0 and src.truth["scores"]["plausibility"] < 1.0


def test_realign_leaves_composed_scenes_unchanged():
    """The alignment truth recomputed from a scene's objects equals what compose drew, for every flaw mix."""
    from generators.synthetic import realign
    from rahf.data.synthetic import Scene

    g = SyntheticGenerator(FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 0.3), 0.4, 0.5, 0.5))
    prompts = [*PROMPTS, "three green triangles at the top", "two white diamonds at the right"]
    for im in g.generate(prompts, 12):
        scene = Scene.from_json(im.image.info["scene"])
        assert realign(Scene.from_json(im.image.info["scene"])) == scene


def test_synthetic_inpainting_redraws_covered_objects_as_the_prompt_asks():
    """A whole-image mask with a flawless world: a wrong colour is repainted in the prompt's colour and the extra
    object is left out, so alignment becomes 1 and no misaligned area is left; a half-covered object keeps its
    colour (pixels outside the mask cannot change); a missing object stays missing."""
    wrong_and_extra = SyntheticGenerator(
        FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 0.0), 1, 0, 1)
    )
    clean = SyntheticGenerator(FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 0.0), 0, 0, 0))
    prompt = "two red circles at the left"
    src = wrong_and_extra.generate([prompt], 1)[0]
    assert src.truth["scores"]["alignment"] == pytest.approx(1 / 3) and src.truth["counts"]["extra"] == 1
    full = Image.new("L", src.image.size, 255)
    fixed = clean.inpaint(src.image, full, prompt, 1, seeds=[0])[0]
    assert fixed.truth["scores"]["alignment"] == 1.0 and fixed.truth["maps"]["misalignment"].max() == 0.0
    assert fixed.truth["counts"]["wrong_colour"] == 0 and fixed.truth["counts"]["extra"] == 0
    assert len(parse_prompt(prompt)) == 1 and fixed.truth["words"] == src.truth["words"]
    # a mask over the left half of the image only: an object it cuts keeps its colour
    from rahf.data.synthetic import Scene

    scene = Scene.from_json(src.image.info["scene"])
    half = np.zeros((64, 64), np.uint8)
    x0 = int(scene.objects[0].x / 2)  # drawing coordinates are twice the image's
    half[:, :x0] = 255
    cut = clean.inpaint(src.image, Image.fromarray(half), prompt, 1, seeds=[0])[0]
    assert Scene.from_json(cut.image.info["scene"]).objects[0].colour == scene.objects[0].colour
    missing = SyntheticGenerator(FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 0.0), 0, 1, 0))
    gap = missing.generate([prompt], 1)[0]
    again = clean.inpaint(gap.image, full, prompt, 1, seeds=[0])[0]
    assert again.truth["counts"]["missing"] == 1 and again.truth["scores"] == gap.truth["scores"]


def test_synthetic_inpainting_needs_its_own_images():
    g = SyntheticGenerator()
    with pytest.raises(ValueError, match="synthetic generator"):
        g.inpaint(Image.new("RGB", (64, 64)), box_mask(), PROMPTS[0], 1)


def test_fit_moves_the_flaw_rates_toward_the_selected_images(tmp_path):
    g = SyntheticGenerator()
    images = g.generate(PROMPTS * 10, 8)
    clean = [im.truth for im in images if not any(f.startswith("distortion") for f in im.truth["flaws"])]
    fitted = g.fit(clean, prior_strength=0.0)
    # clean images only: the MLE distortion rate is 0 for every shape seen; an unseen shape keeps the prior
    assert [fitted.flaws.distortion[s] for s in ("circle", "square", "triangle")] == [0.0, 0.0, 0.0]
    assert fitted.flaws.distortion["diamond"] == g.flaws.distortion["diamond"]
    everything = g.fit([im.truth for im in images], prior_strength=0.0)
    counts = [im.truth["counts"] for im in images]
    circles = sum(c["objects"]["circle"] for c in counts)
    distorted = sum(c["distorted"]["circle"] for c in counts)
    assert everything.flaws.distortion["circle"] == pytest.approx(distorted / circles)
    h = fitted.save_adapter(tmp_path / "adapter")
    loaded = SyntheticGenerator.from_pretrained(tmp_path / "adapter")
    assert loaded.flaws == fitted.flaws and loaded.identity.adapter_hash == h != g.identity.adapter_hash
    assert loaded.generate([PROMPTS[0]], 1)[0].id != g.generate([PROMPTS[0]], 1)[0].id


def test_record_round_trip_keeps_truth_but_not_maps():
    im = SyntheticGenerator().generate([PROMPTS[0]], 1)[0]
    rec = ImageRecord.from_generated(im, "x.png")
    back = ImageRecord.from_json(rec.to_json())
    assert back == rec and "maps" not in back.truth and back.truth["scores"] == im.truth["scores"]
    assert rec.id == image_id(im.prompt, im.seed, im.generator, im.params)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": box_mask(32)}, "size"),
        ({"n": 0}, "n must be"),
        ({"image": Image.new("L", (64, 64))}, "RGB"),
        ({"mask": Image.new("RGB", (64, 64))}, "mode 'L'"),
    ],
)
def test_inpaint_bad_inputs(kwargs, message):
    g = SyntheticGenerator()
    src = g.generate([PROMPTS[0]], 1)[0]
    call = {"image": src.image, "mask": box_mask(), "prompt": src.prompt, "n": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        g.inpaint(**call)


def test_generate_bad_seed_count():
    with pytest.raises(ValueError, match="expected 4 seeds"):
        SyntheticGenerator().generate(PROMPTS, 2, seeds=[1, 2, 3])


# -- diffusers backends ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["amused", "sd"])
def diffusers_gen(request):
    if request.param == "amused":
        from generators.amused import AmusedGenerator

        return AmusedGenerator.from_preset("amused-tiny", seed=0)
    from generators.stable_diffusion import StableDiffusionGenerator

    return StableDiffusionGenerator.from_preset("sd-tiny", seed=0)


def test_diffusers_deterministic_per_seed_and_batch_independent(diffusers_gen):
    g = diffusers_gen
    batch = g.generate(["a red circle", "two blue squares"], 2, seeds=[3, 4, 3, 4])
    again = g.generate(["two blue squares"], 1, seeds=[4])[0]
    assert batch[0].image.size == (64, 64) and batch[0].image.mode == "RGB"
    # aMUSEd samples each image alone: identical; SD batches: the same up to float rounding (a uint8 step or two)
    assert np.abs(px(batch[3].image) - px(again.image)).max() <= (0 if g.backend == "amused" else 2)
    assert not np.array_equal(px(batch[0].image), px(batch[1].image))  # seeds differ
    assert batch[0].generator.backend == g.backend and batch[0].params["task"] == "text-to-image"


def test_diffusers_inpaint_keeps_pixels_outside_the_mask(diffusers_gen):
    g = diffusers_gen
    src = g.generate(["a red circle"], 1)[0].image
    mask = box_mask()
    cands = g.inpaint(src, mask, "a red circle", 2, seeds=[0, 1])
    outside = np.asarray(mask) == 0
    for c in cands:
        assert np.array_equal(px(c.image)[outside], px(src)[outside])
    assert any((px(c.image) != px(src)).any() for c in cands)
    assert cands[0].id != cands[1].id and g.cell_size in (4, 8)


def test_diffusers_save_and_load_offline(diffusers_gen, tmp_path):
    g = diffusers_gen
    g.save_pretrained(tmp_path / "model")
    loaded = type(g).from_pretrained(tmp_path / "model", call_kwargs=g.call_kwargs)
    a = g.generate(["a red circle"], 1, seeds=[7])[0]
    b = loaded.generate(["a red circle"], 1, seeds=[7])[0]
    assert np.abs(px(a.image) - px(b.image)).max() <= 1
    assert b.generator.model == str(tmp_path / "model")


def _save_random_lora(g, folder) -> None:
    """A LoRA adapter with non-zero B matrices (fresh LoRA is a no-op), saved in the diffusers format."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from generators.amused import AmusedGenerator, tiny_components

    if isinstance(g, AmusedGenerator):
        from diffusers.loaders import AmusedLoraLoaderMixin

        model = tiny_components(0)["transformer"]
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    else:
        from generators.stable_diffusion import tiny_components as sd_tiny

        model = sd_tiny(0)["unet"]
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    layers = get_peft_model_state_dict(model)
    if isinstance(g, AmusedGenerator):
        AmusedLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=layers)
    else:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)


@pytest.mark.parametrize("backend", ["amused", "sd"])
def test_lora_adapter_loads_and_changes_outputs(backend, tmp_path):
    from generators.amused import AmusedGenerator
    from generators.stable_diffusion import StableDiffusionGenerator

    cls, preset = (AmusedGenerator, "amused-tiny") if backend == "amused" else (StableDiffusionGenerator, "sd-tiny")
    base = cls.from_preset(preset, seed=0)
    _save_random_lora(base, tmp_path / "lora")
    tuned = cls.from_preset(preset, seed=0).load_lora(tmp_path / "lora")
    a = base.generate(["a red circle"], 1, seeds=[0])[0]
    b = tuned.generate(["a red circle"], 1, seeds=[0])[0]
    assert tuned.identity.adapter_hash and base.identity.adapter_hash is None and a.id != b.id
    assert (px(a.image) != px(b.image)).mean() > 0.05
    with pytest.raises(FileNotFoundError):
        cls.from_preset(preset, seed=0).load_lora(tmp_path)


@pytest.mark.parametrize("backend", ["synthetic", "amused"])
def test_all_zero_mask_changes_nothing_and_all_one_mask_repaints(backend):
    if backend == "synthetic":
        g = SyntheticGenerator(FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 1.0), 0, 0, 0))
        prompt = PROMPTS[0]
    else:
        from generators.amused import AmusedGenerator

        g, prompt = AmusedGenerator.from_preset("amused-tiny", seed=0), "a red circle"
    src = g.generate([prompt], 1)[0].image
    empty = g.inpaint(src, Image.new("L", src.size, 0), prompt, 1)[0]
    assert np.array_equal(px(empty.image), px(src))  # nothing to repaint: the input, bit for bit
    full = g.inpaint(src, Image.new("L", src.size, 255), prompt, 2, seeds=[3, 4])
    assert all((px(c.image) != px(src)).any() for c in full)
    assert not np.array_equal(px(full[0].image), px(full[1].image))
