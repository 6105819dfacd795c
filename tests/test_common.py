"""The torch-free shared layer: score and heatmap names spelled once, records and keys importable without torch,
the run-store key builders, and the scorer protocol that RAHFScorer and GroundTruthScorer both satisfy."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import keys
from common.names import HEATMAP_NAMES, SCORE_NAMES
from common.records import ImageRecord, RichFeedback, Scorer, ScoringFailure

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"common", "build", "dist", "outputs", "__pycache__", "node_modules"}


def _repo_python_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIP_DIRS for p in parts[:-1]):
            continue
        out.append(path)
    return out


def _name_literals(path: Path) -> list[tuple[int, str]]:
    """(line, what) of every tuple, list or set literal that spells all four score names or both heatmap names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if set(SCORE_NAMES) <= strings:
                found.append((node.lineno, "score names"))
            if set(HEATMAP_NAMES) <= strings:
                found.append((node.lineno, "heatmap names"))
    return found


def test_score_and_heatmap_names_are_spelled_only_in_common():
    files = _repo_python_files()
    assert len(files) > 50 and any(p.name == "stages.py" for p in files)  # the walk sees the packages
    spelled = [f"{p.relative_to(ROOT)}:{line} ({what})" for p in files for line, what in _name_literals(p)]
    assert spelled == [], "use common.names.SCORE_NAMES / HEATMAP_NAMES instead of spelling them: " + ", ".join(spelled)
    assert _name_literals(ROOT / "common" / "names.py") == [(9, "score names"), (11, "heatmap names")]


def test_the_old_homes_re_export_the_shared_objects():
    import generators.base
    import rahf.model
    import rahf.scorer

    assert generators.base.SCORE_NAMES is SCORE_NAMES and rahf.model.SCORE_NAMES is SCORE_NAMES
    assert rahf.model.HEATMAP_NAMES is HEATMAP_NAMES
    assert generators.base.ImageRecord is ImageRecord
    assert rahf.scorer.RichFeedback is RichFeedback and rahf.scorer.ScoringFailure is ScoringFailure


@pytest.mark.parametrize("module", ["common.names", "common.records", "common.keys"])
def test_common_modules_import_neither_torch_nor_pil(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_key_builders():
    assert keys.image_key("abc") == "images/abc.png"
    assert keys.heatmap_key("abc", "implausibility") == "heatmaps/abc-implausibility.png"
    assert keys.record_key("abc") == "records/abc.json"
    assert keys.error_key("abc") == "errors/abc.json"
    assert keys.repair_error_key("abc") == "errors/repair-abc.json"
    assert keys.repair_key("abc") == "repairs/abc.json"
    assert keys.manifest_key() == "manifest.jsonl"
    assert keys.claim_key("abc") == "claims/abc.json"
    assert (keys.run_key(), keys.dataset_run_key()) == ("run.json", "finetune-data/run.json")
    assert (keys.repair_summary_key(), keys.loop_summary_key()) == ("repair.json", "loop.json")
    assert keys.selection_key() == "selection.json"
    assert keys.finetune_data_key() == "finetune-data"
    assert keys.dataset_image_name("abc") == "abc.png"
    assert keys.finetune_key() == "finetune"
    assert keys.finetune_adapter_key() == "finetune/adapter"
    assert keys.finetune_summary_key() == "finetune/summary.json"
    assert keys.compare_side_key("a") == "compare/a" and keys.compare_side_key("b") == "compare/b"
    assert keys.comparison_key() == "compare/comparison.json"
    assert keys.compare_summary_key() == "compare/summary.json"
    assert keys.compare_report_key() == "compare/report"


def test_key_inverses_and_refusals():
    assert keys.id_of_image_key("images/abc.png") == "abc"
    assert keys.id_of_record_key("records/abc.json") == "abc"
    assert keys.id_of_repair_key("repairs/abc.json") == "abc"
    assert keys.id_of_image_key("images/abc.png.tmp") is None
    assert keys.id_of_record_key("records/x/abc.json") is None
    assert keys.id_of_repair_key("records/abc.json") is None
    for bad in ("", "a/b", ".hidden", "a\\b"):
        with pytest.raises(ValueError, match="id"):
            keys.record_key(bad)
    with pytest.raises(ValueError, match="heatmap name"):
        keys.heatmap_key("abc", "x/y")
    with pytest.raises(ValueError, match="side"):
        keys.compare_side_key("c")


def test_storage_uses_the_shared_key_builders():
    import flows.storage

    assert flows.storage.record_key is keys.record_key
    assert flows.storage.image_key is keys.image_key
    assert flows.storage.heatmap_key is keys.heatmap_key


def _accepts_protocol_call(impl) -> list[str]:
    """The parameters of ``Scorer.score`` that ``impl.score`` cannot take the same way (empty when it conforms)."""
    want = inspect.signature(Scorer.score).parameters
    have = inspect.signature(impl.score).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in have.values())
    problems = []
    for name, p in want.items():
        if name == "self":
            continue
        q = have.get(name)
        if q is None:
            if not (var_kw and p.kind is p.KEYWORD_ONLY):
                problems.append(f"{name}: missing")
            continue
        if p.kind is p.KEYWORD_ONLY and q.kind not in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD):
            problems.append(f"{name}: not a keyword")
        if p.kind is p.POSITIONAL_OR_KEYWORD and q.kind is not q.POSITIONAL_OR_KEYWORD:
            problems.append(f"{name}: not positional")
        if p.default is not p.empty and q.default != p.default:
            problems.append(f"{name}: default {q.default!r} != {p.default!r}")
    positional = [n for n, q in have.items() if q.kind is q.POSITIONAL_OR_KEYWORD]
    if positional[:2] != ["prompt", "images"]:
        problems.append(f"positional order {positional}")
    return problems


@pytest.fixture
def world_images():
    from generators.synthetic import SyntheticGenerator

    return SyntheticGenerator().generate(["two red circles at the left"], 2)


def test_rahf_scorer_satisfies_the_protocol_and_returns_the_shared_types(scorer, world_images, one_torch_thread):
    assert isinstance(scorer, Scorer) and _accepts_protocol_call(scorer) == []
    images = [g.image for g in world_images]
    out = scorer.score([g.prompt for g in world_images] + ["x"], [*images, b"not an image"], errors="return")
    assert [type(fb) for fb in out] == [RichFeedback, RichFeedback, ScoringFailure]
    assert set(out[0].scores) == set(SCORE_NAMES) and set(out[0].heatmaps) == set(HEATMAP_NAMES)
    assert out[2].index == 2 and out[2].prompt == "x"


def test_ground_truth_scorer_satisfies_the_protocol_and_returns_the_shared_types(world_images):
    from generators.synthetic import GroundTruthScorer, ground_truth

    oracle = GroundTruthScorer()
    assert isinstance(oracle, Scorer) and _accepts_protocol_call(oracle) == []
    images = [g.image for g in world_images]
    out = oracle.score("two red circles at the left", [*images, Image.new("RGB", (8, 8))], errors="return")
    assert [type(fb) for fb in out] == [RichFeedback, RichFeedback, ScoringFailure]
    assert out[0].scores == ground_truth(images[0])["scores"] and set(out[0].heatmaps) == set(HEATMAP_NAMES)
    assert out[2].index == 2 and "scene" in out[2].error
    only = oracle.score("two red circles at the left", images[:1], heatmaps=("implausibility",), keywords=False)[0]
    assert list(only.heatmaps) == ["implausibility"] and only.misaligned_keywords == []
    np.testing.assert_array_equal(only.heatmaps["implausibility"], out[0].heatmaps["implausibility"])
    assert oracle.score("p", images[:1], scores_only=True)[0].heatmaps == {}
    with pytest.raises(ValueError, match="unknown heatmaps"):
        oracle.score("p", images[:1], heatmaps=("sharpness",))
    with pytest.raises(ValueError, match="scene"):
        oracle.score("p", [Image.new("RGB", (8, 8))])


def test_random_scorer_satisfies_the_protocol():
    from compare.loop_gain import RandomScorer

    rs = RandomScorer(seed=1)
    assert isinstance(rs, Scorer) and _accepts_protocol_call(rs) == []
    out = rs.score("p", [Image.new("RGB", (8, 8))])
    assert type(out[0]) is RichFeedback and set(out[0].scores) == set(SCORE_NAMES)


def test_image_record_round_trips_and_drops_truth_maps(world_images):
    g = world_images[0]
    rec = ImageRecord.from_generated(g, "images/x.png")
    assert rec.id == g.id and rec.generator == g.generator.to_dict() and rec.image_uri == "images/x.png"
    assert "maps" not in rec.truth and rec.truth["scores"] == g.truth["scores"]
    assert ImageRecord.from_json(rec.to_json()) == rec
