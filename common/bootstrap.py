"""The paired bootstrap's resampling, shared by the comparison statistics and the evaluation metrics (numpy only)."""

from __future__ import annotations

import numpy as np

#: at most this many resampled indices are held at once
_BOOT_CHUNK_ELEMS = 4_000_000


def bootstrap_means(d: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the rows of ``d``; (N, S) -> (n_boot, S).

    Resample ``b`` uses row indices ``rng.integers(0, N, size=N)`` in draw order, ``rng = default_rng(seed)``;
    they are drawn in chunks of whole resamples, which gives the same indices as one draw per resample. A
    resample's mean is (how often each row was drawn) @ ``d`` / N, one matrix product per chunk.
    """
    d = np.asarray(d, np.float64)
    n = d.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMS // n)
    out = np.empty((n_boot, d.shape[1]), np.float64)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))  # (m, N) row indices of m resamples
        idx += (np.arange(m) * n)[:, None]  # offset each resample's indices into its own row of counts
        counts = np.bincount(idx.ravel(), minlength=m * n).reshape(m, n)
        out[start : start + m] = counts @ d / n
    return out
