"""Best-of-N selection of finetuning data by predicted scores (paper §5).

The paper generates eight images per prompt, predicts RAHF scores for each, and keeps a prompt's best image
when its score clears a fixed threshold (plausibility >= 0.8 in its Fig. 8 example). Here the ranking value is
one score or a weighted mean of several, every score may carry its own threshold, and the best ``top_k`` per
prompt are kept.

Decisions, for a reproducible data set:

* A threshold is a gate on each candidate: a prompt keeps the ``top_k`` best candidates *that clear every
  threshold*. When the ranking score is the thresholded score (the paper's case) this is exactly "the best
  image, if it clears the threshold". A candidate clears a threshold when its score is ``>=`` it.
* A weighted combination is the weighted mean ``sum(w_i * s_i) / sum(w_i)``, so it stays in [0, 1].
* Ranking: higher value first, then lower seed, then lower id — the same input gives the same selection in any
  order.
* Records with ``error`` set, or whose needed scores (those with a positive weight, and those with a
  threshold) are missing or not finite, are excluded and counted. Records repeating an earlier id are counted
  as duplicates and the later one is used (a manifest's later line supersedes an earlier one).
* Prompts are reported in sorted order; a prompt with fewer candidates than ``expected_per_prompt`` is still
  processed and flagged ``short``.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from common.names import SCORE_NAMES
from common.records import ImageRecord

REASON_BELOW = "below threshold"
REASON_NO_VALID = "no valid candidates"


@dataclass
class SelectionConfig:
    """How the finetuning set is chosen from scored candidates."""

    score: str = "plausibility"  # ranking score, one of SCORE_NAMES (ignored when weights is set)
    weights: dict[str, float] | None = None  # weighted mean of scores as ranking value; overrides score
    thresholds: dict[str, float] = field(default_factory=lambda: {"plausibility": 0.8})  # minimum per score
    top_k: int = 1  # kept candidates per prompt at most
    expected_per_prompt: int | None = 8  # candidates a prompt should have; fewer is reported as short

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on unknown score names, bad weights, bad thresholds or bad counts."""
        if self.weights is None:
            _check_names([self.score], "score")
        else:
            _check_names(self.weights, "weights")
            if any(not math.isfinite(w) or w < 0 for w in self.weights.values()):
                raise ValueError(f"weights must be finite and >= 0, got {self.weights}")
            if not any(w > 0 for w in self.weights.values()):
                raise ValueError(f"at least one weight must be > 0, got {self.weights}")
        _check_names(self.thresholds, "thresholds")
        if any(not (math.isfinite(t) and 0.0 <= t <= 1.0) for t in self.thresholds.values()):
            raise ValueError(f"thresholds must be in [0, 1], got {self.thresholds}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.expected_per_prompt is not None and self.expected_per_prompt < 1:
            raise ValueError(f"expected_per_prompt must be >= 1 or None, got {self.expected_per_prompt}")

    def ranking_weights(self) -> dict[str, float]:
        """Positive weights of the ranking value, summing to 1 (``{score: 1.0}`` for a single score)."""
        if self.weights is None:
            return {self.score: 1.0}
        total = sum(self.weights.values())
        return {k: w / total for k, w in sorted(self.weights.items()) if w > 0}

    def needed_scores(self) -> list[str]:
        """Scores a candidate must have (finite) to be ranked and gated, in SCORE_NAMES order."""
        needed = set(self.ranking_weights()) | set(self.thresholds)
        return [s for s in SCORE_NAMES if s in needed]

    def summary(self) -> dict[str, Any]:
        """JSON-able description, recorded in every selected record's ``selection``."""
        ranking: dict[str, Any] = {"score": self.score} if self.weights is None else {"weights": dict(self.weights)}
        return {
            **ranking,
            "thresholds": dict(sorted(self.thresholds.items())),
            "top_k": self.top_k,
            "expected_per_prompt": self.expected_per_prompt,
        }


def _check_names(names: Any, what: str) -> None:
    unknown = sorted(set(names) - set(SCORE_NAMES))
    if unknown:
        raise ValueError(f"unknown score name(s) in {what}: {unknown}; expected some of {list(SCORE_NAMES)}")


def _finite_score(record: ImageRecord, name: str) -> float | None:
    v = record.scores.get(name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        return None
    return float(v)


def selection_value(record: ImageRecord, config: SelectionConfig) -> float:
    """Ranking value of one record: its ``config.score``, or the weighted mean of ``config.weights``; in [0, 1]
    for scores in [0, 1]. Raises ValueError when a needed score is missing or not finite."""
    total = 0.0
    for name, w in config.ranking_weights().items():
        v = _finite_score(record, name)
        if v is None:
            raise ValueError(f"record {record.id} has no finite {name!r} score")
        total += w * v
    return total


@dataclass
class PromptSummary:
    """What happened to one prompt's candidates."""

    prompt: str
    candidates: int  # records with this prompt (distinct ids)
    valid: int  # candidates without error and with every needed score finite
    best_value: float | None  # highest selection value among valid candidates, None when there are none
    kept: int  # selected candidates, 0..top_k
    reason: str | None  # why none was kept: "below threshold" or "no valid candidates"; None when kept > 0
    short: bool  # fewer candidates than expected_per_prompt


@dataclass
class SelectionResult:
    """The kept records (copies with ``selection`` filled) and what was left out, and why."""

    config: SelectionConfig
    selected: list[ImageRecord]
    prompts: list[PromptSummary]
    excluded_error: int = 0
    excluded_missing: int = 0
    duplicates: int = 0
    prompts_short: int = 0
    prompts_without_selection: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-able counts, the config, and one row per prompt."""
        return {
            "config": self.config.summary(),
            "prompts": len(self.prompts),
            "selected": len(self.selected),
            "excluded_error": self.excluded_error,
            "excluded_missing": self.excluded_missing,
            "duplicates": self.duplicates,
            "prompts_short": self.prompts_short,
            "prompts_without_selection": self.prompts_without_selection,
            "per_prompt": [asdict(p) for p in self.prompts],
        }


def _clears(record: ImageRecord, thresholds: dict[str, float]) -> bool:
    return all(_finite_score(record, name) >= t for name, t in thresholds.items())  # type: ignore[operator]


def rank_candidates(records: Sequence[ImageRecord], config: SelectionConfig) -> list[tuple[float, ImageRecord]]:
    """(value, record) pairs, best first: higher value, then lower seed, then lower id. Every record must have
    its needed scores."""
    pairs = [(selection_value(r, config), r) for r in records]
    return sorted(pairs, key=lambda vr: (-vr[0], vr[1].seed, vr[1].id))


def _group_by_prompt(records: Sequence[ImageRecord]) -> tuple[dict[str, list[ImageRecord]], int]:
    """Prompt -> its records (later duplicates of an id replace earlier ones), and the number of duplicates."""
    by_id: dict[str, ImageRecord] = {}
    for r in records:
        by_id[r.id] = r
    groups: dict[str, list[ImageRecord]] = {}
    for r in by_id.values():
        groups.setdefault(r.prompt, []).append(r)
    return groups, len(records) - len(by_id)


def select_best(records: Sequence[ImageRecord], config: SelectionConfig | None = None) -> SelectionResult:
    """Per prompt, the ``top_k`` highest-valued candidates that clear every threshold.

    Args:
        records: scored candidates of any number of prompts, in any order.
        config: selection policy; default plausibility, threshold 0.8, top 1 of 8.
    Returns:
        a :class:`SelectionResult`; ``selected`` is ordered by (prompt, rank) and each copy's ``selection`` holds
        ``rank`` (1 = best valid candidate of its prompt), ``value``, ``candidates``, ``valid`` and ``config``.
    """
    config = config or SelectionConfig()
    config.validate()
    groups, duplicates = _group_by_prompt(records)
    needed = config.needed_scores()
    result = SelectionResult(config=config, selected=[], prompts=[], duplicates=duplicates)
    for prompt in sorted(groups):
        cands = groups[prompt]
        errors = sum(bool(r.error) for r in cands)
        valid = [r for r in cands if not r.error and all(_finite_score(r, s) is not None for s in needed)]
        result.excluded_error += errors
        result.excluded_missing += len(cands) - errors - len(valid)
        ranked = rank_candidates(valid, config)
        kept = [(rank, v, r) for rank, (v, r) in enumerate(ranked, 1) if _clears(r, config.thresholds)]
        kept = kept[: config.top_k]
        for rank, v, r in kept:
            chosen = copy.deepcopy(r)
            chosen.selection = {
                "rank": rank,
                "value": v,
                "candidates": len(cands),
                "valid": len(valid),
                "config": config.summary(),
            }
            result.selected.append(chosen)
        short = config.expected_per_prompt is not None and len(cands) < config.expected_per_prompt
        reason = None if kept else (REASON_BELOW if valid else REASON_NO_VALID)
        best = ranked[0][0] if ranked else None
        result.prompts.append(PromptSummary(prompt, len(cands), len(valid), best, len(kept), reason, short))
        result.prompts_short += short
        result.prompts_without_selection += not kept
    return result
