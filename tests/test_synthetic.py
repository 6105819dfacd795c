"""The synthetic rich-feedback world: determinism, exact ground truth, the score formulas, the written split."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rahf.data.richhf import read_richhf
from rahf.data.synthetic import FlawModel, generate, render
from rahf.processor import prompt_words
from richfeedback.cli import main

NO_FLAWS = FlawModel(
    distortion=dict.fromkeys(("circle", "square", "triangle", "diamond"), 0.0), wrong_colour=0.0, missing=0.0, extra=0.0
)


def test_same_seed_same_sample_and_prefix_stable():
    a = list(generate(5, size=48, seed=3))
    b = list(generate(8, size=48, seed=3))
    for x, y in zip(a, b):
        assert x.prompt == y.prompt and np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert np.array_equal(x.example.heatmaps["implausibility"], y.example.heatmaps["implausibility"])
    assert a[0].prompt != next(generate(1, size=48, seed=4)).prompt or not np.array_equal(
        np.asarray(a[0].image), np.asarray(next(generate(1, size=48, seed=4)).image)
    )


def test_word_labels_follow_the_richhf_word_rule():
    for s in generate(60, size=32, seed=1):
        assert len(prompt_words(s.prompt)) == len(s.example.word_labels)


def test_a_flawless_scene_has_empty_maps_and_top_scores():
    s = render(np.random.default_rng(0), size=48, flaws=NO_FLAWS)
    assert s.flaws == [] and s.example.word_labels == [1] * len(prompt_words(s.prompt))
    assert s.example.heatmaps["implausibility"].max() == 0 and s.example.heatmaps["misalignment"].max() == 0
    assert s.example.scores["plausibility"] == 1.0 and s.example.scores["alignment"] == 1.0


def test_each_flaw_leaves_its_exact_trace():
    only = {
        "distortion": FlawModel(dict.fromkeys(("circle", "square", "triangle", "diamond"), 1.0), 0.0, 0.0, 0.0),
        "wrong_colour": FlawModel(NO_FLAWS.distortion, 1.0, 0.0, 0.0),
        "extra": FlawModel(NO_FLAWS.distortion, 0.0, 0.0, 1.0),
    }
    for i in range(10):
        d = render(np.random.default_rng(i), size=48, flaws=only["distortion"]).example
        a_impl = float(d.heatmaps["implausibility"].mean())
        assert a_impl > 0 and d.heatmaps["misalignment"].max() == 0
        assert d.scores["plausibility"] == pytest.approx(1 - min(1, 6 * a_impl))
        w = render(np.random.default_rng(i), size=48, flaws=only["wrong_colour"])
        words = prompt_words(w.prompt)
        marked = [words[k] for k, lab in enumerate(w.example.word_labels) if lab == 0]
        assert marked and all(
            m in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black") for m in marked
        )
        assert w.example.heatmaps["misalignment"].max() > 0.9 and w.example.heatmaps["implausibility"].max() == 0
        e = render(np.random.default_rng(i), size=48, flaws=only["extra"])
        assert all(
            words_ in ("a", "two", "three")
            for words_ in [prompt_words(e.prompt)[k] for k, lab in enumerate(e.example.word_labels) if lab == 0]
        )
    for s in generate(40, size=32, seed=2):
        sc = s.example.scores
        assert sc["overall"] == pytest.approx(0.4 * sc["plausibility"] + 0.4 * sc["alignment"] + 0.2 * sc["aesthetics"])
        assert all(0.0 <= v <= 1.0 for v in sc.values())


def test_synth_command_writes_a_readable_split(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--train", "6", "--dev", "2", "--test", "0", "--size", "32"]) == 0
    examples = list(read_richhf(tmp_path / "train.tfrecord"))
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(examples) == 6 == len(rows) and not (tmp_path / "test.tfrecord").exists()
    for ex, row in zip(examples, rows):
        assert (tmp_path / row["image"]).is_file() and ex.uid == row["uid"]
        assert len(prompt_words(row["prompt"])) == len(ex.word_labels)
        assert ex.heatmaps["implausibility"].shape == (32, 32)


def test_workers_write_the_same_bytes_as_one_process(tmp_path):
    from rahf.data import synthetic_alt

    args = ["synth", "--train", "30", "--dev", "0", "--test", "0", "--size", "32", "--per-prompt", "4"]
    assert main([*args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "three"), "--workers", "3"]) == 0
    synthetic_alt.write_split(tmp_path / "alt1", "dev", 10, size=32, seed=2)
    synthetic_alt.write_split(tmp_path / "alt2", "dev", 10, size=32, seed=2, workers=2)
    for a, b, split in (("one", "three", "train"), ("alt1", "alt2", "dev")):
        names = sorted(p.name for p in (tmp_path / a / split).iterdir())
        assert len(names) == (30 if split == "train" else 10)
        for name in [f"{split}.tfrecord", f"{split}.jsonl"] + [f"{split}/{n}" for n in names]:
            assert (tmp_path / a / name).read_bytes() == (tmp_path / b / name).read_bytes(), name
    with pytest.raises(SystemExit, match="--workers must be >= 0"):
        main([*args, "--out", str(tmp_path / "bad"), "--workers", "-1"])


def test_auto_workers_is_one_per_core_but_a_share_of_the_split_each(monkeypatch):
    from rahf.data import synthetic

    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 16)
    assert [synthetic.auto_workers(n) for n in (0, 200, 3999, 4000, 36000, 10**6)] == [1, 1, 1, 2, 16, 16]
    assert synthetic.auto_workers(36000, per_worker=5000) == 7
    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: None)  # unknown: one process
    assert synthetic.auto_workers(36000) == 1


def test_renderer_imports_without_torch():
    code = "import sys; import rahf.data.synthetic; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _two_object_scene():
    from rahf.data.synthetic import Group, Scene, SceneObject

    objects = [
        SceneObject("circle", "red", 20.0, 20.0, 8.0, 0, distortion=7),  # image centre (10, 10), radius 4 px
        SceneObject("square", "blue", 90.0, 90.0, 8.0, 1),  # image centre (45, 45)
    ]
    groups = [Group(1, "red", "circle", "at the top"), Group(1, "blue", "square", "at the bottom")]
    return Scene(64, (200, 220, 235), groups, objects, [], ["distortion:circle"])


def test_object_heat_is_the_map_mean_over_each_disc():
    from rahf.data.synthetic import object_heat

    scene = _two_object_scene()
    heat = np.zeros((64, 64), np.float32)
    heat[:32, :32] = 0.8  # covers the circle's disc entirely, the square's not at all
    heat[45, 45] = 1.0  # one of the square's pixels
    h = object_heat(scene, heat)
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    n_square = int(((xx - 45) ** 2 + (yy - 45) ** 2 <= 16).sum())
    assert h[0] == pytest.approx(0.8)
    assert h[1] == pytest.approx(1.0 / n_square)
    with pytest.raises(ValueError, match="shape"):
        object_heat(scene, heat[:32])


def test_flaw_counts_leave_out_excluded_objects_only():
    from rahf.data.synthetic import flaw_counts

    scene = _two_object_scene()
    full = flaw_counts(scene)
    assert (full["objects"]["circle"], full["distorted"]["circle"], full["objects"]["square"]) == (1, 1, 1)
    cut = flaw_counts(scene, [True, False])
    assert (cut["objects"]["circle"], cut["distorted"]["circle"], cut["objects"]["square"]) == (0, 0, 1)
    assert cut["groups"] == full["groups"] == 2  # group-level counts are kept
    with pytest.raises(ValueError, match="flags"):
        flaw_counts(scene, [True])
