"""RichHF-18K examples: schema round trip, schema errors, and annotation consolidation (paper §3.2)."""

from __future__ import annotations

import numpy as np
import pytest

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.data.richhf import (
    Annotation,
    RichHFExample,
    RichHFFormatError,
    consolidate,
    disk_map,
    example_features,
    parse_example,
    read_richhf,
    write_richhf,
)
from rahf.data.tfrecord import decode_example, encode_example, write_records


def example(i: int, size: int = 32) -> RichHFExample:
    rng = np.random.default_rng(i)
    maps = {n: np.round(rng.random((size, size)) * 255).astype(np.float32) / 255 for n in HEATMAP_NAMES}
    scores = {n: float(np.float32(v)) for n, v in zip(SCORE_NAMES, rng.random(4))}
    return RichHFExample(f"train/{i:04d}-uid.png", scores, maps, [1, 0, 1][: 1 + i % 3])


def test_round_trip_through_a_tfrecord_file(tmp_path):
    path = tmp_path / "train.tfrecord"
    originals = [example(i) for i in range(5)]
    assert write_richhf(path, originals) == 5
    back = list(read_richhf(path))
    assert len(back) == 5
    for a, b in zip(originals, back):
        assert b.filename == a.filename and b.uid == a.filename.split("/")[1][:-4]
        assert b.word_labels == a.word_labels
        for n in a.scores:
            assert b.scores[n] == pytest.approx(a.scores[n], abs=1e-7)
        for n in a.heatmaps:
            assert b.heatmaps[n].dtype == np.float32 and b.heatmaps[n].shape == (32, 32)
            np.testing.assert_allclose(b.heatmaps[n], a.heatmaps[n], atol=1e-7)


def test_schema_names_are_the_datasets():
    features = decode_example(encode_example(example_features(example(1))))
    assert set(features) == {
        "filename",
        "artifact_score",
        "misalignment_score",
        "aesthetics_score",
        "overall_score",
        "artifact_map",
        "misalignment_map",
        "prompt_misalignment_label",
    }
    assert features["prompt_misalignment_label"] == [b"1 0"]
    assert features["artifact_map"][0][:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda f: f.pop("overall_score"), "missing feature 'overall_score'"),
        (lambda f: f.update(artifact_score=[1.5]), "'artifact_score' must be a float in"),
        (lambda f: f.update(artifact_map=[b"not a png"]), "artifact_map: not a decodable PNG"),
        (lambda f: f.update(prompt_misalignment_label=[b"1 2"]), "only 0 and 1"),
    ],
)
def test_schema_errors_name_the_record_and_field(tmp_path, damage, match):
    features = example_features(example(2))
    damage(features)
    path = tmp_path / "bad.tfrecord"
    write_records(path, [encode_example(example_features(example(0))), encode_example(features)])
    reader = read_richhf(path)
    assert next(reader).filename.startswith("train/0000")
    with pytest.raises(RichHFFormatError, match=rf"bad\.tfrecord record 1: .*{match}"):
        next(reader)
    with pytest.raises(RichHFFormatError, match=match):
        parse_example(features)


def test_disk_radius_is_a_twentieth_of_the_height():
    m = disk_map([(50.0, 50.0)], image_size=(100, 100), map_size=(100, 100))
    assert m[50, 50] == 1.0 and m[50, 54] == 1.0 and m[50, 56] == 0.0  # radius 5 px
    assert abs(m.sum() - np.pi * 25) < 10
    scaled = disk_map([(100.0, 100.0)], image_size=(200, 200), map_size=(100, 100))
    np.testing.assert_array_equal(scaled, m)  # points scale with the map; the radius follows the map height


def test_consolidation_averages_maps_and_scores_and_votes_words():
    a1 = Annotation(
        [(10, 10, "implausible")], {"plausibility": 1, "alignment": 5, "aesthetics": 3, "overall": 2}, [1, 0, 0]
    )
    a2 = Annotation(
        [(10, 10, "implausible"), (30, 30, "misaligned")],
        {"plausibility": 3, "alignment": 5, "aesthetics": 3, "overall": 4},
        [1, 0, 1],
    )
    a3 = Annotation([], {"plausibility": 2, "alignment": 4, "aesthetics": 3, "overall": 3}, [0, 1, 1])
    ex = consolidate("train/x.png", [a1, a2, a3], image_size=(40, 40), map_size=(40, 40))
    assert ex.heatmaps["implausibility"][10, 10] == pytest.approx(2 / 3)
    assert ex.heatmaps["misalignment"][30, 30] == pytest.approx(1 / 3)
    assert ex.heatmaps["misalignment"][10, 10] == 0.0
    assert ex.scores == {
        "plausibility": pytest.approx(0.25),
        "alignment": pytest.approx((14 / 3 - 1) / 4),
        "aesthetics": pytest.approx(0.5),
        "overall": pytest.approx(0.5),
    }
    assert ex.word_labels == [1, 0, 1]
    tie = consolidate("t.png", [a1, a3], image_size=(40, 40), map_size=(40, 40))
    assert tie.word_labels == [1, 1, 1]  # one-to-one votes count as aligned


def test_consolidation_rejects_inconsistent_input():
    ok = Annotation([], {"plausibility": 3, "alignment": 3, "aesthetics": 3, "overall": 3}, [1, 1])
    with pytest.raises(ValueError, match="different word counts"):
        consolidate("f.png", [ok, Annotation([], ok.scores, [1])], image_size=(8, 8), map_size=(8, 8))
    with pytest.raises(ValueError, match=r"ratings must be in 1\.\.5"):
        consolidate("f.png", [Annotation([], {**ok.scores, "overall": 7}, [1, 1])], (8, 8), (8, 8))
    with pytest.raises(ValueError, match="unknown point kind"):
        consolidate("f.png", [Annotation([(1, 1, "ugly")], ok.scores, [1, 1])], (8, 8), (8, 8))
    with pytest.raises(ValueError, match="no annotations"):
        consolidate("f.png", [], (8, 8), (8, 8))
