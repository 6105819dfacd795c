"""The registries of generators and scorers: every name an entry point accepts (``--generator``, ``--rahf``, flow
parameters) is turned into a model here, by one rule.

Generators (:func:`build_generator`, :func:`list_generators`):

1. a registered name: ``synthetic`` (the offline world; ``lora`` is a fitted ``flaws.json`` folder),
   ``amused-tiny`` / ``sd-tiny`` (random init, offline), ``amused-256`` / ``amused-512`` / ``sd-turbo`` /
   ``sd-inpainting`` (hub weights);
2. else an existing local folder: a saved pipeline, aMUSEd when its ``model_index.json`` names an aMUSEd pipeline,
   otherwise Stable Diffusion;
3. else a name with a ``/`` (a hub id ``org/name``, or a path the loader then reports missing): aMUSEd when its last
   part starts with ``amused``, otherwise Stable Diffusion;
4. else a ValueError listing the registered names.

Scorers (:func:`build_scorer`, :func:`list_scorers`):

1. a registered name: the RAHF presets of ``rahf.presets`` (random init, seed 0), the demo model
   ``rahf.zoo.DEMO_MODEL`` (``synthetic-default``, trained once and cached by ``rahf.zoo.resolve_model``), and
   ``ground-truth`` (the synthetic world's oracle, :class:`generators.synthetic.GroundTruthScorer`);
2. else an existing local folder or a name with a ``/``: a saved RAHF folder or a hub id of one
   (``RAHFScorer.from_pretrained``);
3. else a ValueError listing the registered names.

The scorer registry lives here, not in ``rahf``, because the ground-truth scorer belongs to the synthetic world
(``generators.synthetic``) and ``rahf`` never imports ``generators``. Importing this module imports no torch;
building does. Add a generator backend or a scorer with :func:`register_generator` / :func:`register_scorer`
(builders take keyword arguments: ``lora``, ``device``, ... for generators; ``device``, ``batch_size``, ``dtype``
for scorers).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.records import Scorer
from common.registry import Builder, Registry
from rahf.zoo import DEMO_MODEL

if TYPE_CHECKING:
    from generators.base import Generator

GROUND_TRUTH = "ground-truth"  # the scorer name of the synthetic world's oracle
AMUSED_PRESETS = ("amused-tiny", "amused-256", "amused-512")
SD_PRESETS = ("sd-tiny", "sd-turbo", "sd-inpainting")


# ---------------------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------------------


def _with_lora(gen: Generator, lora: str | None) -> Generator:
    return gen.load_lora(lora) if lora else gen


def _amused_preset(preset: str, lora: str | None = None, **kwargs: Any) -> Generator:
    from generators.amused import AmusedGenerator

    return _with_lora(AmusedGenerator.from_preset(preset, **kwargs), lora)


def _sd_preset(preset: str, lora: str | None = None, **kwargs: Any) -> Generator:
    from generators.stable_diffusion import StableDiffusionGenerator

    return _with_lora(StableDiffusionGenerator.from_preset(preset, **kwargs), lora)


def _amused_pretrained(model: str, lora: str | None = None, **kwargs: Any) -> Generator:
    from generators.amused import AmusedGenerator

    return _with_lora(AmusedGenerator.from_pretrained(model, **kwargs), lora)


def _sd_pretrained(model: str, lora: str | None = None, **kwargs: Any) -> Generator:
    from generators.stable_diffusion import StableDiffusionGenerator

    return _with_lora(StableDiffusionGenerator.from_pretrained(model, **kwargs), lora)


def is_amused_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved pipeline whose ``model_index.json`` names an aMUSEd pipeline."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return False
    return "Amused" in str(json.loads(index.read_text()).get("_class_name", ""))


def _generator_fallback(name: str) -> Builder[Generator] | None:
    """Rules 2 and 3 of the module docstring: a local pipeline folder, or a hub id / path with a ``/``."""
    if Path(name).expanduser().is_dir():
        amused = is_amused_folder(Path(name).expanduser())
    elif "/" in name:
        amused = name.rstrip("/").rsplit("/", 1)[-1].startswith("amused")
    else:
        return None
    return functools.partial(_amused_pretrained if amused else _sd_pretrained, name)


GENERATORS: Registry[Generator] = Registry(
    "generator", _generator_fallback, "a saved pipeline folder, or a hub id 'org/name'"
)


@GENERATORS.register("synthetic")
def _synthetic(lora: str | None = None, device: str | None = None, **kwargs: Any) -> Generator:
    """The synthetic world (numpy, on the CPU whatever ``device`` says); ``lora`` is a fitted adapter folder."""
    from generators.synthetic import SyntheticGenerator

    return SyntheticGenerator.from_pretrained(lora, **kwargs)


for _name in AMUSED_PRESETS:
    GENERATORS.register(_name, functools.partial(_amused_preset, _name))
for _name in SD_PRESETS:
    GENERATORS.register(_name, functools.partial(_sd_preset, _name))


def build_generator(name: str = "synthetic", *, lora: str | None = None, **kwargs: Any) -> Generator:
    """A generator by registered name, local folder or hub id (the rule in this module's docstring); ``lora``
    loads an adapter folder on top. ``kwargs`` go to the backend (``device``, ``dtype``, ``seed``, ``size``...)."""
    return GENERATORS.resolve(name)(lora=lora, **kwargs)


def list_generators() -> list[str]:
    """The registered generator names, sorted (local folders and hub ids are accepted besides)."""
    return GENERATORS.names()


def register_generator(name: str, builder: Builder[Generator] | None = None, *, overwrite: bool = False):
    """Register a generator builder (``builder(lora=..., **kwargs) -> Generator``) under ``name``; without
    ``builder``, a decorator."""
    return GENERATORS.register(name, builder, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------------------


def _rahf(source: str, **kwargs: Any) -> Scorer:
    from rahf.scorer import RAHFScorer

    return RAHFScorer.from_pretrained(source, **kwargs)


def _demo(**kwargs: Any) -> Scorer:
    from rahf.zoo import resolve_model

    return _rahf(resolve_model(DEMO_MODEL), **kwargs)


def _ground_truth(**unused: Any) -> Scorer:
    """The oracle needs no device, batch size or dtype."""
    from generators.synthetic import GroundTruthScorer

    return GroundTruthScorer()


def _rahf_presets(registry: Registry[Scorer]) -> None:
    from rahf.presets import PRESETS  # imports torch: run on first lookup, not at import

    for preset in PRESETS:
        registry.register(preset, functools.partial(_rahf, preset))


def _scorer_fallback(name: str) -> Builder[Scorer] | None:
    if Path(name).expanduser().is_dir() or "/" in name:
        return functools.partial(_rahf, name)
    return None


SCORERS: Registry[Scorer] = Registry("scorer", _scorer_fallback, "a RAHF model folder, or a hub id 'org/name'")
SCORERS.register(DEMO_MODEL, _demo)
SCORERS.register(GROUND_TRUTH, _ground_truth)
SCORERS.add_loader(_rahf_presets)


def build_scorer(name: str, **kwargs: Any) -> Scorer:
    """A scorer by registered name, RAHF folder or hub id (the rule in this module's docstring); ``kwargs`` go to
    ``RAHFScorer`` (``device``, ``batch_size``, ``dtype``, ...) and are ignored by the ground-truth scorer."""
    return SCORERS.resolve(name)(**kwargs)


def list_scorers() -> list[str]:
    """The registered scorer names, sorted (imports torch to list the RAHF presets)."""
    return SCORERS.names()


def register_scorer(name: str, builder: Builder[Scorer] | None = None, *, overwrite: bool = False):
    """Register a scorer builder (``builder(**kwargs) -> Scorer``) under ``name``; without ``builder``, a
    decorator."""
    return SCORERS.register(name, builder, overwrite=overwrite)
