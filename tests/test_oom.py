"""Out-of-memory during batched scoring and generation: the batch halves, the same items are retried, nothing is lost
or duplicated, results equal an unfailed run at the settled size, and the settled size is reported.

CUDA is not needed: the error is injected on CPU by wrapping a model's ``forward``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from common.records import RichFeedback, ScoringFailure
from rahf.oom import is_out_of_memory, release_memory, run_in_batches
from rahf.scorer import RAHFScorer
from tests.conftest import random_image

PROMPTS = [f"a red cat number {i} on a mat" for i in range(5)]


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def fail_above(module: torch.nn.Module, limit: int, calls: list[int], monkeypatch, per_image: int = 1) -> None:
    """Make ``module.forward`` raise a CUDA OOM when its batch holds more than ``limit`` images; record batch sizes
    (``per_image`` rows of the first tensor argument per image, e.g. 2 under classifier-free guidance)."""
    forward = module.forward

    def guarded(x, *args, **kwargs):
        n = x.shape[0] // per_image
        calls.append(n)
        if n > limit:
            raise oom()
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(module, "forward", guarded)


@pytest.fixture
def pairs():
    return PROMPTS, [random_image(i, (64 + 8 * i, 64)) for i in range(len(PROMPTS))]


def assert_same_feedback(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert isinstance(x, RichFeedback) and isinstance(y, RichFeedback)
        assert x.prompt == y.prompt and x.scores == y.scores
        assert x.keyword_sequence == y.keyword_sequence and x.misaligned_keywords == y.misaligned_keywords
        assert x.heatmaps.keys() == y.heatmaps.keys()
        assert all(np.array_equal(x.heatmaps[k], y.heatmaps[k]) for k in x.heatmaps)


# -- the helper --------------------------------------------------------------------------------------------------


def test_out_of_memory_is_recognised_by_type_and_by_message():
    assert is_out_of_memory(oom()) and is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


def test_run_in_batches_halves_covers_every_item_once_and_reports():
    spans, settled = [], []

    def fn(start: int, stop: int) -> None:
        if stop - start > 3:
            raise oom()
        spans.append((start, stop))

    size = run_in_batches(fn, 10, 8, device="cpu", what="test", on_settle=settled.append)
    assert size == 2 and settled == [4, 2]  # 8 items -> 4 -> 2, then the rest at 2
    assert spans == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]


def test_run_in_batches_raises_at_one_item_and_passes_other_errors_through():
    with pytest.raises(torch.OutOfMemoryError):
        run_in_batches(lambda a, b: (_ for _ in ()).throw(oom()), 3, 1, device="cpu", what="test")
    attempts = []

    def boom(start: int, stop: int) -> None:
        attempts.append(stop - start)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_in_batches(boom, 8, 8, device="cpu", what="test")
    assert attempts == [8]  # not retried


def test_release_memory_empties_the_cuda_cache_only_for_cuda(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    release_memory(torch.device("cpu"))
    assert emptied == []
    release_memory(torch.device("cuda:0"))
    assert emptied == [1]


# -- the scorer ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # two full runs: about 10 s on two busy cores
def test_scorer_halves_on_oom_and_equals_an_unfailed_run_at_the_settled_size(tiny_multi, pairs, monkeypatch, caplog):
    model, processor = tiny_multi
    prompts, images = pairs
    expected = RAHFScorer(model, processor, batch_size=2).score(prompts, images)  # every output: keywords too
    scorer = RAHFScorer(model, processor, batch_size=8)
    calls: list[int] = []
    fail_above(scorer.model, 2, calls, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="rahf.oom"):
        got = scorer.score(prompts, images)
    assert_same_feedback(got, expected)  # bitwise: the same batches as a batch-2 run
    assert [r.prompt for r in got] == prompts  # every item in its place
    assert calls == [5, 4, 2, 2, 1]  # 5 items OOM, 4 OOM, then 2 + 2 + 1: no item scored twice
    assert scorer.batch_size == 2 and scorer.requested_batch_size == 8
    assert "scoring settled on batch 2 after out of memory at 5" in caplog.text
    calls.clear()
    scorer.score(prompts[:3], images[:3], scores_only=True)  # a later call starts at the settled size
    assert calls == [2, 1]


def test_scorer_oom_in_a_later_batch_loses_and_duplicates_nothing(tiny_multi, pairs, monkeypatch):
    model, processor = tiny_multi
    prompts, images = pairs
    expected = RAHFScorer(model, processor, batch_size=2).score(prompts, images, scores_only=True)
    scorer = RAHFScorer(model, processor, batch_size=2)
    seen: list[list[str]] = []
    score_batch = scorer._score_batch

    def flaky(batch_prompts, *args):  # the second batch (items 2, 3) runs out of memory once
        seen.append(list(batch_prompts))
        if len(seen) == 2:
            raise oom()
        return score_batch(batch_prompts, *args)

    monkeypatch.setattr(scorer, "_score_batch", flaky)
    got = scorer.score(prompts, images, scores_only=True)
    done = [p for batch in seen[:1] + seen[2:] for p in batch]  # the batches that succeeded
    assert sorted(done) == sorted(prompts) and len(done) == len(prompts)
    assert [len(b) for b in seen] == [2, 2, 1, 1, 1]  # 0-1 at 2; 2-3 OOM; then 2, 3, 4 at 1
    assert [r.prompt for r in got] == prompts and scorer.batch_size == 1
    for a, b in zip(got, expected):  # other batches than the batch-2 run: equal up to float rounding
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_scorer_oom_at_batch_one_raises_or_becomes_that_items_error(tiny_multi, pairs, monkeypatch):
    model, processor = tiny_multi
    prompts, images = pairs
    prompts = list(prompts)
    prompts[1] = "a huge poison prompt"
    expected = RAHFScorer(model, processor, batch_size=1).score(prompts, images, scores_only=True)
    scorer = RAHFScorer(model, processor, batch_size=4)
    score_batch = scorer._score_batch
    seen: list[int] = []

    def poisoned(batch_prompts, *args):
        seen.append(len(batch_prompts))
        if "a huge poison prompt" in batch_prompts:
            raise oom()
        return score_batch(batch_prompts, *args)

    monkeypatch.setattr(scorer, "_score_batch", poisoned)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        scorer.score(prompts, images, scores_only=True)
    assert seen == [4, 2, 1, 1] and scorer.batch_size == 1  # 0-3, 0-1, 0, then 1 alone: raised
    scorer.batch_size, seen[:] = 4, []
    got = scorer.score(prompts, images, scores_only=True, errors="return")
    assert seen == [4, 2, 1, 1, 1, 1, 1]
    assert isinstance(got[1], ScoringFailure) and got[1].index == 1 and got[1].prompt == prompts[1]
    assert "out of memory at batch 1" in got[1].error
    assert_same_feedback(got[:1] + got[2:], expected[:1] + expected[2:])  # the rest: as a batch-1 run


def test_scorer_other_errors_are_not_retried(tiny_multi, pairs, monkeypatch):
    model, processor = tiny_multi
    prompts, images = pairs
    scorer = RAHFScorer(model, processor, batch_size=4)
    calls = []

    def broken(x, *args, **kwargs):
        calls.append(x.shape[0])
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(scorer.model, "forward", broken)
    with pytest.raises(RuntimeError, match="shapes cannot"):
        scorer.score(prompts, images, scores_only=True)
    assert calls == [4] and scorer.batch_size == 4


# -- the generators ------------------------------------------------------------------------------------------------


def pixels(gs) -> list[np.ndarray]:
    return [np.asarray(g.image, np.int16) for g in gs]


@pytest.fixture(scope="module")
def sd():
    from generators.stable_diffusion import StableDiffusionGenerator

    return StableDiffusionGenerator.from_preset(
        "sd-tiny", seed=0, call_kwargs={"num_inference_steps": 2, "guidance_scale": 3.0}
    )


@pytest.mark.slow  # two full runs: about 10 s on two busy cores
def test_sd_generation_halves_on_oom_and_images_equal_the_unfailed_run(sd, monkeypatch, caplog):
    prompts, seeds = ["a red circle", "two blue squares"], [5, 6, 7, 8, 9, 10]
    sd.batch_size = 2
    expected = sd.generate(prompts, 3, seeds=seeds)
    sd.batch_size = sd.requested_batch_size = 8
    calls: list[int] = []
    # guidance doubles the UNet batch; the error comes after the seeds' noise was drawn, so a retry must reseed
    fail_above(sd.pipe.unet, 2, calls, monkeypatch, per_image=2)
    with caplog.at_level(logging.WARNING, logger="rahf.oom"):
        got = sd.generate(prompts, 3, seeds=seeds)
    assert [(g.prompt, g.seed) for g in got] == [(g.prompt, g.seed) for g in expected]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(got), pixels(expected)))  # bitwise
    assert [g.id for g in got] == [g.id for g in expected]
    assert calls[:2] == [6, 4] and set(calls[2:]) == {2}  # 6 OOM, 4 OOM, then 3 batches of 2 (2 steps each)
    assert len(calls[2:]) == 3 * sd.call_kwargs["num_inference_steps"]
    assert sd.batch_size == 2 and sd.requested_batch_size == 8
    assert "generation settled on batch 2 after out of memory at 6" in caplog.text


def test_sd_generation_oom_at_one_image_raises(sd, monkeypatch):
    sd.batch_size = 4
    calls: list[int] = []
    fail_above(sd.pipe.unet, 0, calls, monkeypatch, per_image=2)
    with pytest.raises(torch.OutOfMemoryError):
        sd.generate(["a red circle"], 2, seeds=[1, 2])
    assert calls == [2, 1] and sd.batch_size == 1


def test_amused_samples_one_image_per_call_so_oom_raises_at_once(monkeypatch):
    from generators.amused import AmusedGenerator

    g = AmusedGenerator.from_preset("amused-tiny", seed=0)
    assert g.batch_size == 1
    calls: list[int] = []
    fail_above(g.pipe.transformer, 0, calls, monkeypatch, per_image=2)
    with pytest.raises(torch.OutOfMemoryError):
        g.generate(["a red circle"], 2, seeds=[1, 2])
    assert calls == [1]
