"""RAHFScorer: the public scoring API, its output options, batching, dtypes and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common.names import HEATMAP_NAMES, SCORE_NAMES
from common.records import RichFeedback, ScoringFailure
from rahf.processor import InvalidImageError
from rahf.scorer import RAHFScorer


@pytest.fixture
def scorer(tiny):
    model, processor = tiny
    return RAHFScorer(model, processor, batch_size=2)


def test_score_returns_rich_feedback(scorer, images):
    results = scorer.score("a red cat on a mat", images)
    assert len(results) == 3 and all(isinstance(r, RichFeedback) for r in results)
    s = scorer.model.config.image_size
    for r in results:
        assert set(r.scores) == set(SCORE_NAMES) and all(0.0 < v < 1.0 for v in r.scores.values())
        assert set(r.heatmaps) == set(HEATMAP_NAMES)
        for hm in r.heatmaps.values():
            assert hm.shape == (s, s) and hm.dtype == np.float32 and hm.min() >= 0.0 and hm.max() <= 1.0
        assert isinstance(r.keyword_sequence, str) and isinstance(r.misaligned_keywords, list)


def test_output_options_agree_with_full_output(scorer, images):
    full = scorer.score("a red cat", images)
    only = scorer.score("a red cat", images, scores_only=True)
    impl = scorer.score("a red cat", images, heatmaps=("implausibility",), keywords=False)
    for f, o, i in zip(full, only, impl):
        assert o.heatmaps == {} and o.keyword_sequence is None and o.misaligned_keywords == []
        assert set(i.heatmaps) == {"implausibility"} and i.keyword_sequence is None
        for n in SCORE_NAMES:
            assert abs(f.scores[n] - o.scores[n]) < 1e-5 and abs(f.scores[n] - i.scores[n]) < 1e-5
        np.testing.assert_allclose(i.heatmaps["implausibility"], f.heatmaps["implausibility"], atol=1e-5)


def test_heatmaps_at_each_images_own_size(scorer, images):
    results = scorer.score("a cat", images, heatmap_size="image")
    for img, r in zip(images, results):
        for hm in r.heatmaps.values():
            assert hm.shape == (img.height, img.width) and hm.min() >= 0.0 and hm.max() <= 1.0


def test_batch_size_does_not_change_results(tiny, images):
    model, processor = tiny
    prompts = ["a cat", "two dogs on a very long and winding road at night", "x"]
    one = RAHFScorer(model, processor, batch_size=1).score(prompts, images)
    three = RAHFScorer(model, processor, batch_size=3).score(prompts, images)
    for a, b in zip(one, three):
        for n in SCORE_NAMES:
            assert abs(a.scores[n] - b.scores[n]) < 1e-5
        for n in HEATMAP_NAMES:
            np.testing.assert_allclose(a.heatmaps[n], b.heatmaps[n], atol=1e-5)
        assert a.keyword_sequence == b.keyword_sequence


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_close_to_fp32(tiny_multi, images, dtype):
    model, processor = tiny_multi
    ref = RAHFScorer(model, processor).score("a red cat", images, keywords=False)
    low = RAHFScorer(model, processor, dtype=dtype).score("a red cat", images, keywords=False)
    for a, b in zip(ref, low):
        for n in SCORE_NAMES:
            assert abs(a.scores[n] - b.scores[n]) < 0.02
        for n in HEATMAP_NAMES:
            assert b.heatmaps[n].dtype == np.float32
            assert np.abs(a.heatmaps[n] - b.heatmaps[n]).max() < 0.05


def test_prompt_and_image_counts_must_agree(scorer, images):
    with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
        scorer.score(["a", "b"], images)
    with pytest.raises(TypeError, match="prompts must be str"):
        scorer.score(["a", None, "c"], images)  # type: ignore[list-item]


def test_bad_options_rejected(scorer, images):
    with pytest.raises(ValueError, match="unknown heatmaps"):
        scorer.score("a", images, heatmaps=("artifacts",))
    with pytest.raises(ValueError, match="heatmap_size"):
        scorer.score("a", images, heatmap_size="big")
    with pytest.raises(ValueError, match="dtype"):
        RAHFScorer(scorer.model, scorer.processor, dtype="int8")


def test_bad_image_in_a_batch(scorer, images, tmp_path):
    good = io.BytesIO()
    images[0].save(good, format="PNG")
    batch = [images[0], b"not an image", good.getvalue(), tmp_path / "missing.png", Image.new("CMYK", (5, 5))]
    with pytest.raises(InvalidImageError, match="image 1"):
        scorer.score("a cat", batch)
    results = scorer.score("a cat", batch, errors="return")
    assert [type(r).__name__ for r in results] == [
        "RichFeedback",
        "ScoringFailure",
        "RichFeedback",
        "ScoringFailure",
        "RichFeedback",
    ]
    assert isinstance(results[1], ScoringFailure) and results[1].index == 1 and "decode" in results[1].error
    assert "missing.png" in results[3].error
    # The same image as PIL and as encoded bytes scores the same.
    assert abs(results[0].scores["overall"] - results[2].scores["overall"]) < 1e-6


def test_edge_prompts(scorer, images):
    empty, long = scorer.score(["", "a red cat " * 100], images[:2])
    assert empty.misaligned_keywords == [] or all(isinstance(k, str) for k in empty.misaligned_keywords)
    assert not empty.prompt_truncated and long.prompt_truncated
    assert all(0.0 < v < 1.0 for v in long.scores.values())


def test_from_pretrained_folder(tiny, images, tmp_path):
    model, processor = tiny
    RAHFScorer(model, processor).save_pretrained(tmp_path)
    a = RAHFScorer(model, processor).score("a cat", images, keywords=False)
    b = RAHFScorer.from_pretrained(tmp_path).score("a cat", images, keywords=False)
    for x, y in zip(a, b):
        assert x.scores == y.scores


def test_from_pretrained_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        RAHFScorer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a local RAHF folder"):
        RAHFScorer.from_pretrained("someone/no-such-rahf-model")
