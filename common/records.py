"""The records that travel between the packages, and the scorer interface (torch- and PIL-free; numpy only).

* :class:`ImageRecord`: the JSON record of one image in a run store (provenance, file URIs, scores, decisions).
* :class:`RichFeedback`: what a scorer says about one (prompt, image) pair: four scores, heatmaps, keywords.
* :class:`ScoringFailure`: stands in for a :class:`RichFeedback` when an input could not be scored.
* :class:`Scorer`: the ``score`` call every scorer offers (``rahf.scorer.RAHFScorer``, the synthetic world's
  ``GroundTruthScorer``, the loop-gain benchmark's ``RandomScorer``).

Tell a failure from feedback with ``isinstance(fb, ScoringFailure)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class RichFeedback:
    """The rich feedback of one (prompt, image) pair; every value in [0, 1], higher score = better."""

    prompt: str
    scores: dict[str, float]  # common.names.SCORE_NAMES -> value
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (H, W) float32 in [0, 1]
    misaligned_keywords: list[str] = field(default_factory=list)
    keyword_sequence: str | None = None  # the decoded prompt with `_0` marks; None when not generated
    prompt_truncated: bool = False  # the prompt was longer than the model's token limit and was cut


@dataclass
class ScoringFailure:
    """Stands in for a :class:`RichFeedback` at position ``index`` when that input could not be scored
    (``score(..., errors="return")``); ``error`` says why."""

    index: int
    prompt: str
    error: str


@runtime_checkable
class Scorer(Protocol):
    """Scores (prompt, image) pairs. ``identity`` says what scored them (recorded beside every score), e.g.
    ``{"source": ..., "weights_hash": ...}``."""

    @property
    def identity(self) -> Mapping[str, Any]: ...

    def score(
        self,
        prompt: str | Sequence[str],
        images: Sequence[Any],
        *,
        heatmaps: Sequence[str] | None = None,
        keywords: bool = True,
        scores_only: bool = False,
        errors: str = "raise",
    ) -> list[RichFeedback | ScoringFailure]:
        """One result per image, in order.

        Args:
            prompt: one prompt for all images, or one per image.
            images: PIL images (a scorer may accept more: paths, encoded bytes).
            heatmaps: heatmap names to predict (default all); ``()`` for none.
            keywords: find the prompt's misaligned keywords.
            scores_only: only the four scores (no heatmaps, no keywords).
            errors: ``"raise"`` stops at the first input that cannot be scored; ``"return"`` puts a
                :class:`ScoringFailure` at its position and scores the rest.
        """
        ...


class GeneratedLike(Protocol):
    """What :meth:`ImageRecord.from_generated` reads of a generated image (``generators.base.GeneratedImage``)."""

    @property
    def id(self) -> str: ...

    prompt: str
    seed: int
    params: dict[str, Any]
    truth: dict[str, Any] | None

    @property
    def generator(self) -> Any: ...  # has .to_dict()


@dataclass
class ImageRecord:
    """One manifest line: an image's provenance, where its files are, and what was measured and decided about it.

    ``stage`` is ``generated`` or ``repaired``; ``parent_id`` links a repair to its original; ``error`` is set
    (and the scores left empty) when an item failed, so one bad item never sinks a batch.
    """

    id: str
    prompt: str
    seed: int
    generator: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    image_uri: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    heatmap_uris: dict[str, str] = field(default_factory=dict)
    keywords: list[str] = field(default_factory=list)
    rahf: dict[str, Any] | None = None
    stage: str = "generated"
    parent_id: str | None = None
    selection: dict[str, Any] | None = None
    truth: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> ImageRecord:
        return cls(**json.loads(line))

    @classmethod
    def from_generated(cls, g: GeneratedLike, image_uri: str = "") -> ImageRecord:
        """The record of a freshly generated image; its ground truth keeps the JSON-able part (no ``maps``)."""
        truth = None
        if g.truth is not None:
            truth = {k: v for k, v in g.truth.items() if k != "maps"}
        return cls(g.id, g.prompt, g.seed, g.generator.to_dict(), dict(g.params), image_uri, truth=truth)
