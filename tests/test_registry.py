"""One registry of generator and scorer names: registered names build the right class, an unknown name's error
lists the known ones, local folders follow the documented fallback rule, and the flows load through it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.registry import Registry, UnknownNameError
from generators.registry import (
    AMUSED_PRESETS,
    SD_PRESETS,
    build_generator,
    build_scorer,
    is_amused_folder,
    list_generators,
    list_scorers,
)

ROOT = Path(__file__).resolve().parents[1]


def test_registry_builds_lists_and_refuses_unknown_names():
    reg: Registry[str] = Registry("widget", lambda n: (lambda **kw: f"folder:{n}") if n.startswith("./") else None)
    reg.register("a", lambda **kw: f"a{kw}")

    @reg.register("b")
    def _b(**kw):
        return "b"

    reg.add_loader(lambda r: r.register("c", lambda **kw: "c"))
    assert reg.build("a", x=1) == "a{'x': 1}" and reg.build("b") == "b"
    assert reg.names() == ["a", "b", "c"] and reg.build("c") == "c" and "c" in reg
    assert reg.build("./here") == "folder:./here"
    with pytest.raises(UnknownNameError, match=r"unknown widget 'z'; known names: a, b, c"):
        reg.build("z")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", lambda **kw: "again")
    reg.register("a", lambda **kw: "again", overwrite=True)
    assert reg.build("a") == "again"


def test_generator_names_are_listed_and_match_the_backends_presets():
    from generators import amused, stable_diffusion

    names = list_generators()
    assert names == sorted(["synthetic", *AMUSED_PRESETS, *SD_PRESETS])
    assert set(AMUSED_PRESETS) == {"amused-tiny", *amused.REAL_IDS}
    assert set(SD_PRESETS) == {"sd-tiny", *stable_diffusion.REAL_IDS}


def test_known_generator_names_build_their_classes(tmp_path):
    from generators.amused import AmusedGenerator
    from generators.stable_diffusion import StableDiffusionGenerator
    from generators.synthetic import SyntheticGenerator

    assert type(build_generator("synthetic", device="cpu")) is SyntheticGenerator
    assert type(build_generator("amused-tiny", device="cpu")) is AmusedGenerator
    assert type(build_generator("sd-tiny", device="cpu")) is StableDiffusionGenerator
    world = SyntheticGenerator()
    world.save_adapter(tmp_path / "fit")
    fitted = build_generator("synthetic", lora=str(tmp_path / "fit"))
    assert fitted.identity.adapter_hash is not None and fitted.identity.adapter_hash != world.identity.adapter_hash


def test_unknown_generator_name_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown generator 'amused-tinyy'") as err:
        build_generator("amused-tinyy")
    for name in list_generators():
        assert name in str(err.value)
    assert "hub id" in str(err.value)


def test_a_local_amused_folder_loads_as_amused(tmp_path):
    from generators.amused import AmusedGenerator

    folder = tmp_path / "my-pipeline"  # the name says nothing: the folder's model_index.json decides
    AmusedGenerator.from_preset("amused-tiny").save_pretrained(folder)
    assert is_amused_folder(folder) and not is_amused_folder(tmp_path)
    gen = build_generator(str(folder))
    assert type(gen) is AmusedGenerator and gen.identity.model == str(folder)


def test_other_local_folders_and_hub_ids_go_to_their_backends(tmp_path, monkeypatch):
    """The fallback rule without loading weights: which ``from_pretrained`` gets the name."""
    from generators.amused import AmusedGenerator
    from generators.stable_diffusion import StableDiffusionGenerator

    calls = []
    monkeypatch.setattr(AmusedGenerator, "from_pretrained", classmethod(lambda cls, m, **kw: calls.append(("A", m))))
    monkeypatch.setattr(
        StableDiffusionGenerator, "from_pretrained", classmethod(lambda cls, m, **kw: calls.append(("SD", m)))
    )
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for name in (str(sd), "amused/amused-256-variant", "someone/some-sd-model"):
        build_generator(name)
    assert calls == [("SD", str(sd)), ("A", "amused/amused-256-variant"), ("SD", "someone/some-sd-model")]


def test_scorer_names_are_listed_and_build_their_classes(tmp_path, monkeypatch):
    from generators.synthetic import GroundTruthScorer
    from rahf import zoo
    from rahf.scorer import RAHFScorer

    assert {"ground-truth", zoo.DEMO_MODEL, "rahf-tiny", "rahf-tiny-p4", "richhf-base"} <= set(list_scorers())
    assert type(build_scorer("ground-truth", device="cpu", batch_size=4)) is GroundTruthScorer
    tiny = build_scorer("rahf-tiny", batch_size=3)
    assert type(tiny) is RAHFScorer and tiny.identity["source"] == "rahf-tiny (random init, seed 0)"
    assert tiny.batch_size == 3
    folder = tmp_path / "saved"
    tiny.save_pretrained(folder)
    monkeypatch.setattr(zoo, "ensure_synthetic_rahf", lambda *a, **k: folder)  # the demo name resolves via the zoo
    demo = build_scorer(zoo.DEMO_MODEL)
    assert type(demo) is RAHFScorer and demo.identity["source"] == str(folder)
    local = build_scorer(str(folder))  # fallback: a local RAHF folder
    assert local.identity == demo.identity and local.identity["weights_hash"] is not None


def test_unknown_scorer_name_lists_the_known_names(tmp_path):
    with pytest.raises(ValueError, match="unknown scorer 'rahf-tinyy'") as err:
        build_scorer("rahf-tinyy")
    for name in ("ground-truth", "synthetic-default", "rahf-tiny", "richhf-base"):
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):  # a path goes to the loader, which names it
        build_scorer(str(tmp_path / "missing"))


def test_flows_load_models_through_the_registries():
    from flows.stages import load_generator, load_scorer
    from generators.synthetic import GroundTruthScorer, SyntheticGenerator

    assert type(load_scorer("ground-truth")) is GroundTruthScorer
    assert type(load_generator("synthetic", device="cpu")) is SyntheticGenerator
    with pytest.raises(ValueError, match=r"known names: .*ground-truth"):
        load_scorer("no-such-scorer")
    with pytest.raises(ValueError, match=r"known names: .*sd-tiny"):
        load_generator("no-such-generator")


def test_importing_the_registry_imports_no_torch():
    code = "import sys, generators, generators.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_cli_refuses_an_unknown_scorer_name_with_the_known_names(tmp_path, capsys):
    from richfeedback.cli import main

    code = main(["bench-loop", "--out", str(tmp_path), "--scorers", "rahf", "--rahf", "no-such-model"])
    err = capsys.readouterr().err
    assert code == 2 and "error: unknown scorer 'no-such-model'; known names:" in err and "ground-truth" in err
    assert not (tmp_path / "loop_gain.json").exists()
