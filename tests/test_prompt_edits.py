"""benchmarks/prompt_edits.py: a model's alignment score with its own prompt and with one-word edits of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.prompt_edits import class_name, edits_of, main, new_word, summarise
from common.names import HEATMAP_NAMES, SCORE_NAMES
from common.records import RichFeedback
from rahf.data.synthetic import SWAP_CLASSES
from rahf.words import load_swap_classes, prompt_words
from tests.conftest import save_tiny_rahf, synthetic_split_folder

CLASSES = [list(c) for c in SWAP_CLASSES]


def test_edits_change_one_word_within_its_class_and_are_the_same_for_the_same_seed():
    prompts = ["two red circles at the left", "a blue square in the middle", "a green diamond at the top"]
    edits = edits_of(prompts, CLASSES, seed=3)
    # prompt 0 has a colour, a plural shape and a count; prompts 1 and 2 a colour and a singular shape
    assert [(i, c) for i, c, _ in edits] == [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1)]
    for i, c, edited in edits:
        own, new = prompt_words(prompts[i]), prompt_words(edited)
        changed = [k for k in range(len(own)) if own[k] != new[k]]
        assert len(changed) == 1 and own[changed[0]] in CLASSES[c] and new[changed[0]] in CLASSES[c]
        assert new_word(prompts[i], edited) == new[changed[0]]
    assert edits == edits_of(prompts, CLASSES, seed=3)
    assert edits != edits_of(prompts, CLASSES, seed=4)
    assert class_name(CLASSES[0]) == "red/green…" and class_name(["two", "three"]) == "two/three"


def _fb(prompt: str, alignment: float, peak: float, marked: list[str]) -> RichFeedback:
    scores = dict.fromkeys(SCORE_NAMES, 0.5) | {SCORE_NAMES[1]: alignment}
    heat = np.zeros((4, 4), np.float32)
    heat[1, 2] = peak
    return RichFeedback(prompt, scores, {HEATMAP_NAMES[1]: heat}, marked)


def test_summary_rows_hold_the_means_drop_share_lower_and_marked_words():
    own = "a red circle at the left"
    pairs = [
        (0, _fb(own, 0.9, 0.1, []), _fb("a blue circle at the left", 0.6, 0.8, ["blue"])),
        (0, _fb(own, 0.8, 0.2, []), _fb("a green circle at the left", 0.8, 0.4, ["circle"])),  # tie, other word
        (0, _fb(own, 0.7, 0.0, []), _fb("a black circle at the left", 0.9, 0.0, ["Black"])),  # scores higher
    ]
    table = summarise(pairs, n_classes=2)
    np.testing.assert_allclose(table[0], [3, 0.8, 0.7667, 0.0333, 0.5, 2 / 3, 0.1, 0.4], atol=1e-4)
    assert np.isnan(table[1]).all()  # no edit of the second class


def test_swap_classes_load_by_name_or_from_a_file_and_a_bad_file_is_named(tmp_path):
    assert load_swap_classes("synthetic") == CLASSES
    good = tmp_path / "classes.json"
    good.write_text(json.dumps([["cat", "dog"]]))
    assert load_swap_classes(str(good)) == [["cat", "dog"]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"colours": ["red"]}))
    with pytest.raises(ValueError, match=r"bad\.json: want a JSON list of lists"):
        load_swap_classes(str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text('[["red", "blue"')
    with pytest.raises(ValueError, match=r"broken\.json: not JSON"):
        load_swap_classes(str(broken))


def test_command_scores_every_edit_of_the_fully_aligned_images(tmp_path_factory, tmp_path, capsys):
    from rahf.data.richhf import RichHFSplit

    data = synthetic_split_folder(tmp_path_factory, "synth-edits", {"test": 30}, seed=8)
    records = RichHFSplit(data, "test")
    aligned = [r.prompt for r in records if all(x == 1 for x in r.example.word_labels)]
    assert 0 < len(aligned) < len(records)  # the split has flawed images, which are left out
    want = [sum(1 for _, c, _ in edits_of(aligned, CLASSES, 0) if c == k) for k in range(len(CLASSES))]
    model_dir = save_tiny_rahf(tmp_path / "model")
    out = tmp_path / "edits.md"
    assert main(["--data", str(data), "--model", f"tiny={model_dir}", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = {r.split(" | ")[1]: r.split(" | ") for r in text.splitlines() if r.startswith("| tiny |")}
    assert {name: int(r[2]) for name, r in rows.items()} == {class_name(c): n for c, n in zip(CLASSES, want) if n}
    for r in rows.values():
        own, edited, drop, lower = map(float, r[3:7])
        assert drop == pytest.approx(own - edited, abs=2e-3) and 0.0 <= lower <= 1.0


def test_command_refuses_a_malformed_classes_file(tmp_path, capsys):
    bad = tmp_path / "classes.json"
    bad.write_text("[1, 2]")
    assert main(["--data", str(tmp_path), "--model", "x", "--classes", str(bad)]) == 2
    assert "--classes:" in capsys.readouterr().err


def test_model_specs_are_named_by_their_name_or_their_folder():
    from benchmarks import named_models

    assert named_models(["a=runs/x/best", "runs/y/best", "b=c=d"]) == [
        ("a", "runs/x/best"),
        ("best", "runs/y/best"),
        ("b", "c=d"),  # only the first "=" splits
    ]
