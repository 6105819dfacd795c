"""Heatmap overlays for people: a colour-mapped heatmap blended over the image it describes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from rahf.processor import to_rgb

# A small perceptual ramp (dark blue -> cyan -> yellow -> red), interpolated linearly.
_RAMP = np.array([[0, 0, 80], [0, 90, 200], [0, 200, 200], [250, 230, 0], [230, 20, 0]], dtype=np.float32)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W, 3) uint8 colours; NaN counts as 0."""
    x = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, max_alpha: float = 0.7) -> Image.Image:
    """Blend a heatmap over an image; opacity grows with the heatmap value (0 leaves the pixel as is).

    Works in float32 at the image's size (about 40 bytes per pixel): callers bound the size (``rahf.batch``
    reduces images to ``max_side`` first).

    Args:
        image: any PIL image; the overlay has its size.
        heatmap: (h, w) float in [0, 1], resized to the image when sizes differ.
        max_alpha: opacity where the heatmap is 1.
    """
    rgb = to_rgb(image)
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.shape != (rgb.height, rgb.width):
        hm = np.asarray(Image.fromarray(hm).resize(rgb.size, Image.BILINEAR))
    hm = np.clip(np.nan_to_num(hm, nan=0.0), 0.0, 1.0)
    alpha = (hm * max_alpha)[..., None]
    base = np.asarray(rgb, dtype=np.float32)
    blended = base * (1 - alpha) + colorize(hm).astype(np.float32) * alpha
    return Image.fromarray(np.round(blended).astype(np.uint8))


def side_by_side(panels: list[Image.Image], gap: int = 4) -> Image.Image:
    """Panels of equal height placed left to right on white."""
    h = max(p.height for p in panels)
    w = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + gap
    return canvas
