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


def test_a_model_is_correlated_with_both_the_labels_and_what_the_images_show(tmp_path):
    from benchmarks.visible_ceiling import against_both, split_scores

    paired = FlawModel(wrong_colour=0.1, missing=0.6, extra=0.6)
    write_split(tmp_path, "test", 40, size=32, seed=1, flaws=paired)
    _, truth, seen = split_scores(tmp_path, "test")
    ceiling = visible_ceiling(tmp_path, "test")["scores"]
    reads_pixels = against_both(seen, truth, seen)  # a model that scores exactly what each image shows
    for s in ("alignment", "overall"):
        assert reads_pixels[s]["visible"]["plcc"] == pytest.approx(1.0)
        assert reads_pixels[s]["labels"]["plcc"] == pytest.approx(ceiling[s]["plcc"])
        assert ceiling[s]["plcc"] < 0.99
    knows_labels = against_both(truth, truth, seen)  # one that knows the labels is above the ceiling
    assert knows_labels["alignment"]["labels"]["plcc"] == pytest.approx(1.0)
    assert knows_labels["alignment"]["visible"]["plcc"] == pytest.approx(ceiling["alignment"]["plcc"])


def test_command_scores_a_saved_model_against_both(tmp_path_factory, tmp_path):
    from benchmarks.visible_ceiling import against_both, model_scores, split_scores
    from tests.conftest import save_tiny_rahf

    data = tmp_path_factory.mktemp("ceiling-model")
    write_split(data, "test", 12, size=64, seed=2, flaws=FlawModel(missing=0.6, extra=0.6))
    model_dir = save_tiny_rahf(tmp_path / "model")
    out = tmp_path / "ceiling.md"
    assert main(["--data", str(data), "--model", f"tiny={model_dir}", "--threads", "1", "--out", str(out)]) == 0
    predicted, kept, skipped = model_scores(model_dir, data, "test", 1)
    assert skipped == [] and kept.tolist() == list(range(12))
    _, truth, seen = split_scores(data, "test")
    table = against_both(predicted, truth, seen)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny |")]
    assert [r.split(" | ")[1] for r in rows] == ["alignment", "overall"]
    al = table["alignment"]
    assert rows[0].endswith(
        f"| {al['labels']['plcc']:.3f} / {al['labels']['srcc']:.3f} | "
        f"{al['visible']['plcc']:.3f} / {al['visible']['srcc']:.3f} |"
    )


def test_an_unreadable_image_is_skipped_for_the_model_and_named(tmp_path_factory, tmp_path):
    from benchmarks import synthetic_rows
    from benchmarks.visible_ceiling import model_scores
    from tests.conftest import save_tiny_rahf

    data = tmp_path_factory.mktemp("ceiling-bad")
    write_split(data, "test", 10, size=64, seed=3, flaws=FlawModel(missing=0.6, extra=0.6))
    broken = data / synthetic_rows(data, "test")[4]["image"]
    broken.write_bytes(b"not a png")
    model_dir = save_tiny_rahf(tmp_path / "model")
    predicted, kept, skipped = model_scores(model_dir, data, "test", 1)
    assert kept.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9] and predicted.shape == (9, 4)
    assert len(skipped) == 1 and skipped[0].startswith(f"{broken}: ")
    out = tmp_path / "ceiling.md"
    assert main(["--data", str(data), "--model", f"tiny={model_dir}", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Skipped 1 image(s) that could not be scored:" in text and f"- {broken}: " in text
    assert len([line for line in text.splitlines() if line.startswith("| tiny |")]) == 2
