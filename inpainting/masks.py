"""Implausibility heatmap → inpainting mask (paper §5, Fig. 9).

Repair repaints the regions RAHF marks as implausible. The mask comes from the predicted heatmap in five steps:

1. resize the heatmap to the image size (bilinear);
2. threshold it: absolute (pixels above ``threshold``), quantile (pixels above the heatmap's
   ``threshold``-quantile, so a constant map marks nothing) or relative (pixels above ``threshold`` × the map's
   own maximum, so a faint but peaked map still marks its peak); in every mode a pixel must also exceed ``floor``,
   so a near-empty map marks nothing;
3. dilate by an elliptical structuring element whose radius is a fraction of the image's shorter side and at
   least one latent/token cell of the generator (aMUSEd binarises masks on its token grid, SD on its 8-px latent
   grid: a thinner mask would vanish there);
4. drop connected components (after dilation) smaller than a fraction of the image area;
5. optionally feather the edge with a Gaussian blur.

The result is a uint8 (H, W) array, 255 where the generator repaints and 0 where it keeps the image.

Speed. Everything after the threshold runs inside the bounding box of the thresholded pixels, grown by how far
dilation and blur reach (outside it the mask is zero). ``cv2.dilate`` with a large non-rectangular element costs
pixels × element area (≈ 2.5 ms at 512² for radius 15), so :func:`dilate_disk` computes the same result on
bit-packed rows instead: the element is a union of horizontal segments, one per row offset, and each segment is a
few shifts and ORs of 64-bit words. The tests check it against ``cv2.dilate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
from PIL import Image

ThresholdMode = Literal["absolute", "quantile", "relative"]
THRESHOLD_MODES = ("absolute", "quantile", "relative")


@dataclass(frozen=True)
class MaskConfig:
    """Every parameter of the heatmap → mask step."""

    #: in [0, 1]: the heatmap value to exceed (absolute) or the quantile q whose value to exceed (quantile)
    threshold: float = 0.5
    #: "absolute": pixels > threshold; "quantile": pixels > the q-quantile of the heatmap (a constant map: none);
    #: "relative": pixels > threshold x the heatmap's maximum
    threshold_mode: ThresholdMode = "absolute"
    #: in [0, 1]: an absolute floor every marked pixel must also exceed, whatever the mode (0: none)
    floor: float = 0.0
    #: dilation radius as a fraction of the image's shorter side (0.03 → 15 px at 512²)
    dilate_frac: float = 0.03
    #: the generator's latent/token cell in pixels (SD 8, aMUSEd 16): the dilation radius is at least this
    min_cell: int = 1
    #: components (after dilation) under this fraction of the image area are dropped; 0 keeps all. A dilated
    #: component is never smaller than a quarter of the dilation disk, so values below that drop nothing
    min_area_frac: float = 0.005
    #: Gaussian feather sigma as a fraction of the shorter side; 0 keeps the mask hard (only 0 and 255)
    blur_frac: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor}")
        if not 0.0 <= self.dilate_frac < math.inf:
            raise ValueError(f"dilate_frac must be finite and >= 0, got {self.dilate_frac}")
        if isinstance(self.min_cell, bool) or not isinstance(self.min_cell, int) or self.min_cell < 1:
            raise ValueError(f"min_cell must be an int >= 1, got {self.min_cell!r}")
        if not 0.0 <= self.min_area_frac <= 1.0:
            raise ValueError(f"min_area_frac must be in [0, 1], got {self.min_area_frac}")
        if not 0.0 <= self.blur_frac < math.inf:
            raise ValueError(f"blur_frac must be finite and >= 0, got {self.blur_frac}")


DEFAULT_MASK_CONFIG = MaskConfig()


# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"image_size must be (W, H), got {image_size!r}")
    for v in image_size:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"image_size must be two positive ints (W, H), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _check_heatmap(heatmap: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The heatmap as float32 with its min and max, or a ValueError naming what is wrong."""
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (h, w), got shape {heatmap.shape}")
    if heatmap.size == 0:
        raise ValueError(f"heatmap is empty, shape {heatmap.shape}")
    if not np.issubdtype(heatmap.dtype, np.floating):
        raise ValueError(f"heatmap must be float in [0, 1], got dtype {heatmap.dtype} (divide 8-bit maps by 255)")
    heatmap = np.ascontiguousarray(heatmap, dtype=np.float32)
    lo, hi = float(heatmap.min()), float(heatmap.max())  # NaN propagates into both, inf into one
    if not (math.isfinite(lo) and math.isfinite(hi)):
        problem = "NaN" if np.isnan(heatmap).any() else "inf"
        raise ValueError(f"heatmap contains {problem} values")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"heatmap values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return heatmap, lo, hi


# ---------------------------------------------------------------------------------------------------------
# Dilation by an elliptical element, on bit-packed rows
# ---------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _half_widths(radius: int) -> tuple[int, ...]:
    """Half-width of the (2r+1)² MORPH_ELLIPSE element's row at vertical offset 0..r (non-increasing)."""
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return tuple(int(n) // 2 for n in element[radius:].sum(axis=1))


def _shift_bits(tape: np.ndarray, s: int) -> np.ndarray:
    """The word tape moved by ``s`` bits (0 < |s| < 64) towards higher (s > 0) or lower columns, zeros in."""
    if s > 0:
        out = tape << s
        out[1:] |= tape[:-1] >> (64 - s)
    else:
        out = tape >> -s
        out[:-1] |= tape[1:] << (64 + s)
    return out


def _spread_bits(tape: np.ndarray, d: int) -> np.ndarray:
    """OR of the tape moved by every offset in [-d, d] bits, doubling the covered span each step."""
    for sign in (1, -1):
        covered = 1  # offsets 0 .. covered-1 (in this direction) are in
        while covered <= d:
            step = min(covered, d + 1 - covered, 63)
            tape = tape | _shift_bits(tape, sign * step)
            covered += step
    return tape


def dilate_disk(binary: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a binary mask by the elliptical element of radius ``radius``.

    Equals ``cv2.dilate(binary, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2r+1, 2r+1)))`` with pixels outside
    the image ignored. Each row is packed into 64-bit words with at least ``radius`` zero bits after it, so the
    whole image is one tape of words on which a horizontal segment never reaches the next row's pixels; the
    element is the union over row offsets dy of segments [-w(dy), w(dy)].

    Args:
        binary: (H, W) bool or integer array, nonzero = in.
        radius: element radius in pixels, >= 0.

    Returns:
        (H, W) uint8 in {0, 1}.
    """
    binary = np.asarray(binary)
    if binary.ndim != 2:
        raise ValueError(f"binary must be 2-D (H, W), got shape {binary.shape}")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    bits = binary if binary.dtype == np.bool_ else binary != 0
    height, width = bits.shape
    if radius == 0 or bits.size == 0:
        return bits.astype(np.uint8)
    words = -(-(width + radius) // 64)  # row length in words, with >= radius zero bits of padding
    packed = np.zeros((height, words * 8), np.uint8)
    packed[:, : -(-width // 8)] = np.packbits(bits, axis=1, bitorder="little")
    tape = packed.reshape(-1).view("<u8")
    half = _half_widths(int(radius))
    rows: dict[int, np.ndarray] = {}  # the tape spread horizontally by each half-width the element uses
    spread, done = tape, 0
    for w in sorted(set(half)):
        spread, done = _spread_bits(spread, w - done), w
        rows[w] = spread
    out = rows[half[0]].copy()
    for dy in range(1, min(int(radius), height - 1) + 1):
        src, k = rows[half[dy]], dy * words
        out[k:] |= src[:-k]
        out[:-k] |= src[k:]
    return np.unpackbits(out.view(np.uint8).reshape(height, words * 8), axis=1, count=width, bitorder="little")


# ---------------------------------------------------------------------------------------------------------
# Heatmap → mask
# ---------------------------------------------------------------------------------------------------------


def dilation_radius(image_size: tuple[int, int], config: MaskConfig = DEFAULT_MASK_CONFIG, cell_size: int = 1) -> int:
    """Dilation radius in pixels: ``dilate_frac`` × the shorter side, rounded, and at least one cell."""
    width, height = _check_image_size(image_size)
    if isinstance(cell_size, bool) or not isinstance(cell_size, (int, np.integer)) or cell_size < 1:
        raise ValueError(f"cell_size must be an int >= 1, got {cell_size!r}")
    return max(math.floor(config.dilate_frac * min(width, height) + 0.5), config.min_cell, int(cell_size))


def _smallest_component(radius: int, width: int, height: int) -> int:
    """Fewest pixels a dilated component can have: one pixel's element clipped at an image corner."""
    half = _half_widths(radius)[: min(radius, height - 1) + 1]
    return sum(min(w, width - 1) + 1 for w in half)


def _drop_small_components(region: np.ndarray, min_area: float, smallest: int) -> np.ndarray:
    """(h, w) uint8 {0, 1} → {0, 255}, without the 8-connected components of fewer than ``min_area`` pixels."""
    if region.size // smallest < 65535:  # labels fit 16 bits: faster labelling, and areas by cv2.calcHist
        n, labels = cv2.connectedComponents(region, connectivity=8, ltype=cv2.CV_16U)
        areas = cv2.calcHist([labels], [0], None, [n], [0, n]).ravel()
    else:
        n, labels = cv2.connectedComponents(region, connectivity=8, ltype=cv2.CV_32S)
        areas = np.bincount(labels.ravel(), minlength=n)
    keep = areas >= min_area
    keep[0] = False  # background
    if keep[1:].all():
        return np.multiply(region, 255, out=region)
    return np.take(np.where(keep, 255, 0).astype(np.uint8), labels)


def heatmap_to_mask(
    heatmap: np.ndarray,
    image_size: tuple[int, int],
    config: MaskConfig = DEFAULT_MASK_CONFIG,
    cell_size: int = 1,
) -> np.ndarray:
    """Inpainting mask from an implausibility heatmap: resize, threshold, dilate, drop small parts, feather.

    Args:
        heatmap: (h, w) float in [0, 1] at any resolution (e.g. a 384² RAHF output or a 512² RichHF map).
        image_size: (W, H) of the image to repair, as ``PIL.Image.size``.
        config: thresholds, dilation, component and blur settings.
        cell_size: the generator's latent/token cell in pixels (``Generator.cell_size``); the dilation radius
            is at least this and at least ``config.min_cell``.

    Returns:
        (H, W) uint8: 255 = repaint, 0 = keep; values in between only at feathered edges (``blur_frac > 0``).
        All zero when no pixel exceeds the threshold (nothing to repair).
    """
    width, height = _check_image_size(image_size)
    radius = dilation_radius((width, height), config, cell_size)
    hmap, lo, hi = _check_heatmap(heatmap)
    if lo == hi:  # a constant map: nothing stands out above its quantiles; absolute or relative, all or nothing
        cut = config.threshold * hi if config.threshold_mode == "relative" else config.threshold
        marked = config.threshold_mode != "quantile" and np.float32(lo) > np.float32(max(cut, config.floor))
        return np.full((height, width), 255 if marked else 0, np.uint8)

    # threshold at the image size (a quantile is the heatmap's own: its lower order statistic)
    cut = config.threshold
    if config.threshold_mode == "quantile":
        k = math.floor(config.threshold * (hmap.size - 1))
        cut = float(np.partition(hmap.ravel(), k)[k])
    elif config.threshold_mode == "relative":
        cut = float(np.float32(config.threshold) * np.float32(hi))
    cut = max(cut, config.floor)
    if hmap.shape != (height, width):
        hmap = cv2.resize(hmap, (width, height), interpolation=cv2.INTER_LINEAR)
    hot = hmap > cut
    mask = np.zeros((height, width), np.uint8)
    x, y, w, h = cv2.boundingRect(hot.view(np.uint8))
    if w == 0:
        return mask

    # work in the hot box grown by the dilation and blur reach; the mask is zero outside it
    sigma = config.blur_frac * min(width, height)
    blur_reach = math.ceil(3 * sigma)
    reach = radius + blur_reach
    x0, y0, x1, y1 = max(x - reach, 0), max(y - reach, 0), min(x + w + reach, width), min(y + h + reach, height)
    region = dilate_disk(hot[y0:y1, x0:x1], radius)
    min_area = config.min_area_frac * width * height
    smallest = _smallest_component(radius, width, height)
    if min_area > smallest:
        region = _drop_small_components(region, min_area, smallest)
    else:
        region *= 255
    if blur_reach > 0:  # separable Gaussian: cv2.GaussianBlur's result ±1, ~3× faster on uint8 at this size
        kernel = cv2.getGaussianKernel(2 * blur_reach + 1, sigma)
        region = cv2.sepFilter2D(region, -1, kernel, kernel)
    mask[y0:y1, x0:x1] = region
    return mask


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """A (H, W) uint8 mask as a mode "L" PIL image (255 = repaint), as ``Generator.inpaint`` takes it."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be (H, W) uint8, got shape {mask.shape} dtype {mask.dtype}")
    return Image.fromarray(mask)


def mask_area(mask: np.ndarray) -> float:
    """Fraction of the mask's pixels that are repainted (> 127), in [0, 1]."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty (H, W) array, got shape {mask.shape}")
    return float(np.count_nonzero(mask > 127)) / mask.size
