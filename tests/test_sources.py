"""Pairing RichHF-18K labels with a local Pick-a-Pic copy: kept, skipped and counted, never truncated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.data.richhf import RichHFExample, write_richhf
from rahf.data.sources import (
    NO_IMAGE_BYTES,
    UID_NOT_A_FILE_NAME,
    UNDECODABLE_IMAGE,
    ImageFolderSource,
    ParquetSource,
    make_split_folder,
    read_prompts,
)
from rahf.evaluate import load_ground_truth


def labels(uid: str, n_words: int) -> RichHFExample:
    maps = {n: np.zeros((16, 16), np.float32) for n in HEATMAP_NAMES}
    scores = dict.fromkeys(SCORE_NAMES, 0.5)
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


# ---------------------------------------------------------------------------------------------------------
# ParquetSource: a Pick-a-Pic v2 style dump with embedded image bytes
# ---------------------------------------------------------------------------------------------------------

COLOURS = {"u1": (255, 0, 0), "u2": (0, 255, 0), "u3": (0, 0, 255), "u6": (255, 255, 0), "u8": (0, 255, 255)}


def encoded(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_dump(root):
    """Two files: raw-bytes columns in row groups of 2 rows, and the ``datasets`` Image struct layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = {uid: encoded(c) for uid, c in COLOURS.items()}
    green_jpeg = encoded(COLOURS["u2"], "JPEG")
    root.mkdir()
    raw = {
        "caption": ["a red cat", "two dogs, running", "a broken one", None],
        "image_0_uid": ["u1", "u3", "u4", None],
        "jpg_0": [png["u1"], png["u3"], b"not an image", png["u8"]],
        "image_1_uid": ["u2", "u1", "u5", "u8"],
        "jpg_1": [green_jpeg, png["u1"], None, png["u8"]],
    }
    pq.write_table(pa.table(raw), root / "part-0.parquet", row_group_size=2)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    dumped = {
        "caption": ["a yellow bird flying", "ignored caption"],
        "image_0_uid": ["u6", "u7"],
        "jpg_0": pa.array([{"bytes": png["u6"], "path": "u6.png"}, {"bytes": None, "path": "u7.png"}], image),
        "image_1_uid": ["u2", "u8"],
        "jpg_1": pa.array([{"bytes": encoded((9, 9, 9)), "path": "u2.png"}, {"bytes": png["u8"], "path": None}], image),
    }
    pq.write_table(pa.table(dumped), root / "part-1.parquet")
    return png, green_jpeg


@pytest.fixture
def read_spy(monkeypatch):
    """Records (file name, row group, columns) of every ParquetFile.read_row_group call."""
    import pyarrow.parquet as pq

    calls = []
    init, read_row_group = pq.ParquetFile.__init__, pq.ParquetFile.read_row_group

    def spy_init(self, source, *args, **kwargs):
        self.spy_name = Path(source).name
        init(self, source, *args, **kwargs)

    def spy_read(self, i, columns=None, **kwargs):
        calls.append((self.spy_name, i, tuple(columns)))
        return read_row_group(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", spy_init)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy_read)
    return calls


def test_parquet_source_looks_up_images_and_captions(tmp_path):
    png, green_jpeg = write_dump(tmp_path / "dump")
    src = ParquetSource(tmp_path / "dump")
    assert len(src) == 8 and "u5" in src and "u9" not in src and src.images_without_uid == 1
    assert src.captions == {
        "u1": "a red cat",
        "u2": "a red cat",
        "u3": "two dogs, running",
        "u4": "a broken one",
        "u5": "a broken one",
        "u6": "a yellow bird flying",
        "u7": "ignored caption",
        "u8": "ignored caption",
    }
    assert src.image_bytes("u1") == png["u1"] and src.image_bytes("u6") == png["u6"]
    assert np.asarray(src.image("u3"))[0, 0].tolist() == [0, 0, 255]
    # u1 repeats with the same bytes (not a duplicate); u2's second row (struct file) differs: the first is kept
    assert src.image_bytes("u2") == green_jpeg and src.duplicates == {"u2"}
    assert np.abs(np.asarray(src.image("u2")).astype(int) - [0, 255, 0]).max() < 8
    with pytest.raises(KeyError):
        src.image_bytes("u9")
    for uid, reason in (("u4", UNDECODABLE_IMAGE), ("u5", NO_IMAGE_BYTES), ("u7", NO_IMAGE_BYTES)):
        with pytest.raises(ValueError, match=f"uid {uid!r} is unusable: {reason}"):
            src.image_bytes(uid)
    assert src.skip_counts() == {UNDECODABLE_IMAGE: 1, NO_IMAGE_BYTES: 2}
    files = src.image_files(["u8", "u4", "u1", "u9", "u1"], tmp_path / "out")
    assert files == {"u1": tmp_path / "out" / "u1.png", "u8": tmp_path / "out" / "u8.png"}
    assert files["u8"].read_bytes() == png["u8"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "u1.png",
        "u8.png",
    ]


def test_parquet_source_reads_only_the_row_groups_it_needs(tmp_path, read_spy):
    write_dump(tmp_path / "dump")
    src = ParquetSource(str(tmp_path / "dump" / "*.parquet"))
    index = ("image_0_uid", "image_1_uid", "caption")
    assert read_spy == [("part-0.parquet", 0, index), ("part-0.parquet", 1, index), ("part-1.parquet", 0, index)]
    assert "PNG" in repr({"u1": encoded((0, 0, 0))}) and "PNG" not in repr(vars(src))  # no image bytes held
    read_spy.clear()
    assert src.image_files(["u3"], tmp_path / "out").keys() == {"u3"}
    assert read_spy == [("part-0.parquet", 0, ("jpg_0",))]
    read_spy.clear()
    src.image_bytes("u1")  # rows 0 and 1 of row group 0: one read of both image columns
    assert read_spy == [("part-0.parquet", 0, ("jpg_0", "jpg_1"))]
    read_spy.clear()
    src.image_bytes("u2")  # the duplicate check reads the other file's row too
    assert read_spy == [("part-0.parquet", 0, ("jpg_1",)), ("part-1.parquet", 0, ("jpg_1",))]
    read_spy.clear()
    first_only = ParquetSource(tmp_path / "dump" / "part-0.parquet", check_duplicates=False)
    read_spy.clear()
    first_only.image_bytes("u8")
    assert read_spy == [("part-0.parquet", 1, ("jpg_1",))] and first_only.duplicates == set()


def test_make_split_folder_same_from_parquet_and_image_folder(tmp_path):
    from PIL import Image

    png, green_jpeg = write_dump(tmp_path / "dump")
    folder = tmp_path / "pickapic"
    folder.mkdir()
    for uid in ("u1", "u3", "u6"):
        (folder / f"{uid}.png").write_bytes(png[uid])
    (folder / "u2.jpg").write_bytes(green_jpeg)
    (folder / "u4.png").write_bytes(b"not an image")
    write_richhf(
        tmp_path / "train.tfrecord",
        [labels("u1", 3), labels("u2", 3), labels("u3", 3), labels("u4", 3), labels("u9", 2), labels("u6", 2)],
    )
    parquet = ParquetSource(tmp_path / "dump")
    folder_source = ImageFolderSource(folder)
    reports, truths = [], []
    for name, images in (("from_parquet", parquet), ("from_folder", folder_source)):
        reports.append(
            make_split_folder(tmp_path / "train.tfrecord", images, parquet.captions, tmp_path / name, "train")
        )
        truths.append(load_ground_truth(tmp_path / name, "train"))
    assert reports[0] == reports[1] == {"kept": 3, "missing_image": 2, "missing_prompt": 0, "word_count_mismatch": 1}
    assert parquet.skipped == folder_source.skipped == {"u4": UNDECODABLE_IMAGE}
    a, b = truths
    assert a.uids == b.uids == ["u1", "u2", "u3"] and a.prompts == b.prompts
    assert [p.relative_to(tmp_path / "from_parquet").as_posix() for p in a.images] == [
        "train/u1.png",
        "train/u2.jpg",
        "train/u3.png",
    ]
    assert [p.read_bytes() for p in a.images] == [p.read_bytes() for p in b.images]
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q))) for p, q in zip(a.images, b.images))
    for name in ("from_parquet", "from_folder"):
        assert (tmp_path / name / "train.tfrecord").read_bytes() == (tmp_path / "train.tfrecord").read_bytes()


def test_parquet_source_rejects_bad_input(tmp_path, monkeypatch):
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    write_dump(tmp_path / "dump")
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        ParquetSource(tmp_path / "nope" / "*.parquet")
    with pytest.raises(ValueError, match="no column 'prompt'"):
        ParquetSource(tmp_path / "dump", caption_column="prompt")
    pq.write_table(pa.table({"uid": ["a"], "image": ["a.png"]}), tmp_path / "paths.parquet")
    with pytest.raises(ValueError, match="column 'image' must hold image bytes"):
        ParquetSource(tmp_path / "paths.parquet", image_columns=[("uid", "image")], caption_column=None)
    pq.write_table(
        pa.table({"uid": ["a", "../b"], "image": [encoded((1, 2, 3)), encoded((1, 2, 3))]}), tmp_path / "u.parquet"
    )
    custom = ParquetSource(tmp_path / "u.parquet", image_columns=[("uid", "image")], caption_column=None)
    assert custom.captions == {} and custom.image_files(["a", "../b"], tmp_path / "o").keys() == {"a"}
    assert custom.skipped == {"../b": UID_NOT_A_FILE_NAME}
    # rahf.data stays importable without pyarrow; ParquetSource then names the extra to install
    code = (
        "import sys, rahf.data, rahf.data.sources; assert 'pyarrow' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"richfeedback\[parquet\]"):
        ParquetSource(tmp_path / "dump")


def test_make_split_folder_names_skips_refuses_under_strict_and_writes_absolute_paths(tmp_path):
    from PIL import Image

    from rahf.data.sources import MissingImagesError

    (tmp_path / "pics").mkdir()
    for uid in ("u1", "u3", "u5"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "pics" / f"{uid}.png")
    (tmp_path / "pics" / "u4.png").write_bytes(b"not an image")
    write_richhf(tmp_path / "train.tfrecord", [labels(u, 2) for u in ("u1", "u2", "u3", "u4", "u5")])
    prompts = {"u1": "red cat", "u2": "two dogs", "u3": "a b c", "u4": "big box"}
    images = ImageFolderSource(tmp_path / "pics")
    with pytest.raises(MissingImagesError, match=r"2 of 5 examples: u2, u4") as refused:
        make_split_folder(tmp_path / "train.tfrecord", images, prompts, tmp_path / "strict", "train", strict=True)
    assert refused.value.report.uids["missing_image"] == ["u2", "u4"] and not (tmp_path / "strict").exists()

    report = make_split_folder(
        tmp_path / "train.tfrecord", images, prompts, tmp_path / "split", "train", paths="absolute"
    )
    assert report == {"kept": 1, "missing_image": 2, "missing_prompt": 1, "word_count_mismatch": 1}
    assert report.labelled == 5
    assert report.uids == {"missing_image": ["u2", "u4"], "missing_prompt": ["u5"], "word_count_mismatch": ["u3"]}
    row = json.loads((tmp_path / "split" / "train.jsonl").read_text())
    assert row["image"] == str((tmp_path / "pics" / "u1.png").resolve())
    with pytest.raises(ValueError, match="paths must be"):
        make_split_folder(tmp_path / "train.tfrecord", images, prompts, tmp_path / "s2", "train", paths="cwd")
    with pytest.raises(ValueError, match="would be overwritten"):
        make_split_folder(tmp_path / "train.tfrecord", images, prompts, tmp_path, "train")
