"""Text-to-image generators behind one interface: the synthetic world (``generators.synthetic``),
aMUSEd (``generators.amused``) and Stable Diffusion (``generators.stable_diffusion``). ``generators.base`` holds the
interface, the generator identity and the image record; it imports neither torch nor diffusers."""

from __future__ import annotations

from typing import Any

BACKENDS = ("synthetic", "amused-tiny", "amused-256", "amused-512", "sd-tiny", "sd-turbo")


def build_generator(name: str = "synthetic", *, lora: str | None = None, **kwargs: Any):
    """A generator by preset name, hub id or local folder; ``lora`` loads an adapter folder on top.

    ``synthetic`` (the offline world; ``lora`` is a fitted ``flaws.json`` folder), ``amused-tiny``/``sd-tiny``
    (random init, offline), ``amused-256``/``amused-512``/``sd-turbo`` (hub), or a saved pipeline folder/hub id:
    a folder whose ``model_index.json`` names an aMUSEd pipeline loads as aMUSEd, anything else as Stable Diffusion.
    """
    if name == "synthetic":
        from generators.synthetic import SyntheticGenerator

        return SyntheticGenerator.from_pretrained(lora, **kwargs)
    if name.startswith("amused") or _is_amused_folder(name):
        from generators.amused import AmusedGenerator

        gen = AmusedGenerator.from_preset(name, **kwargs) if name.startswith("amused-") else None
        gen = gen or AmusedGenerator.from_pretrained(name, **kwargs)
    else:
        from generators.stable_diffusion import StableDiffusionGenerator

        sd_presets = ("sd-tiny", "sd-turbo", "sd-inpainting")
        if name in sd_presets:
            gen = StableDiffusionGenerator.from_preset(name, **kwargs)
        else:
            gen = StableDiffusionGenerator.from_pretrained(name, **kwargs)
    return gen.load_lora(lora) if lora else gen


def _is_amused_folder(name: str) -> bool:
    import json
    from pathlib import Path

    index = Path(name) / "model_index.json"
    return index.is_file() and "Amused" in json.loads(index.read_text()).get("_class_name", "")
