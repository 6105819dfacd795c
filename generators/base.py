"""The one generator interface, the identity of a generator, and the generated image.

Every generated image carries its prompt, seed, parameters and the generator's identity
(model id or path, revision, LoRA adapter content hash), and gets a stable id from them, so a rerun recognises
finished work. Its JSON-able form, the record the flows write, is :class:`common.records.ImageRecord`; it never
holds pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from common.names import SCORE_NAMES
from common.records import ImageRecord

__all__ = [  # SCORE_NAMES and ImageRecord live in common/ and are re-exported here for older imports
    "SCORE_NAMES",
    "GeneratedImage",
    "Generator",
    "GeneratorIdentity",
    "ImageRecord",
    "check_inpaint_inputs",
    "content_hash",
    "content_hash_image",
    "decode_png",
    "encode_png",
    "image_id",
    "resolve_seeds",
]


def content_hash(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) over every file of a folder or one file, names included, in sorted order."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def content_hash_image(image: Image.Image) -> str:
    """SHA-256 (16 hex digits) of an image's pixels, mode and size: identifies an inpainting's input and mask."""
    return hashlib.sha256(image.tobytes() + f"{image.mode}{image.size}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GeneratorIdentity:
    """What produced an image: backend, model id or path, revision, and the LoRA adapter's content hash."""

    backend: str
    model: str
    revision: str | None = None
    adapter_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorIdentity:
        return cls(**d)

    def label(self) -> str:
        """Short human-readable name, e.g. ``amused:amused/amused-256+lora:1a2b3c``."""
        s = f"{self.backend}:{self.model}"
        if self.revision:
            s += f"@{self.revision}"
        if self.adapter_hash:
            s += f"+lora:{self.adapter_hash[:6]}"
        return s


def image_id(prompt: str, seed: int, generator: GeneratorIdentity, params: dict[str, Any]) -> str:
    """Stable id of an image: SHA-256 (first 20 hex digits) of (prompt, seed, generator identity, params)."""
    key = json.dumps(
        {"prompt": prompt, "seed": int(seed), "generator": generator.to_dict(), "params": params},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(key.encode()).hexdigest()[:20]


@dataclass
class GeneratedImage:
    """One image with everything needed to reproduce it. ``truth`` holds exact ground truth where the backend
    knows it (the synthetic world: scores, flaws, word labels, and ``maps`` of (H, W) float arrays), else None."""

    image: Image.Image
    prompt: str
    seed: int
    generator: GeneratorIdentity
    params: dict[str, Any]
    truth: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return image_id(self.prompt, self.seed, self.generator, self.params)


class Generator(ABC):
    """Text-to-image generation and inpainting, one ``torch.Generator`` (or RNG) per image: the same seed gives
    the same image whatever the batch."""

    identity: GeneratorIdentity
    #: side of the generator's latent/token cell in pixels (masks are dilated to at least this)
    cell_size: int = 1

    def params(self, task: str) -> dict[str, Any]:
        """The parameters recorded with (and hashed into the id of) every image of ``task``."""
        return {"task": task}

    def expected_id(self, prompt: str, seed: int) -> str:
        """The id ``generate`` will give the image of (prompt, seed): lets a rerun skip finished work unbuilt."""
        return image_id(prompt, seed, self.identity, self.params("text-to-image"))

    @abstractmethod
    def generate(
        self, prompts: Sequence[str], num_images_per_prompt: int = 8, seeds: Sequence[int] | None = None
    ) -> list[GeneratedImage]:
        """``len(prompts) * num_images_per_prompt`` images, prompt-major; ``seeds`` has that many entries or is
        None for ``0..n-1`` per prompt."""

    @abstractmethod
    def inpaint(
        self, image: Image.Image, mask: Image.Image, prompt: str, n: int, seeds: Sequence[int] | None = None
    ) -> list[GeneratedImage]:
        """``n`` candidates that repaint the white (255) part of ``mask`` (mode L, same size as ``image``);
        pixels outside the mask equal the input's exactly."""


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image``, keeping its string ``info`` entries as text chunks (the synthetic world keeps its
    scene there, so its inpainter can re-render what it made)."""
    info = PngImagePlugin.PngInfo()
    for k, v in image.info.items():
        if isinstance(k, str) and isinstance(v, str):
            info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    """Inverse of :func:`encode_png` (any format PIL reads); the image is loaded, text chunks in ``info``."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def resolve_seeds(n_prompts: int, per_prompt: int, seeds: Sequence[int] | None) -> list[int]:
    """The seed of every image, prompt-major; default ``0..per_prompt-1`` for each prompt."""
    if per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {per_prompt}")
    if seeds is None:
        return [s for _ in range(n_prompts) for s in range(per_prompt)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n_prompts * per_prompt:
        n = n_prompts * per_prompt
        raise ValueError(f"expected {n} seeds ({n_prompts} prompts × {per_prompt}), got {len(seeds)}")
    return seeds


def check_inpaint_inputs(image: Image.Image, mask: Image.Image, n: int, seeds: Sequence[int] | None) -> list[int]:
    """Validate an inpainting call; returns the seeds (default ``0..n-1``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB, got mode {image.mode!r} (convert it first)")
    if mask.mode != "L":
        raise ValueError(f"mask must be mode 'L' (0 keep, 255 repaint), got {mask.mode!r}")
    if mask.size != image.size:
        raise ValueError(f"mask size {mask.size} differs from image size {image.size}")
    return resolve_seeds(1, n, seeds)
