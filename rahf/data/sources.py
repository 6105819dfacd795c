"""Images and prompts for RichHF-18K, which ships labels only: pair them into a split folder for training.

RichHF-18K's ``filename`` (``train/<uid>.png``) names a Pick-a-Pic image; the prompt is that image's caption.
Users who hold a copy of Pick-a-Pic (it is no longer on the hub) point us at it in one of two forms:

* :class:`ImageFolderSource` — a folder of images named by uid, with a JSONL of ``{"uid": ..., "caption": ...}``
  (or ``"prompt"``) read by :func:`read_prompts`;
* :class:`ParquetSource` — a parquet dump (the Hugging Face ``datasets`` export of Pick-a-Pic v2) that embeds the
  image bytes and captions; indexed by uid without loading images, read one row group at a time.

:func:`make_split_folder` writes the split folder that ``richfeedback train`` and ``eval`` read:
``<split>.tfrecord`` (the labels), ``<split>.jsonl`` (uid, image path, prompt). Examples whose image is missing or
undecodable, whose prompt is missing, or whose prompt's word count differs from the label count, are skipped —
never truncated — and counted in the report.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from common.atomic import atomic_write_text
from rahf.data.richhf import read_richhf
from rahf.words import prompt_words

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PICKAPIC_V2_IMAGES = (("image_0_uid", "jpg_0"), ("image_1_uid", "jpg_1"))
"""(uid column, image column) pairs of Pick-a-Pic v2's parquet files."""

# Why an image was skipped: the values of a source's ``skipped`` mapping.
NO_IMAGE_BYTES = "no image bytes"
UNDECODABLE_IMAGE = "undecodable image"
UID_NOT_A_FILE_NAME = "uid is not a file name"

_FORMAT_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


def _image_format(data: bytes) -> str | None:
    """PIL's format name (``"PNG"``, ``"JPEG"``, ...) of encoded image bytes, or None if they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.format or "PNG"
    except Exception:  # PIL raises several types for bad bytes
        return None


def _is_file_name(uid: str) -> bool:
    return bool(uid) and uid not in (".", "..") and "/" not in uid and "\\" not in uid


class ImageSource(ABC):
    """A Pick-a-Pic copy keyed by image uid: what :func:`make_split_folder` reads images from.

    ``skipped`` maps each uid whose image turned out unusable to why (``NO_IMAGE_BYTES``, ``UNDECODABLE_IMAGE``,
    ``UID_NOT_A_FILE_NAME``); it fills as images are read. ``captions`` maps uid to prompt where the source holds
    captions (a parquet dump), else it is empty.
    """

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}
        self.captions: dict[str, str] = {}

    @abstractmethod
    def __contains__(self, uid: object) -> bool:
        raise NotImplementedError

    @abstractmethod
    def __len__(self) -> int:
        raise NotImplementedError

    @abstractmethod
    def image_bytes(self, uid: str) -> bytes:
        """The encoded image of ``uid``; KeyError if the source has no such uid."""
        raise NotImplementedError

    @abstractmethod
    def image_files(self, uids: Iterable[str], out_dir: str | Path) -> dict[str, Path]:
        """{uid: image file} for those of ``uids`` whose image decodes; the others are recorded in ``skipped``.

        Sources that hold files return them in place; sources that hold bytes write ``<uid>.<ext>`` in ``out_dir``.
        """
        raise NotImplementedError

    def image(self, uid: str) -> Image.Image:
        """The decoded RGB image of ``uid``."""
        with Image.open(io.BytesIO(self.image_bytes(uid))) as img:
            return img.convert("RGB")

    def skip_counts(self) -> dict[str, int]:
        """How many images were skipped, per reason."""
        return dict(Counter(self.skipped.values()))


class ImageFolderSource(ImageSource):
    """Images under ``root`` (recursively) keyed by uid = file stem; captions come separately (:func:`read_prompts`)."""

    def __init__(self, root: str | Path) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.paths: dict[str, Path] = {}
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.stem in self.paths:
                raise ValueError(f"two images share the uid {path.stem!r}: {self.paths[path.stem]} and {path}")
            self.paths[path.stem] = path

    def __contains__(self, uid: object) -> bool:
        return uid in self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def image_bytes(self, uid: str) -> bytes:
        """The bytes of ``uid``'s file; KeyError if there is none."""
        return self.paths[uid].read_bytes()

    def image_files(self, uids: Iterable[str], out_dir: str | Path) -> dict[str, Path]:
        """{uid: its file} for those of ``uids`` whose file decodes (nothing is copied; ``out_dir`` is unused)."""
        files = {}
        for uid in dict.fromkeys(uids):
            if uid not in self.paths:
                continue
            if _image_format(self.paths[uid].read_bytes()) is None:
                self.skipped[uid] = UNDECODABLE_IMAGE
            else:
                files[uid] = self.paths[uid]
        return files


# ---------------------------------------------------------------------------------------------------------
# Parquet dumps (Pick-a-Pic v2 / the Hugging Face ``datasets`` export)
# ---------------------------------------------------------------------------------------------------------


class _Cell(NamedTuple):
    """Where one image lives: file index, row group, row within the row group, index into ``image_columns``."""

    file: int
    row_group: int
    row: int
    column: int


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("ParquetSource needs pyarrow: pip install 'richfeedback[parquet]'") from err
    return pq


def _parquet_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by a parquet file, a folder (its ``*.parquet``, recursively) or a glob, or a list of these."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(path.rglob("*.parquet"))
        else:
            found = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
        if not found:
            raise FileNotFoundError(f"no parquet files at {item}")
        files += found
    return list(dict.fromkeys(files))


def _is_image_column(arrow_type: Any) -> bool:
    """Encoded bytes (binary) or the ``datasets`` Image struct with a binary ``bytes`` field."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        index = arrow_type.get_field_index("bytes")
        arrow_type = arrow_type.field(index).type if index >= 0 else pa.null()
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _cell_bytes(value: Any) -> bytes | None:
    """A cell of an image column (bytes, or ``{"bytes": ..., "path": ...}``) -> its bytes; None if empty."""
    data = value.get("bytes") if isinstance(value, dict) else value
    return data or None


class ParquetSource(ImageSource):
    """Pick-a-Pic images and captions in parquet files, keyed by uid; image bytes are read lazily.

    The index holds, per uid, where its image is (file, row group, row, column) and its caption — never image
    bytes. Reading images loads only the row groups that hold requested uids, one at a time, and of them only the
    image columns needed, so memory stays at about one row group's images.

    Args:
        paths: a parquet file, a folder (its ``*.parquet``, recursively), a glob, or a list of these.
        image_columns: (uid column, image column) pairs; an image column holds encoded bytes (binary) or the
            ``datasets`` Image struct ``{"bytes": ..., "path": ...}``. Defaults: Pick-a-Pic v2.
        caption_column: each row's prompt, given to all its images (first non-null caption wins); None for none.
        check_duplicates: when reading a uid, also read its other rows and add it to ``duplicates`` if their bytes
            differ from the first (which is kept). False reads only each uid's first row: faster on dumps where an
            image repeats across many pairs.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        image_columns: Sequence[tuple[str, str]] = PICKAPIC_V2_IMAGES,
        caption_column: str | None = "caption",
        check_duplicates: bool = True,
    ) -> None:
        pq = _import_parquet()
        super().__init__()
        self.image_columns = [(str(u), str(i)) for u, i in image_columns]
        if not self.image_columns:
            raise ValueError("image_columns must name at least one (uid column, image column) pair")
        self.caption_column = caption_column
        self.check_duplicates = check_duplicates
        self.files = _parquet_files(paths)
        self.duplicates: set[str] = set()
        self.images_without_uid = 0
        self._first: dict[str, _Cell] = {}
        self._repeats: dict[str, list[_Cell]] = {}
        for f, path in enumerate(self.files):
            with pq.ParquetFile(path) as pf:
                self._index_file(f, pf)

    def __contains__(self, uid: object) -> bool:
        return uid in self._first

    def __len__(self) -> int:
        return len(self._first)

    @property
    def _caption_names(self) -> list[str]:
        return [self.caption_column] if self.caption_column else []

    def _check_schema(self, path: Path, schema: Any) -> None:
        for name in [n for pair in self.image_columns for n in pair] + self._caption_names:
            if name not in schema.names:
                raise ValueError(f"{path}: no column {name!r} (columns: {', '.join(schema.names)})")
        for _, name in self.image_columns:
            if not _is_image_column(schema.field(name).type):
                raise ValueError(
                    f"{path}: column {name!r} must hold image bytes or a datasets Image struct, "
                    f"got {schema.field(name).type}"
                )

    def _index_file(self, f: int, pf: Any) -> None:
        """Add the uids and captions of one file, reading only its uid and caption columns, row group by row group."""
        self._check_schema(self.files[f], pf.schema_arrow)
        uid_names = [u for u, _ in self.image_columns]
        names = list(dict.fromkeys(uid_names + self._caption_names))
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=names)
            uids = [table.column(u).to_pylist() for u in uid_names]
            captions = table.column(self.caption_column).to_pylist() if self.caption_column else []
            for row in range(table.num_rows):
                caption = captions[row] if captions else None
                for c, column in enumerate(uids):
                    self._add(column[row], caption, _Cell(f, rg, row, c))

    def _add(self, uid: Any, caption: str | None, cell: _Cell) -> None:
        if uid is None or uid == "":
            self.images_without_uid += 1
            return
        uid = str(uid)
        if uid in self._first:
            self._repeats.setdefault(uid, []).append(cell)
        else:
            self._first[uid] = cell
        if caption is not None:
            self.captions.setdefault(uid, str(caption))

    def _read_row_group(self, pf: Any, cells: list[_Cell]) -> list[bytes | None]:
        """The image bytes of ``cells`` (all in one row group of ``pf``), reading only the columns they need."""
        names = {c: self.image_columns[c][1] for c in sorted({cell.column for cell in cells})}
        table = pf.read_row_group(cells[0].row_group, columns=list(dict.fromkeys(names.values())))
        return [_cell_bytes(table.column(names[cell.column])[cell.row].as_py()) for cell in cells]

    def _read(self, uids: Iterable[str]) -> Iterator[tuple[str, bytes, str]]:
        """(uid, bytes, PIL format) for each indexed uid whose first image decodes, in file order.

        Unusable first images go to ``skipped``; with ``check_duplicates`` the uid's other rows are read too and
        differing bytes put it in ``duplicates``.
        """
        pq = _import_parquet()
        wanted = [u for u in dict.fromkeys(uids) if u in self._first]
        jobs = [(self._first[u], u, True) for u in wanted]
        if self.check_duplicates:
            jobs += [(cell, u, False) for u in wanted for cell in self._repeats.get(u, ())]
        jobs.sort()
        digests: dict[str, bytes | None] = {}
        for f, in_file in itertools.groupby(jobs, key=lambda job: job[0].file):
            with pq.ParquetFile(self.files[f]) as pf:
                for _, group in itertools.groupby(in_file, key=lambda job: job[0].row_group):
                    group = list(group)
                    for (_, uid, first), data in zip(group, self._read_row_group(pf, [job[0] for job in group])):
                        digest = None if data is None else hashlib.sha256(data).digest()
                        if not first:
                            if digest != digests[uid]:
                                self.duplicates.add(uid)
                            continue
                        digests[uid] = digest
                        image_format = None if data is None else _image_format(data)
                        if image_format is None:
                            self.skipped[uid] = NO_IMAGE_BYTES if data is None else UNDECODABLE_IMAGE
                            continue
                        self.skipped.pop(uid, None)
                        yield uid, data, image_format

    def image_bytes(self, uid: str) -> bytes:
        """The encoded image of ``uid`` (its first row); KeyError if not indexed, ValueError if unusable."""
        if uid not in self._first:
            raise KeyError(uid)
        found = [data for _, data, _ in self._read([uid])]  # read to the end: the duplicate check follows the yield
        if found:
            return found[0]
        raise ValueError(f"the image of uid {uid!r} is unusable: {self.skipped[uid]}")

    def image_files(self, uids: Iterable[str], out_dir: str | Path) -> dict[str, Path]:
        """Write ``<uid>.<png|jpg|webp>`` (stored bytes, unchanged) in ``out_dir`` for each of ``uids`` that decodes."""
        out = Path(out_dir)
        wanted = []
        for uid in dict.fromkeys(uids):
            if uid in self._first and not _is_file_name(uid):
                self.skipped[uid] = UID_NOT_A_FILE_NAME
            else:
                wanted.append(uid)
        files = {}
        for uid, data, image_format in self._read(wanted):
            out.mkdir(parents=True, exist_ok=True)
            files[uid] = out / f"{uid}{_FORMAT_SUFFIXES.get(image_format, '.' + image_format.lower())}"
            files[uid].write_bytes(data)
        return files


# ---------------------------------------------------------------------------------------------------------
# Captions and the split folder
# ---------------------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> dict[str, str]:
    """JSONL of ``{"uid": ..., "caption" | "prompt": ...}`` -> {uid: prompt}; bad lines raise with their number."""
    prompts = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts[str(row["uid"])] = str(row["caption"] if "caption" in row else row["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f'{path}:{n}: expected {{"uid": ..., "caption": ...}}: {err}') from err
    return prompts


class SplitFolderReport(dict):
    """What :func:`make_split_folder` did: a dict of counts (``kept``, ``missing_image``, ``missing_prompt``,
    ``word_count_mismatch``) with, in ``uids``, the uids behind each skip count in label order."""

    def __init__(self) -> None:
        super().__init__(kept=0, missing_image=0, missing_prompt=0, word_count_mismatch=0)
        self.uids: dict[str, list[str]] = {"missing_image": [], "missing_prompt": [], "word_count_mismatch": []}
        self.labelled = 0  # examples in the labels

    def skip(self, reason: str, uid: str) -> None:
        self[reason] += 1
        self.uids[reason].append(uid)

    def describe(self, reason: str, show: int = 5) -> str:
        """E.g. ``"2 of 5 examples: u4, u5"``: the count of ``reason`` and its first ``show`` uids."""
        uids = self.uids[reason]
        more = f" and {len(uids) - show} more" if len(uids) > show else ""
        return f"{len(uids)} of {self.labelled} examples: {', '.join(uids[:show])}{more}"


class MissingImagesError(ValueError):
    """Some labelled example has no usable image and the caller asked to refuse (``strict``); ``report`` says which."""

    def __init__(self, report: SplitFolderReport, where: str) -> None:
        self.report = report
        self.where = where
        super().__init__(f"no usable image in {where} for {report.describe('missing_image')}")


def make_split_folder(
    labels: str | Path | Sequence[str | Path],
    images: ImageSource,
    prompts: dict[str, str],
    out_dir: str | Path,
    split: str,
    *,
    paths: str = "relative",
    copy_images: bool = False,
    strict: bool = False,
) -> SplitFolderReport:
    """Write ``<split>.tfrecord`` and ``<split>.jsonl`` under ``out_dir`` for the examples that pair up.

    Args:
        labels: RichHF-18K TFRecord file(s) of the split.
        images: an :class:`ImageFolderSource` (files referenced in place) or a :class:`ParquetSource` (images
            written to ``out_dir/<split>/``).
        prompts: {uid: prompt}, e.g. :func:`read_prompts` or a ParquetSource's ``captions``.
        paths: how ``<split>.jsonl`` names images: ``"relative"`` to ``out_dir`` (the folder can move together with
            its images) or ``"absolute"`` (the folder can move, the images cannot).
        copy_images: copy images that lie outside ``out_dir/<split>/`` into it (then the folder is self-contained).
        strict: raise :class:`MissingImagesError` if any labelled example has no usable image; nothing is written
            then (except the images a byte source such as ParquetSource extracts while checking them).

    Returns a :class:`SplitFolderReport`: counts ``kept``, ``missing_image`` (absent, or unusable:
    ``images.skipped`` says why), ``missing_prompt``, ``word_count_mismatch``, and the uids behind them.
    """
    if paths not in ("relative", "absolute"):
        raise ValueError(f"paths must be 'relative' or 'absolute', got {paths!r}")
    out = Path(out_dir)
    files = [labels] if isinstance(labels, (str, Path)) else list(labels)
    target = out / f"{split}.tfrecord"
    if any(Path(f).resolve() == target.resolve() for f in files):
        raise ValueError(f"the labels {target} would be overwritten: write the split folder elsewhere")
    report = SplitFolderReport()
    candidates = []
    for ex in (e for f in files for e in read_richhf(f)):
        report.labelled += 1
        if ex.uid not in images:
            report.skip("missing_image", ex.uid)
        elif ex.uid not in prompts:
            report.skip("missing_prompt", ex.uid)
        elif len(prompt_words(prompts[ex.uid])) != len(ex.word_labels):
            report.skip("word_count_mismatch", ex.uid)
        else:
            candidates.append(ex.uid)
    image_files = images.image_files(candidates, out / split)
    rows = []
    for uid in candidates:
        if uid not in image_files:
            report.skip("missing_image", uid)
            continue
        report["kept"] += 1
        rows.append({"uid": uid, "image": image_files[uid], "prompt": prompts[uid]})
    if strict and report["missing_image"]:
        raise MissingImagesError(report, str(getattr(images, "root", type(images).__name__)))
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        src = Path(row["image"])
        if copy_images and src.resolve().parent != (out / split).resolve():
            (out / split).mkdir(exist_ok=True)
            dst = out / split / f"{row['uid']}{src.suffix.lower()}"
            shutil.copyfile(src, dst)
            src = dst
        row["image"] = os.path.relpath(src, out) if paths == "relative" else str(src.resolve())
    if len(files) == 1:
        shutil.copyfile(files[0], target)
    else:
        with open(target, "wb") as dst:
            for f in files:
                dst.write(Path(f).read_bytes())
    atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return report
