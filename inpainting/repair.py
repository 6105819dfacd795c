"""Best-of-N repair of implausible (or misaligned) regions (paper §5, Fig. 9).

implausibility heatmap -> mask (:mod:`inpainting.masks`) -> N inpainted candidates with recorded seeds (the
generator pastes untouched pixels back exactly) -> every candidate rescored by RAHF -> the best by the chosen
score (plausibility by default, or a weighted combination) is accepted only if it beats the original by
``margin``. With ``heat_drop > 0`` a candidate must also lower the mean predicted implausibility heat inside the
mask to at most ``1 - heat_drop`` times the original's (the candidates are then scored with their heatmaps): the
whole-image score is a noisy judge of a small repainted region, the heat over that region a direct one. The
result keeps every candidate's scores and the decision. An empty mask returns the original, marked "nothing to
repair".

``map="misalignment"`` repairs what the image gets wrong about its prompt instead (beyond the paper, which repairs
implausibility only): the mask comes from the predicted misalignment heatmap, the heat check is on that map, and
:meth:`RepairConfig.for_map` ranks candidates by alignment. The inpainting prompt is the original prompt, which
carries the misaligned keywords the scorer names (recorded in the result as ``keywords``); no backend takes word
emphasis, so the keywords are not weighted further.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np
from PIL import Image

from common.names import HEATMAP_NAMES, SCORE_NAMES
from common.records import Scorer, ScoringFailure
from generators.base import GeneratedImage, Generator
from inpainting.masks import MaskConfig, heatmap_to_mask, mask_area, mask_to_image

#: the score a repair by each map (a name of HEATMAP_NAMES) is judged by (:meth:`RepairConfig.for_map`)
MAP_SCORES: dict[str, str] = dict(zip(HEATMAP_NAMES, ("plausibility", "alignment"), strict=True))

NOTHING_TO_REPAIR = "nothing to repair"
IMPROVED = "improved"
NOT_BETTER = "no candidate beats the original by the margin"


@dataclass
class RepairConfig:
    """Every knob of a repair."""

    mask: MaskConfig = field(default_factory=MaskConfig)
    n: int = 4  # inpainted candidates
    seed: int = 0  # candidate k gets seed + k
    score: str = "plausibility"  # the score that picks the winner ...
    weights: dict[str, float] | None = None  # ... or a weighted combination of scores (overrides ``score``)
    margin: float = 0.02  # accept only if the winner beats the original by more than this
    #: in [0, 1): a candidate qualifies only if its mean predicted heat (of ``map``) inside the mask is at most
    #: (1 - heat_drop) x the original's; 0 turns the check off (and scores candidates without heatmaps)
    heat_drop: float = 0.0
    #: the predicted heatmap the mask and the heat check come from; set ``score`` to match (:meth:`for_map`)
    map: str = "implausibility"
    #: a candidate qualifies only if none of the scores it is not ranked by (``guarded``) falls below the
    #: original's by more than this; None turns the guard off. Inpainting can fix one flaw and make another
    #: (recolour an object it redraws): the guard keeps a plausibility gain from costing alignment.
    guard: float | None = None

    @property
    def guarded(self) -> tuple[str, ...]:
        """The scores the guard watches: every score but the ones candidates are ranked by."""
        ranked = set(self.weights or {self.score: 1.0})
        return tuple(n for n in SCORE_NAMES if n not in ranked) if self.guard is not None else ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.heat_drop < 1.0:
            raise ValueError(f"heat_drop must be in [0, 1), got {self.heat_drop}")
        if self.map not in MAP_SCORES:
            raise ValueError(f"map must be one of {tuple(MAP_SCORES)}, got {self.map!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.guard is not None and not self.guard >= 0.0:
            raise ValueError(f"guard must be >= 0 or None, got {self.guard}")
        names = set(self.weights or {self.score: 1.0})
        if names - set(SCORE_NAMES):
            raise ValueError(f"unknown score names {sorted(names - set(SCORE_NAMES))}; use {SCORE_NAMES}")
        if self.weights is not None and (any(w < 0 for w in self.weights.values()) or not sum(self.weights.values())):
            raise ValueError(f"weights must be non-negative and not all zero, got {self.weights}")

    def for_map(self, map: str) -> RepairConfig:
        """This config repairing by ``map``, candidates ranked by the map's score (plausibility for implausibility,
        alignment for misalignment, :data:`MAP_SCORES`) instead of any ``score`` or ``weights``."""
        if map not in MAP_SCORES:
            raise ValueError(f"map must be one of {tuple(MAP_SCORES)}, got {map!r}")
        return replace(self, map=map, score=MAP_SCORES[map], weights=None)

    def value(self, scores: Mapping[str, float]) -> float:
        """The number candidates are ranked by: one score, or the weighted mean of several."""
        if self.weights is None:
            return float(scores[self.score])
        return sum(w * float(scores[k]) for k, w in self.weights.items()) / sum(self.weights.values())


def loop_repair_config() -> RepairConfig:
    """The repair settings the loop-gain benchmark supports (docs/results.md "Repair levers"), the defaults of the
    feedback loop and of ``richfeedback bench-loop``: a mask of the heat above 0.4 x the map's own maximum and
    above 0.1, dilated by 6 % of the image side; a candidate must lower the mean predicted heat inside the mask by
    2 % and beat the original's plausibility (margin 0: the heat check guards against false accepts), and no
    other predicted score may fall (guard 0: an inpainter that redraws an object can recolour it)."""
    mask = MaskConfig(threshold=0.4, threshold_mode="relative", floor=0.1, dilate_frac=0.06)
    return RepairConfig(mask=mask, margin=0.0, heat_drop=0.02, guard=0.0)


@dataclass
class RepairCandidate:
    generated: GeneratedImage
    scores: dict[str, float]
    value: float
    error: str | None = None
    mask_heat: float | None = None  # mean predicted heat of the repair's map inside the mask (when heat_drop > 0)


@dataclass
class RepairResult:
    """The outcome: ``image`` is the accepted candidate's or the original's."""

    image: Image.Image
    accepted: bool
    reason: str
    original_scores: dict[str, float]
    original_value: float
    mask: Image.Image | None
    mask_area: float
    candidates: list[RepairCandidate]
    chosen: int | None  # index into candidates of the best one (accepted or not)
    original_mask_heat: float | None = None  # the original's mean predicted heat of the map inside the mask
    map: str = "implausibility"  # the heatmap the mask came from
    #: misaligned keywords the scorer named for the original (misalignment repair); the prompt carries them
    keywords: list[str] = field(default_factory=list)

    @property
    def accepted_candidate(self) -> RepairCandidate | None:
        return self.candidates[self.chosen] if self.accepted and self.chosen is not None else None

    def summary(self) -> dict[str, Any]:
        """JSON-able decision record: every candidate's seed, id and scores, the choice and why."""
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "map": self.map,
            "keywords": list(self.keywords),
            "original_scores": self.original_scores,
            "original_value": self.original_value,
            "mask_area": self.mask_area,
            "original_mask_heat": self.original_mask_heat,
            "chosen": self.chosen,
            "candidates": [
                {
                    "id": c.generated.id,
                    "seed": c.generated.seed,
                    "scores": c.scores,
                    "value": c.value,
                    "mask_heat": c.mask_heat,
                    "error": c.error,
                }
                for c in self.candidates
            ],
        }


def repair(
    image: Image.Image,
    prompt: str,
    generator: Generator,
    scorer: Scorer,
    config: RepairConfig | None = None,
    *,
    heatmap: np.ndarray | None = None,
    original_scores: Mapping[str, float] | None = None,
    keywords: Sequence[str] | None = None,
) -> RepairResult:
    """Repair one image.

    Args:
        image: RGB image to repair.
        prompt: its prompt; also the inpainting prompt.
        generator: the inpainter (its ``cell_size`` sets the smallest dilation).
        scorer: RAHF; scores the original (unless both ``heatmap`` and ``original_scores`` are given, or
            ``keywords`` for a misalignment repair) and every candidate.
        heatmap: (h, w) float in [0, 1], the heatmap of ``config.map`` at any resolution; predicted when None.
        original_scores: the original's four scores, when already known.
        keywords: the original's misaligned keywords, when already known (misalignment repair only; predicted
            when None).
    """
    config = config or RepairConfig()
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB, got mode {image.mode!r}")
    want_words = config.map == "misalignment" and keywords is None
    if heatmap is None or original_scores is None or want_words:
        fb = scorer.score(prompt, [image], heatmaps=(config.map,), keywords=want_words)[0]
        heatmap = fb.heatmaps[config.map] if heatmap is None else heatmap
        original_scores = fb.scores if original_scores is None else original_scores
        keywords = list(fb.misaligned_keywords) if want_words else keywords
    words = [str(w) for w in keywords or []] if config.map == "misalignment" else []
    original_scores = {k: float(v) for k, v in original_scores.items()}
    original_value = config.value(original_scores)
    mask = heatmap_to_mask(np.asarray(heatmap, np.float32), image.size, config.mask, generator.cell_size)
    area = mask_area(mask)
    if area == 0.0:
        return RepairResult(
            image, False, NOTHING_TO_REPAIR, original_scores, original_value, None, 0.0, [], None, None, config.map,
            words,
        )  # fmt: skip
    mask_image = mask_to_image(mask)
    seeds = [config.seed + k for k in range(config.n)]
    generated = generator.inpaint(image, mask_image, prompt, config.n, seeds)
    candidates = _score_candidates(generated, prompt, scorer, config, mask)
    valid = [i for i, c in enumerate(candidates) if c.error is None]
    original_heat = None
    if config.heat_drop > 0:
        original_heat = mean_heat_in_mask(np.asarray(heatmap, np.float32), mask)
        limit = (1.0 - config.heat_drop) * original_heat
        valid = [i for i in valid if candidates[i].mask_heat is not None and candidates[i].mask_heat <= limit]
    for name in config.guarded:  # no other score may fall by more than the guard
        floor = original_scores[name] - float(config.guard or 0.0)
        valid = [i for i in valid if candidates[i].scores[name] >= floor]
    chosen = max(valid, key=lambda i: (candidates[i].value, -candidates[i].generated.seed)) if valid else None
    accepted = chosen is not None and candidates[chosen].value > original_value + config.margin
    result_image = candidates[chosen].generated.image if accepted else image
    reason = IMPROVED if accepted else NOT_BETTER
    return RepairResult(
        result_image,
        accepted,
        reason,
        original_scores,
        original_value,
        mask_image,
        area,
        candidates,
        chosen,
        original_heat,
        config.map,
        words,
    )


def mean_heat_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Mean of an (h, w) heatmap in [0, 1], resized (bilinear) to the (H, W) mask, over the mask's repainted
    pixels (> 127); 0.0 for an empty mask."""
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.ndim != 2 or np.asarray(mask).ndim != 2:
        raise ValueError(f"heatmap and mask must be 2-D, got shapes {heatmap.shape} and {np.asarray(mask).shape}")
    inside = np.asarray(mask) > 127
    if not inside.any():
        return 0.0
    if heatmap.shape != inside.shape:
        heatmap = cv2.resize(heatmap, (inside.shape[1], inside.shape[0]), interpolation=cv2.INTER_LINEAR)
    return float(heatmap[inside].mean())


def _score_candidates(
    generated: Sequence[GeneratedImage], prompt: str, scorer: Scorer, config: RepairConfig, mask: np.ndarray
) -> list[RepairCandidate]:
    images = [g.image for g in generated]
    if config.heat_drop > 0:
        feedback = scorer.score(prompt, images, heatmaps=(config.map,), keywords=False, errors="return")
    else:
        feedback = scorer.score(prompt, images, scores_only=True, errors="return")
    out = []
    for g, fb in zip(generated, feedback):
        if isinstance(fb, ScoringFailure):  # recorded, never chosen
            out.append(RepairCandidate(g, {}, float("-inf"), fb.error))
            continue
        scores = {k: float(v) for k, v in fb.scores.items()}
        heat = None
        if config.heat_drop > 0:
            heat = mean_heat_in_mask(np.asarray(fb.heatmaps[config.map], np.float32), mask)
        out.append(RepairCandidate(g, scores, config.value(scores), mask_heat=heat))
    return out
