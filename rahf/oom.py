"""Batched inference that survives running out of accelerator memory: halve the batch and retry the same items.

Used by the scorer (:class:`rahf.scorer.RAHFScorer`) and the diffusers generators. A batch that runs out of memory
is retried whole at half its size, the cache freed in between; the run then carries on at that size (it does not try
to grow back), so the batches from there on are those of an unfailed run at the smaller size. One item that alone
runs out of memory raises the error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (what CUDA raises; ``torch.cuda.OutOfMemoryError`` is the same class)
    and for a ``RuntimeError`` whose message says ``out of memory`` (MPS and other backends)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def release_memory(device: str | torch.device) -> None:
    """Return cached blocks to the device after an out-of-memory error (CUDA only; a no-op elsewhere)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_in_batches(
    fn: Callable[[int, int], None],
    n: int,
    batch_size: int,
    *,
    device: str | torch.device,
    what: str,
    on_settle: Callable[[int], None] | None = None,
) -> int:
    """Call ``fn(start, stop)`` for consecutive batches ``[start, stop)`` covering ``0..n-1``, each item once.

    When ``fn`` runs out of memory (:func:`is_out_of_memory`) on k > 1 items, the cache is freed, the batch size
    halved until it is below k, and the same ``start`` retried; that size holds for the rest of the run. ``fn``
    must leave no trace of a failed call (the caller's outputs for ``[start, stop)`` are written only on success).

    Args:
        fn: does the work for items ``start..stop-1``.
        n: number of items.
        batch_size: items per call to start with (>= 1).
        device: where the work runs (its CUDA cache is freed after an out-of-memory error).
        what: names the work in the log (``"scoring"``, ``"generation"``).
        on_settle: called with every new, smaller batch size.
    Returns:
        the batch size the run ended at (``batch_size`` when memory never ran out).
    Raises:
        the out-of-memory error of a single item; any other error of ``fn`` at once, unretried.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size, start, first_failure = batch_size, 0, 0
    while start < n:
        stop = min(start + size, n)
        failed = False
        try:
            fn(start, stop)
        except Exception as err:
            if stop - start == 1 or not is_out_of_memory(err):
                raise
            failed = True  # handled below, outside this block, so the error's frames (and tensors) are freed
        if not failed:
            start = stop
            continue
        first_failure = first_failure or stop - start
        while size >= stop - start:  # halve until below the batch that failed (a last batch may be short)
            size //= 2
        release_memory(device)
        log.warning("%s: out of memory at batch %d; retrying the same items at batch %d", what, stop - start, size)
        if on_settle is not None:
            on_settle(size)
    if first_failure:
        log.warning("%s settled on batch %d after out of memory at %d", what, size, first_failure)
    return size
