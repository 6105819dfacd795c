"""Shared fixtures: tiny RAHF models at fixed seeds, small images of every kind. Everything offline, on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from rahf.presets import build_rahf

torch.set_num_threads(2)


@pytest.fixture(params=["multi_head", "augmented_prompt"])
def variant(request) -> str:
    return request.param


@pytest.fixture
def tiny(variant):
    """(model, processor) of rahf-tiny in the requested variant, seed 0, eval mode."""
    return build_rahf("rahf-tiny", variant=variant, seed=0)


@pytest.fixture
def tiny_multi():
    return build_rahf("rahf-tiny", variant="multi_head", seed=0)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models gain nothing from a second thread on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def scorer(tiny_multi):
    """A RAHFScorer of rahf-tiny (multi-head, seed 0) scoring two images per batch."""
    from rahf.scorer import RAHFScorer

    model, processor = tiny_multi
    return RAHFScorer(model, processor, batch_size=2)


def random_image(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def images() -> list[Image.Image]:
    return [random_image(i, (80 + 16 * i, 64 + 8 * i)) for i in range(3)]


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for the test session (started by the first test that needs it), its state
    under the test folder, heartbeats off."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    from flows.server import no_heartbeats

    with prefect_test_harness(server_startup_timeout=300), no_heartbeats():
        yield home


def synthetic_split_folder(tmp_path_factory, name: str, sizes: dict[str, int], seed: int, per_prompt: int = 1):
    """A split folder of the synthetic world at rahf-tiny's image size (64 px): {split: example count}."""
    from rahf.data.synthetic import write_split

    folder = tmp_path_factory.mktemp(name)
    for split, n in sizes.items():
        write_split(folder, split, n, size=64, seed=seed, per_prompt=per_prompt)
    return folder


def save_tiny_rahf(folder) -> str:
    """Save rahf-tiny at random init (model and processor) to ``folder``; returns it as a string."""
    from rahf.presets import build_rahf

    model, processor = build_rahf("rahf-tiny")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
