"""RichHF-18K records: typed examples, their TFRecord schema, and annotation consolidation (paper §3.2).

Schema of one ``tf.train.Example`` (github google-research-datasets/richhf-18k):

==============================  ==========================================================================
``filename``                    bytes, e.g. ``train/<uid>.png``; the uid keys the Pick-a-Pic v1 image
``artifact_score``              float in [0, 1] — our ``plausibility`` (higher is better)
``misalignment_score``          float in [0, 1] — our ``alignment``
``aesthetics_score``            float in [0, 1]
``overall_score``               float in [0, 1]
``artifact_map``                bytes: 512×512 8-bit PNG, 0..255 — our ``implausibility`` heatmap
``misalignment_map``            bytes: 512×512 8-bit PNG, 0..255
``prompt_misalignment_label``   bytes: space-separated 0/1 per cleaned prompt word; 0 = misaligned
==============================  ==========================================================================
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, overload

import numpy as np
from PIL import Image

from rahf.data.tfrecord import decode_example, encode_example, iter_records, read_record_at, read_records, write_records
from rahf.words import prompt_words

SCORE_FEATURES = {
    "plausibility": "artifact_score",
    "alignment": "misalignment_score",
    "aesthetics": "aesthetics_score",
    "overall": "overall_score",
}
MAP_FEATURES = {"implausibility": "artifact_map", "misalignment": "misalignment_map"}
LABEL_FEATURE = "prompt_misalignment_label"
POINT_KINDS = {"implausible": "implausibility", "misaligned": "misalignment"}


class RichHFFormatError(ValueError):
    """A record that does not follow the RichHF-18K schema; the message names the record and the field."""


@dataclass
class RichHFExample:
    """One RichHF-18K example. Maps (H, W) float32 in [0, 1]; scores in [0, 1]; word labels 1 = aligned."""

    filename: str
    scores: dict[str, float]
    heatmaps: dict[str, np.ndarray]
    word_labels: list[int] = field(default_factory=list)

    @property
    def uid(self) -> str:
        """The Pick-a-Pic image uid: the filename's stem."""
        return PurePosixPath(self.filename).stem


# ---------------------------------------------------------------------------------------------------------
# Schema <-> typed examples
# ---------------------------------------------------------------------------------------------------------


def _png_to_map(data: bytes, where: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises several types for bad bytes
        raise RichHFFormatError(f"{where}: not a decodable PNG: {err}") from err
    arr = np.asarray(img.convert("L") if img.mode not in ("L", "I;16") else img)
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return (arr.astype(np.float32) / scale).astype(np.float32)


def _map_to_png(heatmap: np.ndarray) -> bytes:
    arr = np.asarray(heatmap, dtype=np.float64)
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ValueError(f"heatmaps must be finite (H, W) arrays, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parse_fields(features: dict, where: str) -> tuple[str, dict[str, float], list[int]]:
    """Filename, scores and word labels of decoded features (everything but the maps), schema-checked."""

    def one(name: str) -> object:
        values = features.get(name)
        if not values:
            raise RichHFFormatError(f"{where}: missing feature {name!r}")
        return values[0]

    filename = one("filename")
    if not isinstance(filename, bytes):
        raise RichHFFormatError(f"{where}: 'filename' must be bytes")
    scores = {}
    for ours, theirs in SCORE_FEATURES.items():
        value = one(theirs)
        if not isinstance(value, float) or not 0.0 <= value <= 1.0:
            raise RichHFFormatError(f"{where}: {theirs!r} must be a float in [0, 1], got {value!r}")
        scores[ours] = value
    for theirs in MAP_FEATURES.values():
        one(theirs)
    labels_raw = features.get(LABEL_FEATURE) or [b""]
    try:
        labels = [int(t) for t in labels_raw[0].decode("utf-8").split()]
    except (UnicodeDecodeError, ValueError) as err:
        raise RichHFFormatError(f"{where}: {LABEL_FEATURE!r} must be space-separated 0/1: {err}") from err
    if any(x not in (0, 1) for x in labels):
        raise RichHFFormatError(f"{where}: {LABEL_FEATURE!r} must hold only 0 and 1")
    return filename.decode("utf-8"), scores, labels


def parse_example(features: dict, where: str = "record") -> RichHFExample:
    """Decoded ``tf.train.Example`` features -> :class:`RichHFExample`; schema errors name ``where``."""
    filename, scores, labels = _parse_fields(features, where)
    heatmaps = {ours: _png_to_map(features[theirs][0], f"{where}: {theirs}") for ours, theirs in MAP_FEATURES.items()}
    return RichHFExample(filename, scores, heatmaps, labels)


def example_features(example: RichHFExample) -> dict:
    """:class:`RichHFExample` -> features in the RichHF-18K schema (maps as 8-bit PNG)."""
    features: dict = {"filename": [example.filename.encode("utf-8")]}
    features.update({theirs: [float(example.scores[ours])] for ours, theirs in SCORE_FEATURES.items()})
    features.update({theirs: [_map_to_png(example.heatmaps[ours])] for ours, theirs in MAP_FEATURES.items()})
    features[LABEL_FEATURE] = [" ".join(str(int(x)) for x in example.word_labels).encode("utf-8")]
    return features


def _decode(data: bytes, where: str) -> dict:
    try:
        return decode_example(data)
    except ValueError as err:
        raise RichHFFormatError(f"{where}: not a tf.train.Example: {err}") from err


def read_richhf(paths: str | Path | Sequence[str | Path]) -> Iterator[RichHFExample]:
    """Yield the examples of one or more RichHF-18K TFRecord files, in order."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for i, record in enumerate(read_records(path)):
            yield parse_example(_decode(record, f"{path} record {i}"), where=f"{path} record {i}")


@dataclass
class SplitRecord:
    """One example of a split folder with its prompt and image file."""

    example: RichHFExample
    prompt: str
    image: Path


class RichHFSplit(Sequence[SplitRecord]):
    """The usable examples of a split folder, read lazily: memory is flat in the split's size.

    Built by one pass over ``<split>.tfrecord`` that checks every record's framing and its names, scores and
    labels, and pairs it with its ``<split>.jsonl`` row (uid, image, prompt); examples with no row, or whose
    prompt's word count (RichHF-18K rule) differs from their label count, are skipped and counted, never
    truncated. The split then holds, per kept example, the record's byte offset (``offsets``, int64 (N,)), its
    position in the file, the prompt and the image's name; ``split[i]`` re-reads record i (checksums verified)
    and decodes its maps. Order is file order. A record damaged after indexing raises :class:`TFRecordError`
    (file and byte offset); a map that is not a PNG raises :class:`RichHFFormatError` (file, record, byte offset
    and field).
    """

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / f"{split}.tfrecord"
        rows: dict[str, tuple[str, str]] = {}
        for line in (self.data_dir / f"{split}.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["uid"]] = (row["image"], row["prompt"])
        offsets: list[int] = []
        numbers: list[int] = []
        self.prompts: list[str] = []
        self.image_names: list[str] = []
        self.skipped = 0
        for i, (offset, data) in enumerate(iter_records(self.path)):
            where = f"{self.path} record {i} at byte {offset}"
            filename, _, labels = _parse_fields(_decode(data, where), where)
            row = rows.get(PurePosixPath(filename).stem)
            if row is None or len(prompt_words(row[1])) != len(labels):
                self.skipped += 1
                continue
            offsets.append(offset)
            numbers.append(i)
            self.image_names.append(row[0])
            self.prompts.append(row[1])
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.record_numbers = np.asarray(numbers, dtype=np.int64)  # position in the file, for messages

    def __len__(self) -> int:
        return len(self.offsets)

    def _read(self, i: int, handle: BinaryIO) -> SplitRecord:
        offset = int(self.offsets[i])
        where = f"{self.path} record {self.record_numbers[i]} at byte {offset}"
        example = parse_example(_decode(read_record_at(self.path, offset, handle), where), where)
        return SplitRecord(example, self.prompts[i], self.data_dir / self.image_names[i])

    def read(self, indices: Iterable[int]) -> list[SplitRecord]:
        """The records at ``indices`` (any order, repeats allowed), decoded through one open file."""
        n = len(self)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise IndexError(f"{self.path}: index {bad[0]} out of range for a split of {n} examples")
        with open(self.path, "rb") as handle:
            return [self._read(i % n, handle) for i in idx]

    @overload
    def __getitem__(self, i: int) -> SplitRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[SplitRecord]: ...
    def __getitem__(self, i: int | slice) -> SplitRecord | list[SplitRecord]:
        if isinstance(i, slice):
            return self.read(range(*i.indices(len(self))))
        return self.read([i])[0]

    def __iter__(self) -> Iterator[SplitRecord]:
        with open(self.path, "rb") as handle:
            for i in range(len(self)):
                yield self._read(i, handle)

    def image(self, i: int) -> Path:
        """Path of example i's image (no decoding)."""
        return self.data_dir / self.image_names[i]


def read_split(data_dir: str | Path, split: str) -> tuple[RichHFSplit, int]:
    """The lazy :class:`RichHFSplit` of ``<split>.tfrecord`` + ``<split>.jsonl`` and the number skipped."""
    records = RichHFSplit(data_dir, split)
    return records, records.skipped


def write_richhf(path: str | Path, examples: Iterable[RichHFExample]) -> int:
    """Write examples as a RichHF-18K TFRecord file; returns the count. Maps are quantised to 1/255."""
    return write_records(path, (encode_example(example_features(ex)) for ex in examples))


# ---------------------------------------------------------------------------------------------------------
# Consolidation of raw annotations (paper §3.2)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Annotation:
    """One annotator's record of one image.

    points: (x, y, kind) in pixels of the annotated image, kind ``implausible`` or ``misaligned``.
    scores: Likert ratings 1..5 for plausibility, alignment, aesthetics, overall.
    word_labels: per cleaned prompt word, 1 = aligned, 0 = misaligned.
    """

    points: list[tuple[float, float, str]]
    scores: dict[str, float]
    word_labels: list[int]


def disk_map(
    points: Sequence[tuple[float, float]],
    image_size: tuple[int, int],
    map_size: tuple[int, int],
    radius_fraction: float = 1 / 20,
) -> np.ndarray:
    """One annotator's map: 1 inside any disk of radius ``radius_fraction`` × map height around a point.

    Args:
        points: (x, y) in pixels of an image of ``image_size`` = (H, W); scaled to ``map_size`` = (h, w).
    """
    h, w = map_size
    out = np.zeros((h, w), np.float32)
    if not points:
        return out
    sy, sx = h / image_size[0], w / image_size[1]
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = (radius_fraction * h) ** 2
    for x, y in points:
        cx, cy = x * sx, y * sy
        out[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r2] = 1.0
    return out


def consolidate(
    filename: str,
    annotations: Sequence[Annotation],
    image_size: tuple[int, int],
    map_size: tuple[int, int] = (512, 512),
) -> RichHFExample:
    """Several annotators' records of one image -> one example (paper §3.2).

    Maps: one disk map per annotator and kind, averaged over annotators. Scores: Likert 1..5 averaged, then
    standardised to [0, 1] as (s - 1) / 4. Word labels: majority vote per word; a tie counts as aligned (1).
    """
    if not annotations:
        raise ValueError(f"{filename}: no annotations to consolidate")
    n_words = {len(a.word_labels) for a in annotations}
    if len(n_words) != 1:
        raise ValueError(f"{filename}: annotators labelled different word counts {sorted(n_words)}")
    heatmaps = {}
    for kind, name in POINT_KINDS.items():
        per = []
        for a in annotations:
            bad = {k for *_, k in a.points} - set(POINT_KINDS)
            if bad:
                raise ValueError(f"{filename}: unknown point kind(s) {sorted(bad)}; use {sorted(POINT_KINDS)}")
            per.append(disk_map([(x, y) for x, y, k in a.points if k == kind], image_size, map_size))
        heatmaps[name] = np.mean(per, axis=0).astype(np.float32)
    scores = {}
    for name in SCORE_FEATURES:
        values = [a.scores[name] for a in annotations]
        if any(not 1 <= v <= 5 for v in values):
            raise ValueError(f"{filename}: {name} ratings must be in 1..5, got {values}")
        scores[name] = (float(np.mean(values)) - 1.0) / 4.0
    votes = np.array([a.word_labels for a in annotations])
    misaligned = (votes == 0).sum(axis=0)
    labels = [0 if 2 * m > len(annotations) else 1 for m in misaligned.tolist()]
    return RichHFExample(filename, scores, heatmaps, labels)
