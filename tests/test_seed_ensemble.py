"""benchmarks/seed_ensemble.py: the mean of several models' predictions, keywords by majority vote."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.seed_ensemble import ensemble, main, vote_keywords
from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.evaluate import Predictions


def test_a_word_is_marked_when_more_than_half_of_the_models_mark_it():
    prompt = "two red cats on a mat"
    seqs = ["two red_0 cats on a mat", "two_0 red_0 cats on a mat", "two red cats_0 on a mat"]
    assert vote_keywords(prompt, seqs) == "two red_0 cats on a mat"  # red 2 of 3; two and cats 1 of 3
    assert vote_keywords(prompt, seqs[:2]) == "two red_0 cats on a mat"  # 2 of 2 marks red; 1 of 2 is no majority
    # a sequence that drops a word still votes for the words it shares with the prompt
    assert vote_keywords(prompt, ["red_0 cats on a mat", "two red_0 cats on mat"]) == "two red_0 cats on a mat"


def test_scores_and_maps_are_averaged_per_example():
    def pred(value: float, seq: str) -> Predictions:
        scores = {n: np.array([value, 2 * value]) for n in SCORE_NAMES}
        maps = {n: np.full((2, 4, 4), value) for n in HEATMAP_NAMES}
        return Predictions(scores=scores, heatmaps=maps, sequences=[seq, "a b"])

    mean = ensemble([pred(0.2, "a_0 b"), pred(0.6, "a_0 b"), pred(0.4, "a b")], ["a b", "a b"])
    for n in SCORE_NAMES:
        np.testing.assert_allclose(mean.scores[n], [0.4, 0.8])
    for n in HEATMAP_NAMES:
        assert mean.heatmaps[n].shape == (2, 4, 4)
        np.testing.assert_allclose(mean.heatmaps[n], 0.4)
    assert mean.sequences == ["a_0 b", "a b"]
    with pytest.raises(ValueError, match="no predictions"):
        ensemble([], [])


def test_the_command_wants_two_named_models(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--data", "x", "--model", "a=dir", "--out", "o"])
    assert exit_.value.code == 2 and "two or more --model NAME=DIR" in capsys.readouterr().err


def test_models_of_different_map_sizes_are_refused():
    def pred(side: int) -> Predictions:
        return Predictions(
            scores={n: np.zeros(1) for n in SCORE_NAMES},
            heatmaps={n: np.zeros((1, side, side)) for n in HEATMAP_NAMES},
            sequences=["a"],
        )

    with pytest.raises(ValueError, match=r"heatmaps differ in shape .*one resolution"):
        ensemble([pred(4), pred(8)], ["a"])


def test_a_model_that_does_not_load_is_named_and_nothing_is_written(tmp_path, capsys):
    from rahf.data.synthetic import write_split

    write_split(tmp_path / "data", "test", 2, size=32, seed=0)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    out = tmp_path / "out"
    args = ["--data", str(tmp_path / "data"), "--model", f"a={tmp_path / 'missing'}", "--model"]
    assert main([*args, f"b={tmp_path / 'broken'}", "--out", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "model a (" in err and "does not load" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--data", "x", "--model", "a=d1", "--model", "a=d2", "--out", str(out)])
    assert exit_.value.code == 2 and "names must differ" in capsys.readouterr().err
