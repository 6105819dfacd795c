"""Images and prompts for RichHF-18K, which ships labels only: pair them into a split folder for training.

RichHF-18K's ``filename`` (``train/<uid>.png``) names a Pick-a-Pic v1 image; the prompt is that image's caption.
Users who hold a copy of Pick-a-Pic (it is no longer on the hub) point us at a folder of images named by uid and
a JSONL of ``{"uid": ..., "caption": ...}`` (or ``"prompt"``). :func:`make_split_folder` writes the split
folder that ``richfeedback train`` and ``eval`` read: ``<split>.tfrecord`` (the labels), ``<split>.jsonl``
(uid, image path, prompt). Examples whose image or prompt is missing, or whose prompt's word count differs from
the label count, are skipped — never truncated — and counted in the report.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from rahf.data.richhf import read_richhf
from rahf.words import prompt_words

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageFolderSource:
    """Images under ``root`` (recursively) keyed by uid = file stem."""

    def __init__(self, root: str | Path) -> None:
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

    def __contains__(self, uid: str) -> bool:
        return uid in self.paths

    def __len__(self) -> int:
        return len(self.paths)


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


def make_split_folder(
    labels: str | Path | Sequence[str | Path],
    images: ImageFolderSource,
    prompts: dict[str, str],
    out_dir: str | Path,
    split: str,
) -> dict[str, int]:
    """Write ``<split>.tfrecord`` and ``<split>.jsonl`` under ``out_dir`` for the examples that pair up.

    Returns counts: ``kept``, ``missing_image``, ``missing_prompt``, ``word_count_mismatch``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [labels] if isinstance(labels, (str, Path)) else list(labels)
    report = {"kept": 0, "missing_image": 0, "missing_prompt": 0, "word_count_mismatch": 0}
    rows = []
    for ex in (e for f in files for e in read_richhf(f)):
        if ex.uid not in images:
            report["missing_image"] += 1
        elif ex.uid not in prompts:
            report["missing_prompt"] += 1
        elif len(prompt_words(prompts[ex.uid])) != len(ex.word_labels):
            report["word_count_mismatch"] += 1
        else:
            report["kept"] += 1
            image = Path(os.path.relpath(images.paths[ex.uid], out))
            rows.append({"uid": ex.uid, "image": str(image), "prompt": prompts[ex.uid]})
    target = out / f"{split}.tfrecord"
    if len(files) == 1:
        shutil.copyfile(files[0], target)
    else:
        with open(target, "wb") as dst:
            for f in files:
                dst.write(Path(f).read_bytes())
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return report
