"""Inputs and outputs of RAHF: images, prompts, keyword sequences (paper §3–4, RichHF-18K conventions).

* Images: any PIL mode or size -> RGB at the model size -> [0, 1] -> normalised with mean = std = 0.5.
* Prompts: the RichHF-18K word rule (split on any of ``,.?!":;`` and space, drop empties, join with one space),
  then the T5 tokenizer, truncated to ``max_text_tokens``.
* Keyword sequence: the cleaned prompt with ``_0`` appended to each misaligned word (``a yellow_0 cat``).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from common.config_fields import Positive, PositiveInt, check_fields, load_json_config
from rahf.words import clean_prompt, keyword_sequence, prompt_words

PROCESSOR_NAME = "processor_config.json"
ImageInput = Image.Image | str | Path | bytes


class InvalidImageError(ValueError):
    """An image that cannot be decoded or converted; the message names the image."""


class ImageTooLargeError(InvalidImageError):
    """An image with more pixels than the caller's limit (or Pillow's decompression-bomb limit)."""


#: Pixel limit for images to be scored: 64 MP (8000 x 8000), below Pillow's 89.5 MP warning threshold.
DEFAULT_MAX_PIXELS = 64_000_000


def load_image(
    source: ImageInput,
    name: str | None = None,
    *,
    max_pixels: int | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """Open a path, bytes or PIL image and decode it fully; failures raise :class:`InvalidImageError`.

    Args:
        source: a path, encoded bytes or a PIL image (returned as is unless ``max_side`` reduces it).
        name: how messages name the image (default: the path, or the byte count).
        max_pixels: refuse (:class:`ImageTooLargeError`) an image of more pixels, read from the file header
            before anything is decoded. Pillow's own limit (2 x ``Image.MAX_IMAGE_PIXELS``) applies on top.
        max_side: reduce an image whose long side exceeds this to that long side (aspect kept, Lanczos); JPEGs
            are decoded at a reduced scale first, so the full-size image is never held in memory.
    """
    label = name or (
        str(source)
        if isinstance(source, (str, Path))
        else "<PIL image>"
        if isinstance(source, Image.Image)
        else f"<{len(source)} bytes>"
    )
    if isinstance(source, Image.Image):
        check_pixels(source.size, max_pixels, label)
        return fit_within(source, max_side, label)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise InvalidImageError(f"cannot open image {label}: {err}") from err
    try:
        with fp:
            image = Image.open(fp)  # reads the header only
            check_pixels(image.size, max_pixels, label)
            if max_side is not None and max(image.size) > max_side:
                image.draft(None, fitted_size(image.size, max_side))  # JPEG: DCT scaling, never below the target
            image.load()
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"image {label} is too large to decode safely: {err}") from err
    except Exception as err:  # a hostile file can make any plugin raise anything; the item is what failed
        raise InvalidImageError(f"cannot decode image {label}: {type(err).__name__}: {err}") from err
    return fit_within(image, max_side, label)


def check_pixels(size: tuple[int, int], max_pixels: int | None, label: str = "image") -> None:
    """Raise :class:`ImageTooLargeError` when ``size`` (W, H) holds more than ``max_pixels`` pixels."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"image {label} is {w}x{h} ({w * h / 1e6:.1f} MP), over the limit of {max_pixels} pixels (max_pixels)"
        )


def fitted_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(W, H) scaled so the long side is ``max_side`` (aspect kept, each side at least 1); unchanged if it fits."""
    w, h = size
    if max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def fit_within(image: Image.Image, max_side: int | None, label: str = "image") -> Image.Image:
    """``image`` reduced so its long side is at most ``max_side`` (Lanczos, alpha premultiplied); a new image.

    Palette and 1-bit images are converted first (RGBA / L) so they are filtered, not subsampled.
    """
    if max_side is None or max(image.size) <= max_side:
        return image
    try:
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        elif image.mode == "1":
            image = image.convert("L")
        return image.resize(fitted_size(image.size, max_side), Image.LANCZOS, reducing_gap=3.0)
    except (ValueError, OSError) as err:
        raise InvalidImageError(f"cannot reduce image {label} ({image.mode} {image.size}): {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Transparency is composited over white; 16- and 32-bit integer images are scaled from their full range
    (``I;16*``: 0..65535; ``I``: 0..65535, clipped); float images (``F``) are taken as [0, 1], clipped;
    CMYK, YCbCr, LAB, HSV, palette and 1-bit images go through PIL's own conversion.
    """
    if image.width < 1 or image.height < 1:
        raise InvalidImageError(f"image has no pixels: {image.size}")
    try:
        return _convert_to_rgb(image)
    except (ValueError, OSError, TypeError) as err:  # a mode or palette Pillow cannot convert
        raise InvalidImageError(f"cannot convert a {image.mode} image to RGB: {err}") from err


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        arr = np.clip(arr, 0, 65535) / 65535.0 * 255.0
        return Image.fromarray(np.round(arr).astype(np.uint8)).convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    if mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class TextBatch:
    """Tokenised prompts. input_ids / attention_mask: (B, T) or, per task, (B, K, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[bool]  # the prompt was cut at max_text_tokens
    num_words: list[int]  # words of each cleaned prompt (RichHF-18K rule)


Resample = Literal["bicubic", "bilinear", "lanczos", "hamming", "box", "nearest"]
RESAMPLE_FILTERS = {name: Image.Resampling[name.upper()] for name in get_args(Resample)}


@dataclass
class ProcessorConfig:
    """The settings of :class:`RAHFProcessor` (``processor_config.json``), checked against these annotations."""

    image_size: PositiveInt  # the ViT input side S
    max_text_tokens: PositiveInt = 128  # prompt tokens kept
    image_mean: float = 0.5  # pixels are normalised as (x / 255 - mean) / std
    image_std: Positive = 0.5
    misaligned_suffix: str = "_0"
    # PIL filter of the resize to S x S. Bicubic for models trained here; imported reference checkpoints were
    # trained with the ViT image processor's bilinear resize.
    resample: Resample = "bicubic"

    def __post_init__(self) -> None:
        check_fields(self)


class RAHFProcessor:
    """Turns (prompt, image) pairs into model inputs and decoded keyword sequences back into words."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        max_text_tokens: int = 128,
        image_mean: float = 0.5,
        image_std: float = 0.5,
        misaligned_suffix: str = "_0",
        resample: str = "bicubic",
    ) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs pad and eos tokens")
        config = ProcessorConfig(image_size, max_text_tokens, image_mean, image_std, misaligned_suffix, resample)
        self.tokenizer = tokenizer
        self.image_size = config.image_size
        self.max_text_tokens = config.max_text_tokens
        self.image_mean = config.image_mean
        self.image_std = config.image_std
        self.misaligned_suffix = config.misaligned_suffix
        self.resample = config.resample

    # -- images --------------------------------------------------------------------------------------------

    def preprocess_image(self, image: ImageInput) -> torch.Tensor:
        """One image -> (3, S, S) float32, normalised: (x / 255 - mean) / std, so [-1, 1] at 0.5 / 0.5."""
        rgb = to_rgb(load_image(image))
        if rgb.size != (self.image_size, self.image_size):
            rgb = rgb.resize((self.image_size, self.image_size), resample=RESAMPLE_FILTERS[self.resample])
        arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (arr - self.image_mean) / self.image_std

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> (B, 3, S, S) float32."""
        return torch.stack([self.preprocess_image(im) for im in images])

    # -- prompts -------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str], prefix: str | None = None) -> TextBatch:
        """Clean and tokenise prompts (optionally after a task prefix) -> (B, T) padded to the longest."""
        texts = [clean_prompt(p) for p in prompts]
        if prefix:
            texts = [f"{prefix} {t}".strip() for t in texts]
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        truncated = [len(ids) > self.max_text_tokens for ids in full]
        return TextBatch(enc["input_ids"], enc["attention_mask"], truncated, [len(prompt_words(p)) for p in prompts])

    def tokenize_tasks(self, prompts: Sequence[str], prefixes: Sequence[str]) -> TextBatch:
        """Each prompt once per task prefix -> (B, K, T), padded to the longest row over all tasks."""
        per_task = [self.tokenize(prompts, prefix) for prefix in prefixes]
        t = max(b.input_ids.shape[1] for b in per_task)
        pad = self.tokenizer.pad_token_id
        ids = torch.stack([pad_right(b.input_ids, t, pad) for b in per_task], dim=1)
        mask = torch.stack([pad_right(b.attention_mask, t, 0) for b in per_task], dim=1)
        truncated = [any(b.truncated[i] for b in per_task) for i in range(len(prompts))]
        return TextBatch(ids, mask, truncated, per_task[0].num_words)

    def word_targets(self, prompts: Sequence[str], word_labels: Sequence[Sequence[int]]) -> torch.Tensor:
        """Per-token targets of the word head, aligned with ``tokenize(prompts)``: (B, T) float, 1 where the
        token's word is misaligned (label 0, RichHF-18K), 0 where it is aligned, −1 on pads, EOS and tokens cut by
        truncation. Raises ``ValueError`` when a prompt's word count differs from its label count."""
        if not self.tokenizer.is_fast:
            raise ValueError("word targets need a fast tokenizer (one that maps tokens to words)")
        texts = [clean_prompt(p) for p in prompts]
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_tokens)
        rows = []
        for i, (prompt, labels) in enumerate(zip(prompts, word_labels, strict=True)):
            n_words = len(prompt_words(prompt))
            if n_words != len(labels):
                raise ValueError(f"prompt has {n_words} words but {len(labels)} labels: {prompt!r}")
            rows.append([-1.0 if w is None else float(labels[w] == 0) for w in enc.word_ids(i)])
        return torch.tensor(rows, dtype=torch.float32)

    # -- keyword sequences ---------------------------------------------------------------------------------

    def keyword_target(self, prompt: str, word_labels: Sequence[int]) -> str:
        """Cleaned prompt with the suffix on each misaligned word; label 0 = misaligned (RichHF-18K)."""
        return keyword_sequence(prompt, word_labels, self.misaligned_suffix)

    def tokenize_targets(self, targets: Sequence[str]) -> torch.Tensor:
        """Keyword sequences -> label ids (B, L) with -100 on padding (ignored by the token loss)."""
        enc = self.tokenizer(
            list(targets), padding="longest", truncation=True, max_length=self.max_text_tokens * 2, return_tensors="pt"
        )
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def decode_keywords(self, token_ids: torch.Tensor, budgets: Sequence[int] | None = None) -> list[str]:
        """Generated ids (B, L) -> keyword sequences, row i cut after ``budgets[i]`` generated tokens.

        Ids outside the tokenizer's vocabulary (possible from an LM head larger than it) are dropped.
        """
        vocab = len(self.tokenizer)
        rows = token_ids.tolist()
        if budgets is not None:
            rows = [row[: b + 1] for row, b in zip(rows, budgets)]  # + 1: the decoder start token
        rows = [[int(i) for i in row if 0 <= int(i) < vocab] for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def misaligned_keywords(self, sequence: str) -> list[str]:
        """Words of a keyword sequence that carry the suffix, with the suffix removed, in order."""
        suffix = self.misaligned_suffix
        return [w[: -len(suffix)] for w in sequence.split() if w.endswith(suffix) and len(w) > len(suffix)]

    def keyword_budgets(self, batch: TextBatch, limit: int) -> list[int]:
        """Per-prompt generation budgets: the prompt's tokens, one suffix per word, one spare; at most ``limit``.

        The keyword sequence is the prompt with ``_0`` after some words, so it cannot need more. Budgets depend
        on each prompt alone, so a prompt decodes the same whatever batch it is in.
        """
        mask = batch.attention_mask if batch.attention_mask.dim() == 2 else batch.attention_mask[:, -1]
        suffix_len = len(self.tokenizer(self.misaligned_suffix, add_special_tokens=False)["input_ids"])
        return [
            max(1, min(limit, int(n) + words * suffix_len + 1))
            for n, words in zip(mask.sum(dim=1).tolist(), batch.num_words)
        ]

    # -- persistence ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        config = ProcessorConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ProcessorConfig)})
        (directory / PROCESSOR_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RAHFProcessor:
        """Read the tokenizer and ``processor_config.json``; a bad file or field raises ``ValueError`` naming it."""
        directory = Path(directory)
        path = directory / PROCESSOR_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_NAME} in {directory}")
        config = load_json_config(ProcessorConfig, path, "processor")
        return cls(_load_tokenizer(directory), **dataclasses.asdict(config))


def _load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model, by the class it recorded (AutoTokenizer would read the folder's
    config.json, which describes RAHF, not a transformers model)."""
    import transformers

    meta = directory / "tokenizer_config.json"
    name = json.loads(meta.read_text()).get("tokenizer_class") if meta.is_file() else None
    klass = getattr(transformers, name, None) if name else None
    return (klass or AutoTokenizer).from_pretrained(str(directory))


def pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad (B, T) to (B, length)."""
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)
