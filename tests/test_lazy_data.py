"""Lazy split reading: the same examples as an eager read, memory flat in the split's size, clear errors."""

from __future__ import annotations

import gc
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from rahf.data.richhf import RichHFFormatError, RichHFSplit, example_features, read_richhf, read_split
from rahf.data.synthetic import generate
from rahf.data.tfrecord import TFRecordError, encode_example, iter_records, read_record_at, write_records
from rahf.presets import build_rahf
from rahf.train import _resize_map, load_split
from rahf.words import prompt_words


def write_folder(folder: Path, split: str, n: int, map_size: int = 64, seed: int = 0) -> Path:
    """A split folder of ``n`` synthetic examples (64 px images) whose maps are stored at ``map_size``²."""
    (folder / split).mkdir(parents=True, exist_ok=True)
    examples, rows = [], []
    factor = map_size // 64
    for sample in generate(n, size=64, seed=seed, split=split):
        ex = sample.example
        ex.heatmaps = {k: np.kron(v, np.ones((factor, factor), np.float32)) for k, v in ex.heatmaps.items()}
        sample.image.save(folder / ex.filename)
        examples.append(ex)
        rows.append({"uid": ex.uid, "image": ex.filename, "prompt": sample.prompt})
    write_records(folder / f"{split}.tfrecord", [encode_example(example_features(ex)) for ex in examples])
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / f"{split}.tfrecord"


def eager_read(data_dir: Path, split: str) -> tuple[list, int]:
    """The reference: every example decoded up front, paired with its row as the old reader did."""
    rows = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]
    by_uid = {r["uid"]: r for r in rows}
    out, skipped = [], 0
    for ex in read_richhf(data_dir / f"{split}.tfrecord"):
        row = by_uid.get(ex.uid)
        if row is None or len(prompt_words(row["prompt"])) != len(ex.word_labels):
            skipped += 1
            continue
        out.append((ex, row["prompt"], data_dir / row["image"]))
    return out, skipped


@pytest.fixture
def folder(tmp_path) -> Path:
    write_folder(tmp_path, "train", 12)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    rows[3]["prompt"] += " extra words"  # word count no longer matches the labels: skipped
    del rows[7]  # no row: skipped
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_lazy_split_returns_exactly_the_eager_examples_in_order(folder):
    split, skipped = read_split(folder, "train")
    want, want_skipped = eager_read(folder, "train")
    assert isinstance(split, RichHFSplit)
    assert (len(split), skipped, split.skipped) == (len(want), want_skipped, want_skipped) == (10, 2, 2)
    for i, rec in enumerate(split):  # iteration, then indexing (twice: decoding is repeatable)
        for got in (rec, split[i], split[i - len(split)]):
            ex, prompt, image = want[i]
            assert (got.example.filename, got.example.scores, got.example.word_labels) == (
                ex.filename,
                ex.scores,
                ex.word_labels,
            )
            assert (got.prompt, got.image) == (prompt, image)
            assert got.example.heatmaps.keys() == ex.heatmaps.keys()
            for k in ex.heatmaps:
                np.testing.assert_array_equal(got.example.heatmaps[k], ex.heatmaps[k])
                assert got.example.heatmaps[k].dtype == np.float32
    assert [r.example.uid for r in split[2:5]] == [w[0].uid for w in want[2:5]]
    assert split.prompts == [w[1] for w in want]
    with pytest.raises(IndexError):
        split[len(split)]


def test_holding_a_split_keeps_offsets_and_no_maps(tmp_path):
    def retained(data_dir: Path) -> tuple[RichHFSplit, int]:
        # Only memory allocated under the reader's own frames counts: threads that earlier tests leave running
        # (servers, pools) allocate at the same time and would otherwise be charged to the split.
        gc.collect()
        tracemalloc.start(64)
        split, _ = read_split(data_dir, "train")
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*/rahf/data/*", all_frames=True)]
        )
        tracemalloc.stop()
        return split, sum(stat.size for stat in snapshot.statistics("filename"))

    write_folder(tmp_path / "small", "train", 4, map_size=512)
    write_folder(tmp_path / "large", "train", 36, map_size=512)
    small, held_small = retained(tmp_path / "small")
    large, held_large = retained(tmp_path / "large")
    assert (len(small), len(large)) == (4, 36)
    assert large.offsets.dtype == np.int64 and large.offsets.shape == (36,)
    assert large.offsets[0] == 0 and np.all(np.diff(large.offsets) > 0)
    arrays = [v for v in vars(large).values() if isinstance(v, (np.ndarray, torch.Tensor))]
    assert [a.shape for a in arrays] == [(36,), (36,)]  # offsets and record numbers; no map is held
    one_example_maps = 2 * 512 * 512 * 4  # what an eager reader holds per example: 2 MiB
    assert held_large > held_small > 0  # the filter sees the reader's allocations
    per_record = (held_large - held_small) / 32
    assert per_record < 1024, per_record  # prompt, image name and offset: a few hundred bytes
    assert held_large < one_example_maps / 4, held_large
    assert large[35].example.heatmaps["implausibility"].shape == (512, 512)  # the maps are there on demand


def test_a_record_damaged_after_indexing_names_the_file_and_offset(folder):
    split, _ = read_split(folder, "train")
    path = folder / "train.tfrecord"
    offset = int(split.offsets[4])
    data = bytearray(path.read_bytes())
    data[offset + 12 + 40] ^= 0xFF  # a byte inside record 4's payload
    path.write_bytes(bytes(data))
    assert split[3].example.uid  # its neighbours still read
    with pytest.raises(TFRecordError, match=rf"{re.escape(str(path))}: data checksum mismatch .* byte {offset}\b"):
        split[4]
    with pytest.raises(TFRecordError, match=rf"byte {offset}\b"):  # indexing a damaged file names it too
        read_split(folder, "train")


def test_read_record_at_checks_framing_and_iter_records_gives_offsets(tmp_path):
    path = tmp_path / "r.tfrecord"
    write_records(path, [b"a" * 10, b"bb", b"c" * 300])
    pairs = list(iter_records(path))
    assert [o for o, _ in pairs] == [0, 26, 26 + 18]
    assert [read_record_at(path, o) for o, _ in pairs] == [d for _, d in pairs] == [b"a" * 10, b"bb", b"c" * 300]
    with open(path, "rb") as handle:  # one open file for several reads
        assert read_record_at(path, 26, handle) == b"bb"
    with pytest.raises(TFRecordError, match=r"length checksum mismatch at byte 5\b"):
        read_record_at(path, 5)
    with pytest.raises(TFRecordError, match=r"r\.tfrecord: no record at byte 400, the file ends at byte 360"):
        read_record_at(path, 400)
    with pytest.raises(TFRecordError, match=r"truncated record header at byte 355\b"):
        read_record_at(path, 355)


def test_a_bad_map_in_a_valid_record_names_file_record_offset_and_field(tmp_path):
    write_folder(tmp_path, "train", 3)
    path = tmp_path / "train.tfrecord"
    examples = list(read_richhf(path))
    features = [example_features(ex) for ex in examples]
    features[2]["misalignment_map"] = [b"not a png"]
    write_records(path, [encode_example(f) for f in features])
    split, _ = read_split(tmp_path, "train")  # indexing reads names and labels, not maps
    offset = int(split.offsets[2])
    with pytest.raises(RichHFFormatError, match=rf"train\.tfrecord record 2 at byte {offset}: misalignment_map"):
        split[2]


def test_training_batches_equal_the_eager_tensors_and_hold_nothing(tmp_path):
    write_folder(tmp_path, "train", 6, map_size=128)
    processor = build_rahf("rahf-tiny", seed=0)[1]
    data = load_split(tmp_path, "train", processor)
    want, _ = eager_read(tmp_path, "train")
    index = torch.tensor([4, 0, 2])
    batch = data.batch(index)
    for j, i in enumerate(index.tolist()):
        ex, prompt, image = want[i]
        torch.testing.assert_close(batch.pixels[j], processor.preprocess_image(image), rtol=0, atol=0)
        for k in ex.heatmaps:
            torch.testing.assert_close(batch.heatmaps[k][j], _resize_map(ex.heatmaps[k], 64), rtol=0, atol=0)
        for k, v in ex.scores.items():
            assert batch.scores[k][j].item() == pytest.approx(v, abs=1e-7)
        assert batch.prompts[j] == prompt
        assert batch.targets[j] == processor.keyword_target(prompt, ex.word_labels)
    assert batch.pixels.shape == (3, 3, 64, 64) and batch.heatmaps["misalignment"].shape == (3, 64, 64)
    held = [k for k, v in vars(data).items() if isinstance(v, (np.ndarray, torch.Tensor, list, dict))]
    assert held == [], held  # nothing decoded is kept between batches
    # the whole-split tensors of the old eager loader are still there for small in-memory users (baselines)
    assert data.pixels.shape == (6, 3, 64, 64) and data.scores["overall"].shape == (6,)
    torch.testing.assert_close(data.heatmaps["implausibility"][index], batch.heatmaps["implausibility"])
