"""The synthetic world's invisible flaw pair (a group's missing and extra objects cancel) and the image-only
ceiling it sets (benchmarks/visible_ceiling.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from benchmarks.visible_ceiling import main, visible_ceiling
from rahf.data.synthetic import (
    SHAPES,
    FlawModel,
    Group,
    cancelled_groups,
    compose,
    rasterise,
    scene_scores,
    visible_scores,
    write_split,
)


def test_cancelled_groups_need_both_flaws_on_the_same_group():
    assert cancelled_groups(["missing:0", "extra:0", "distortion:circle"]) == [0]
    assert cancelled_groups(["missing:0", "extra:1", "wrong_colour:1"]) == []
    assert cancelled_groups(["missing:1", "extra:1", "missing:0", "extra:0"]) == [0, 1]
    assert cancelled_groups([]) == []


def test_a_cancelled_pair_draws_the_prompts_objects_and_its_visible_scores_are_perfect():
    groups = [Group(2, "red", "square", "at the left"), Group(3, "blue", "circle", "at the right")]
    only_count = FlawModel(dict.fromkeys(SHAPES, 0.0), wrong_colour=0.0, missing=1.0, extra=1.0)
    scene = compose(np.random.default_rng(0), groups, flaws=only_count)
    assert cancelled_groups(scene.flaws) == [0, 1]
    drawn = Counter((o.group, o.shape, o.colour) for o in scene.objects)
    assert drawn == {(0, "square", "red"): 2, (1, "circle", "blue"): 3}  # what the prompt asks for
    _, impl, _ = rasterise(scene)
    labels = scene_scores(scene, impl)
    assert labels["alignment"] == pytest.approx(1 - 4 / 6)  # count and shape words of both groups marked
    prompt = "two red squares at the left and three blue circles at the right"
    seen = visible_scores(prompt, scene.flaws, labels)
    assert seen["alignment"] == pytest.approx(1.0)
    assert seen["overall"] == pytest.approx(labels["overall"] + 0.4 * 4 / 6)
    assert seen["plausibility"] == labels["plausibility"] and seen["aesthetics"] == labels["aesthetics"]
    other = visible_scores(prompt, ["missing:0", "extra:1"], labels)  # visible: one square short, one circle over
    assert other == labels


def test_ceiling_is_perfect_without_the_pair_and_below_one_with_it(tmp_path, capsys):
    clean = FlawModel(wrong_colour=0.3, missing=0.0, extra=0.3)
    write_split(tmp_path / "clean", "test", 30, size=32, seed=0, flaws=clean)
    result = visible_ceiling(tmp_path / "clean", "test")
    assert result["with_cancelled_pair"] == 0
    assert all(v["plcc"] == pytest.approx(1.0) for v in result["scores"].values())
    paired = FlawModel(wrong_colour=0.1, missing=0.6, extra=0.6)
    write_split(tmp_path / "paired", "test", 40, size=32, seed=0, flaws=paired)
    out = tmp_path / "ceiling.md"
    assert main(["--data", str(tmp_path / "paired"), "--out", str(out)]) == 0
    result = visible_ceiling(tmp_path / "paired", "test")
    assert result["with_cancelled_pair"] > 0
    assert result["scores"]["alignment"]["plcc"] < 0.99 and result["scores"]["plausibility"]["plcc"] == 1.0
    assert f"| alignment | {result['scores']['alignment']['plcc']:.3f} |" in out.read_text()
    assert out.read_text() in capsys.readouterr().out
