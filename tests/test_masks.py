"""Heatmap → inpainting mask: known answers, agreement with a plain full-frame OpenCV pipeline, errors, properties."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inpainting.masks import (
    MaskConfig,
    dilate_disk,
    dilation_radius,
    heatmap_to_mask,
    mask_area,
    mask_to_image,
)

HARD = MaskConfig(min_area_frac=0.0)


def disk_map(shape: tuple[int, int], center: tuple[float, float], radius: float, hot=0.9, cold=0.1) -> np.ndarray:
    """(h, w) float32 map: ``hot`` inside the disk at center (x, y), ``cold`` elsewhere."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    inside = (xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2
    return np.where(inside, hot, cold).astype(np.float32)


def smooth_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 in [0, 1]: a few smooth blobs (a coarse random grid, bicubically enlarged and clipped)."""
    coarse = rng.random((int(rng.integers(2, 7)), int(rng.integers(2, 7)))).astype(np.float32)
    return np.clip(cv2.resize(coarse, shape[::-1], interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def reference_mask(heatmap: np.ndarray, size: tuple[int, int], cfg: MaskConfig, cell: int = 1) -> np.ndarray:
    """The same steps done the plain way on the full frame: cv2.dilate, connectedComponentsWithStats, blur."""
    width, height = size
    h = heatmap.astype(np.float32)
    cut = cfg.threshold
    if cfg.threshold_mode == "quantile":
        cut = np.sort(h.ravel())[math.floor(cfg.threshold * (h.size - 1))]
    if h.shape != (height, width):
        h = cv2.resize(h, (width, height), interpolation=cv2.INTER_LINEAR)
    r = max(math.floor(cfg.dilate_frac * min(width, height) + 0.5), cfg.min_cell, cell)
    d = cv2.dilate((h > cut).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(d, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= cfg.min_area_frac * width * height
    keep[0] = False
    mask = np.where(keep[labels], 255, 0).astype(np.uint8)
    sigma = cfg.blur_frac * min(width, height)
    if sigma > 0:
        k = 2 * math.ceil(3 * sigma) + 1
        mask = cv2.GaussianBlur(mask, (k, k), sigmaX=sigma, sigmaY=sigma)
    return mask


# ---------------------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------------------


def test_hot_disk_is_covered_and_grown_by_the_radius():
    hmap = disk_map((160, 200), center=(70, 90), radius=20)
    cfg = MaskConfig(dilate_frac=0.05, min_area_frac=0.0)
    assert dilation_radius((200, 160), cfg) == 8
    mask = heatmap_to_mask(hmap, (200, 160), cfg)
    assert mask.shape == (160, 200) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert (mask[hmap > 0.5] == 255).all()
    # the disk's middle row spans x 50..90; grown by 8 on each side
    assert mask[90, 42] == 255 and mask[90, 41] == 0
    assert mask[90, 98] == 255 and mask[90, 99] == 0
    assert mask[62, 70] == 255 and mask[61, 70] == 0  # and vertically: y 70..110 grown to 62..118
    assert mask[118, 70] == 255 and mask[119, 70] == 0


@pytest.mark.parametrize(
    ("cfg", "cell", "radius"),
    [
        (MaskConfig(dilate_frac=0.05, min_area_frac=0.0), 1, 10),  # 0.05 × 200
        (MaskConfig(dilate_frac=0.01, min_area_frac=0.0), 8, 8),  # 2 px, raised to the generator's cell
        (MaskConfig(dilate_frac=0.01, min_cell=12, min_area_frac=0.0), 8, 12),  # the config's cell wins
    ],
)
def test_dilation_radius_measured_on_a_single_hot_pixel(cfg, cell, radius):
    hmap = np.zeros((200, 300), np.float32)
    hmap[100, 150] = 1.0
    assert dilation_radius((300, 200), cfg, cell) == radius
    mask = heatmap_to_mask(hmap, (300, 200), cfg, cell_size=cell)
    cols, rows = np.flatnonzero(mask[100]), np.flatnonzero(mask[:, 150])
    assert (cols.min(), cols.max()) == (150 - radius, 150 + radius)
    assert (rows.min(), rows.max()) == (100 - radius, 100 + radius)
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    assert np.count_nonzero(mask) == element.sum()
    assert abs(element.sum() - math.pi * radius**2) < 2 * math.pi * radius + 1  # a disk, not a square


def test_tiny_component_dropped_big_one_kept():
    hmap = disk_map((256, 256), center=(80, 80), radius=30)
    hmap[200:202, 200:202] = 0.9  # a 2×2 speck: ~50 px after dilation by 3 px, under 0.5 % of 65536 = 328
    cfg = MaskConfig(dilate_frac=0.01, min_area_frac=0.005)
    mask = heatmap_to_mask(hmap, (256, 256), cfg)
    assert mask[80, 80] == 255 and mask[110, 80] == 255
    assert (mask[180:230, 180:230] == 0).all()
    kept = heatmap_to_mask(hmap, (256, 256), MaskConfig(dilate_frac=0.01, min_area_frac=0.0))
    speck = np.zeros((50, 50), np.uint8)
    speck[20:22, 20:22] = 1
    grown = cv2.dilate(speck, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    assert np.array_equal(kept[180:230, 180:230] // 255, grown)
    assert grown.sum() < 0.005 * 256 * 256 < np.pi * 30**2


@pytest.mark.parametrize("where", [(64, 64), (0, 0), (127, 3)])
def test_component_of_exactly_min_area_is_kept(where):
    hmap = np.zeros((128, 128), np.float32)  # 128² = 2**14 pixels: area fractions are exact
    hmap[where] = 1.0
    grown = heatmap_to_mask(hmap, (128, 128), HARD)  # one pixel grown by 4 px, clipped at the border
    area = np.count_nonzero(grown)
    assert area < 70
    at = heatmap_to_mask(hmap, (128, 128), MaskConfig(min_area_frac=area / 2**14))
    above = heatmap_to_mask(hmap, (128, 128), MaskConfig(min_area_frac=(area + 1) / 2**14))
    assert np.array_equal(at, grown) and not above.any()


def test_quantile_on_a_ramp_marks_the_top_ten_percent():
    ramp = (np.arange(10_000, dtype=np.float32) / 9_999).reshape(100, 100)  # rows 90..99 hold the top 10 %
    cfg = MaskConfig(threshold=0.9, threshold_mode="quantile", dilate_frac=0.0, min_area_frac=0.0)
    mask = heatmap_to_mask(ramp, (100, 100), cfg)
    assert (mask[90:] == 255).all()
    assert (mask[89] == 255).all()  # the one-pixel (one-cell) dilation
    assert (mask[:89] == 0).all()
    # the same at another resolution: ~10 % plus the dilation rim
    big = heatmap_to_mask(ramp, (400, 300), cfg)
    assert big.shape == (300, 400)
    assert 0.09 < mask_area(big) < 0.115


@pytest.mark.parametrize(
    ("map_shape", "size"), [((384, 384), (640, 480)), ((512, 512), (300, 700)), ((96, 64), (64, 96))]
)
def test_output_size_is_the_image_size(map_shape, size):
    hmap = disk_map(map_shape, center=(map_shape[1] * 0.25, map_shape[0] * 0.75), radius=min(map_shape) * 0.1)
    mask = heatmap_to_mask(hmap, size, HARD)
    width, height = size
    assert mask.shape == (height, width)
    assert mask[int(height * 0.75), int(width * 0.25)] == 255  # the hot spot lands at the same relative place
    assert mask[int(height * 0.25), int(width * 0.75)] == 0


def test_constant_and_empty_maps():
    size = (64, 48)
    assert not heatmap_to_mask(np.zeros((32, 32)), size).any()
    assert not heatmap_to_mask(np.full((32, 32), 0.3), size).any()
    assert (heatmap_to_mask(np.full((32, 32), 0.7), size) == 255).all()  # absolute: all above the threshold
    quantile = MaskConfig(threshold=0.5, threshold_mode="quantile")
    assert not heatmap_to_mask(np.full((32, 32), 0.7), size, quantile).any()  # nothing stands out
    assert not heatmap_to_mask(np.zeros((32, 32)), size, quantile).any()
    assert heatmap_to_mask(np.zeros((32, 32)), size).shape == (48, 64)


def test_relative_threshold_scales_with_the_maps_own_maximum_and_respects_the_floor():
    ramp = (np.arange(100, dtype=np.float32) / 99).reshape(1, 100).repeat(10, axis=0) * 0.4  # columns 0 .. 0.4
    cfg = MaskConfig(threshold=0.5, threshold_mode="relative", dilate_frac=0.0, min_area_frac=0.0)
    mask = heatmap_to_mask(ramp, (100, 10), cfg)  # cut 0.2: columns whose value > 0.2, i.e. 50..99, plus 1 px
    assert (mask[:, 50:] == 255).all() and (mask[:, :49] == 0).all()
    assert not heatmap_to_mask(ramp, (100, 10), MaskConfig(threshold=0.5, dilate_frac=0.0)).any()  # absolute 0.5
    floored = heatmap_to_mask(ramp, (100, 10), MaskConfig(**{**cfg.__dict__, "floor": 0.3}))  # cut max(0.2, 0.3)
    assert (floored[:, 76:] == 255).all() and (floored[:, :74] == 0).all()
    faint = heatmap_to_mask(ramp * 0.1, (100, 10), MaskConfig(**{**cfg.__dict__, "floor": 0.05}))
    assert not faint.any()  # a near-empty map (max 0.04) marks nothing above the floor
    size = (16, 16)
    constant = MaskConfig(threshold=0.5, threshold_mode="relative", floor=0.2)
    assert (heatmap_to_mask(np.full((8, 8), 0.3), size, constant) == 255).all()  # 0.3 > max(0.15, 0.2)
    assert not heatmap_to_mask(np.full((8, 8), 0.1), size, constant).any()  # under the floor


def test_blur_feathers_the_edge():
    hmap = disk_map((128, 128), center=(64, 64), radius=20)
    hard = heatmap_to_mask(hmap, (128, 128), HARD)
    soft = heatmap_to_mask(hmap, (128, 128), MaskConfig(min_area_frac=0.0, blur_frac=0.02))
    between = (soft > 0) & (soft < 255)
    assert between.sum() > 100 and soft[64, 64] == 255 and soft.max() == 255
    assert abs(mask_area(soft) - mask_area(hard)) < 0.01


@pytest.mark.parametrize(
    ("cfg", "map_shape", "size"),
    [
        (MaskConfig(), (96, 96), (96, 96)),
        (MaskConfig(threshold=0.6, dilate_frac=0.05, min_area_frac=0.02), (64, 80), (150, 110)),
        (MaskConfig(threshold=0.8, threshold_mode="quantile", min_cell=4), (120, 90), (90, 120)),
        (MaskConfig(threshold=0.7, blur_frac=0.02, min_area_frac=0.01), (100, 100), (200, 160)),
        (MaskConfig(threshold=0.3, dilate_frac=0.1, min_area_frac=0.2), (50, 70), (70, 50)),
    ],
)
def test_matches_the_plain_full_frame_pipeline(cfg, map_shape, size):
    rng = np.random.default_rng(sum(size))
    for _ in range(4):
        hmap = smooth_map(rng, map_shape)
        got, want = heatmap_to_mask(hmap, size, cfg), reference_mask(hmap, size, cfg)
        assert np.abs(got.astype(int) - want).max() <= (1 if cfg.blur_frac else 0)


def test_many_specks_use_32_bit_labels_and_match_the_plain_pipeline():
    hmap = np.random.default_rng(0).random((512, 512)).astype(np.float32)  # ~2600 specks above 0.99
    cfg = MaskConfig(threshold=0.99, dilate_frac=0.0, min_area_frac=12 / 512**2)  # radius 1: 262144 // 3 labels
    mask = heatmap_to_mask(hmap, (512, 512), cfg)
    assert np.array_equal(mask, reference_mask(hmap, (512, 512), cfg))
    assert (
        0
        < mask_area(mask)
        < mask_area(heatmap_to_mask(hmap, (512, 512), MaskConfig(0.99, dilate_frac=0.0, min_area_frac=0.0)))
    )


@pytest.mark.parametrize("radius", [1, 3, 15, 31, 70])
@pytest.mark.parametrize("shape", [(97, 131), (5, 300), (300, 3), (1, 1)])
def test_dilate_disk_equals_cv2_dilate(radius, shape):
    rng = np.random.default_rng(radius)
    for density in (0.002, 0.05, 0.5):
        binary = rng.random(shape) < density
        element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        want = cv2.dilate(binary.astype(np.uint8), element)
        assert np.array_equal(dilate_disk(binary, radius), want)
    assert np.array_equal(dilate_disk(binary.astype(np.uint8) * 7, 0), binary.astype(np.uint8))


def test_mask_image_and_area():
    mask = np.zeros((40, 60), np.uint8)
    mask[:20, :30] = 255
    mask[30, 0] = 127  # not counted
    image = mask_to_image(mask)
    assert image.mode == "L" and image.size == (60, 40)
    assert np.array_equal(np.asarray(image), mask)
    assert mask_area(mask) == 0.25


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heatmap", "message"),
    [
        (np.array([[0.1, np.nan], [0.2, 0.3]]), "NaN"),
        (np.array([[0.1, np.inf], [0.2, 0.3]]), "inf"),
        (np.array([[0.1, -np.inf], [0.2, 0.3]]), "inf"),
        (np.zeros((2, 3, 3)), "2-D"),
        (np.zeros(5), "2-D"),
        (np.zeros((0, 4)), "empty"),
        (np.zeros((4, 4), np.uint8), "float"),
        (np.array([[0.0, 1.5]]), r"\[0, 1\]"),
        (np.array([[-0.1, 0.5]]), r"\[0, 1\]"),
    ],
)
def test_bad_heatmaps(heatmap, message):
    with pytest.raises(ValueError, match=message):
        heatmap_to_mask(heatmap, (8, 8))


@pytest.mark.parametrize("size", [(0, 8), (8, -1), (8,), (8, 8, 3), (8.0, 8), (True, 8), "8x8"])
def test_bad_image_sizes(size):
    with pytest.raises(ValueError, match="image_size"):
        heatmap_to_mask(np.zeros((8, 8)), size)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold_mode": "ratio"}, "threshold_mode"),
        ({"floor": 1.5}, "floor"),
        ({"floor": -0.1}, "floor"),
        ({"dilate_frac": -0.01}, "dilate_frac"),
        ({"min_cell": 0}, "min_cell"),
        ({"min_area_frac": 1.5}, "min_area_frac"),
        ({"blur_frac": float("inf")}, "blur_frac"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs)


def test_bad_cell_size_and_mask():
    with pytest.raises(ValueError, match="cell_size"):
        heatmap_to_mask(np.zeros((8, 8)), (8, 8), cell_size=0)
    with pytest.raises(ValueError, match="uint8"):
        mask_to_image(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="radius"):
        dilate_disk(np.zeros((4, 4), bool), -1)


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------

sides = st.integers(min_value=4, max_value=72)
fracs = st.floats(min_value=0.0, max_value=0.08)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    map_h=sides,
    map_w=sides,
    width=sides,
    height=sides,
    t1=st.floats(0.0, 1.0),
    t2=st.floats(0.0, 1.0),
    mode=st.sampled_from(["absolute", "quantile"]),
    dilate=fracs,
    min_area=st.floats(0.0, 0.1),
    blur=st.sampled_from([0.0, 0.0, 0.03]),
)
def test_higher_threshold_never_grows_the_mask(seed, map_h, map_w, width, height, t1, t2, mode, dilate, min_area, blur):
    hmap = smooth_map(np.random.default_rng(seed), (map_h, map_w))
    low, high = sorted((t1, t2))
    common = {"threshold_mode": mode, "dilate_frac": dilate, "min_area_frac": min_area, "blur_frac": blur}
    wide = heatmap_to_mask(hmap, (width, height), MaskConfig(threshold=low, **common))
    narrow = heatmap_to_mask(hmap, (width, height), MaskConfig(threshold=high, **common))
    assert wide.shape == narrow.shape == (height, width)
    assert (narrow <= wide).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), map_h=sides, map_w=sides, width=sides, height=sides, t=st.floats(0.0, 0.99))
def test_mask_contains_the_thresholded_pixels(seed, map_h, map_w, width, height, t):
    hmap = smooth_map(np.random.default_rng(seed), (map_h, map_w))
    cfg = MaskConfig(threshold=t, dilate_frac=0.05, min_area_frac=0.0)
    mask = heatmap_to_mask(hmap, (width, height), cfg)
    resized = cv2.resize(hmap, (width, height), interpolation=cv2.INTER_LINEAR)
    binary = resized > t if hmap.min() < hmap.max() else np.full_like(resized, hmap.min() > t, bool)
    assert mask.shape == (height, width)
    assert (mask[binary] == 255).all()
    assert mask_area(mask) >= binary.mean()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    map_h=sides,
    map_w=sides,
    width=sides,
    height=sides,
    t=st.floats(0.0, 1.0),
    value=st.floats(0.0, 1.0),
)
def test_empty_heatmaps_give_empty_masks(seed, map_h, map_w, width, height, t, value):
    below = smooth_map(np.random.default_rng(seed), (map_h, map_w)) * np.float32(t)  # nothing above t
    mask = heatmap_to_mask(below, (width, height), MaskConfig(threshold=t))
    assert mask.shape == (height, width) and not mask.any()
    constant = np.full((map_h, map_w), value, np.float32)
    mask = heatmap_to_mask(constant, (width, height), MaskConfig(threshold=t, threshold_mode="quantile"))
    assert mask.shape == (height, width) and not mask.any()
