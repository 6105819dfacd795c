"""Pairing RichHF-18K labels with a local Pick-a-Pic copy: kept, skipped and counted, never truncated."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from rahf.data.richhf import RichHFExample, write_richhf
from rahf.data.sources import ImageFolderSource, make_split_folder, read_prompts
from rahf.evaluate import load_ground_truth


def labels(uid: str, n_words: int) -> RichHFExample:
    maps = {n: np.zeros((16, 16), np.float32) for n in ("implausibility", "misalignment")}
    scores = dict.fromkeys(("plausibility", "alignment", "aesthetics", "overall"), 0.5)
    return RichHFExample(f"train/{uid}.png", scores, maps, [1] * n_words)


def test_make_split_folder_pairs_and_counts(tmp_path):
    from PIL import Image

    pics = tmp_path / "pickapic" / "sub"
    pics.mkdir(parents=True)
    for uid in ("u1", "u2", "u3"):
        Image.new("RGB", (8, 8)).save(pics / f"{uid}.jpg")
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"uid": "u1", "caption": "a red cat"})
        + "\n"
        + json.dumps({"uid": "u2", "prompt": "two dogs, running"})
        + "\n"
        + json.dumps({"uid": "u4", "caption": "no image for me"})
        + "\n"
    )
    write_richhf(
        tmp_path / "train.tfrecord",
        [labels("u1", 3), labels("u2", 5), labels("u3", 2), labels("u4", 4), labels("u5", 1)],
    )
    images = ImageFolderSource(tmp_path / "pickapic")
    report = make_split_folder(
        tmp_path / "train.tfrecord", images, read_prompts(tmp_path / "captions.jsonl"), tmp_path / "split", "train"
    )
    assert report == {"kept": 1, "missing_image": 2, "missing_prompt": 1, "word_count_mismatch": 1}
    gt = load_ground_truth(tmp_path / "split", "train")
    assert gt.uids == ["u1"] and gt.prompts == ["a red cat"] and gt.images[0].is_file()


def test_sources_reject_ambiguous_and_malformed_input(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    shutil.copy(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png")
    with pytest.raises(ValueError, match="two images share the uid 'x'"):
        ImageFolderSource(tmp_path)
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "bad.jsonl").write_text('{"uid": "x", "caption": "ok"}\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")
