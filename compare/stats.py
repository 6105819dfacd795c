"""Paired statistics of a before/after checkpoint comparison: the automatic counterpart of the paper's Table 5.

The paper (§5, Table 5) had six raters compare images of the original Muse (A) and the finetuned Muse (B) for
the same prompts on a five-point side-by-side scale: B ≫ A, B > A, B ≈ A, B < A, B ≪ A. Here RAHF's scores stand
in for the raters. A and B images are paired on (prompt, seed), and for every score (plausibility, alignment,
aesthetics, overall; all in [0, 1]) we report:

* mean A, mean B and the paired mean difference d̄ = mean(B − A);
* a paired bootstrap 95 % interval of d̄: the pairs are resampled with replacement ``n_boot`` times (default
  10 000) from ``np.random.default_rng(seed)``, all scores with the same resampled indices, and the interval is
  the 2.5th and 97.5th percentile (linear interpolation) of the resampled means;
* win / tie / loss counts: B wins a pair when d > ``tie``, ties when |d| ≤ ``tie``, loses when d < −``tie``;
* the five-bin fractions of the per-pair differences d (see :class:`BinThresholds`).

Thresholds (a choice, not fitted to raters; :mod:`compare.rating` collects the human ratings to check it).
RichHF-18K score labels are the mean of three ratings on a 1–5 scale mapped to [0, 1], so one rater moving one
step moves a label by 0.25 / 3 ≈ 0.083, the smallest difference a label can show. ``tie = 0.02`` is a quarter of
that step: a smaller difference is scorer noise, not a preference. ``strong = 0.15`` is about two such steps, a
difference a side-by-side rater would call "significantly" better or worse. Comparisons use a tolerance of 1e-9,
so a decimal difference equal to a threshold (0.62 − 0.60) falls in the inner bin despite rounding.

Pairs with an ``error`` or no scores on either side, unmatched records and duplicates are counted in a
:class:`PairingReport`, never dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_text
from common.bootstrap import bootstrap_means
from common.names import SCORE_NAMES
from common.records import ImageRecord

logger = logging.getLogger(__name__)

#: the paper's five side-by-side bins, B relative to A, best first
BINS = ("much_better", "better", "same", "worse", "much_worse")
#: how the paper writes each bin
BIN_SYMBOLS = {"much_better": "B ≫ A", "better": "B > A", "same": "B ≈ A", "worse": "B < A", "much_worse": "B ≪ A"}
#: tolerance of the threshold comparisons (scores are in [0, 1])
THRESHOLD_TOL = 1e-9


@dataclass(frozen=True)
class BinThresholds:
    """Score-difference thresholds of the five bins, on d = B − A with scores in [0, 1].

    |d| ≤ ``tie`` → B ≈ A; ``tie`` < |d| ≤ ``strong`` → B > A or B < A; |d| > ``strong`` → B ≫ A or B ≪ A.
    """

    tie: float = 0.02  # a quarter of one rater step (0.25 / 3) of a RichHF-18K label: no difference
    strong: float = 0.15  # about two rater steps: "significantly" better or worse

    def __post_init__(self) -> None:
        if not (0 <= self.tie < self.strong <= 1):
            raise ValueError(f"need 0 <= tie < strong <= 1, got tie={self.tie}, strong={self.strong}")


def bin_differences(d: np.ndarray, thresholds: BinThresholds) -> np.ndarray:
    """Bin index into :data:`BINS` (0 = B ≫ A … 4 = B ≪ A) of each difference; (N,) float -> (N,) int."""
    d = np.asarray(d, np.float64)
    a = np.abs(d)
    strong = a > thresholds.strong + THRESHOLD_TOL
    slight = (a > thresholds.tie + THRESHOLD_TOL) & ~strong
    out = np.full(d.shape, 2, np.int64)
    out[slight & (d > 0)], out[slight & (d < 0)] = 1, 3
    out[strong & (d > 0)], out[strong & (d < 0)] = 0, 4
    return out


# ---------------------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PairingReport:
    """What :func:`pair_records` could not pair, and why. Keys are ``{"prompt", "seed"}`` dicts."""

    n_a: int
    n_b: int
    n_pairs: int
    only_a: list[dict[str, Any]] = field(default_factory=list)  # key in A, not in B
    only_b: list[dict[str, Any]] = field(default_factory=list)  # key in B, not in A
    errored: list[dict[str, Any]] = field(default_factory=list)  # matched, but an error or no scores on a side
    duplicates_a: list[dict[str, Any]] = field(default_factory=list)  # repeats of a key in A (first one kept)
    duplicates_b: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return len(self.only_a) + len(self.only_b) + len(self.errored) + len(self.duplicates_a) + len(self.duplicates_b)

    def summary(self) -> str:
        """One line, e.g. ``98 pairs of 100 A / 99 B records; dropped: 1 only in A, 1 errored``."""
        parts = [
            f"{len(v)} {k}"
            for k, v in (
                ("only in A", self.only_a),
                ("only in B", self.only_b),
                ("errored", self.errored),
                ("duplicate in A", self.duplicates_a),
                ("duplicate in B", self.duplicates_b),
            )
            if v
        ]
        head = f"{self.n_pairs} pairs of {self.n_a} A / {self.n_b} B records"
        return head + ("; dropped: " + ", ".join(parts) if parts else "; nothing dropped")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_dropped": self.n_dropped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairingReport:
        return cls(**{k: v for k, v in d.items() if k != "n_dropped"})


class Pairs(list[tuple[ImageRecord, ImageRecord]]):
    """The matched ``(A record, B record)`` pairs, in A's order, with the :class:`PairingReport` as ``report``."""

    def __init__(self, pairs: Iterable[tuple[ImageRecord, ImageRecord]], report: PairingReport) -> None:
        super().__init__(pairs)
        self.report = report


def _key(r: ImageRecord) -> tuple[str, int]:
    return (r.prompt, int(r.seed))


def _index(records: Sequence[ImageRecord]) -> tuple[dict[tuple[str, int], ImageRecord], list[dict[str, Any]]]:
    first: dict[tuple[str, int], ImageRecord] = {}
    dups = []
    for r in records:
        if _key(r) in first:
            dups.append({"prompt": r.prompt, "seed": int(r.seed), "id": r.id})
        else:
            first[_key(r)] = r
    return first, dups


def _problem(r: ImageRecord) -> str | None:
    if r.error:
        return r.error
    return None if r.scores else "no scores"


def pair_records(a: Sequence[ImageRecord], b: Sequence[ImageRecord]) -> Pairs:
    """Match checkpoint A's and B's records on (prompt, seed).

    Returns a :class:`Pairs` list of ``(a_record, b_record)`` in A's order; ``.report`` counts and lists what was
    left out: keys found on one side only, pairs with an ``error`` (or no scores) on either side, and repeated
    keys (the first record of a key is used). Anything left out is also logged as a warning.
    """
    ia, dup_a = _index(a)
    ib, dup_b = _index(b)
    report = PairingReport(len(a), len(b), 0, duplicates_a=dup_a, duplicates_b=dup_b)
    pairs = []
    for k, ra in ia.items():
        if k not in ib:
            report.only_a.append({"prompt": k[0], "seed": k[1], "error": ra.error})
            continue
        rb = ib[k]
        pa, pb = _problem(ra), _problem(rb)
        if pa or pb:
            report.errored.append({"prompt": k[0], "seed": k[1], "error_a": pa, "error_b": pb})
        else:
            pairs.append((ra, rb))
    report.only_b = [{"prompt": k[0], "seed": k[1], "error": rb.error} for k, rb in ib.items() if k not in ia]
    report.n_pairs = len(pairs)
    if report.n_dropped:
        logger.warning("pair_records: %s", report.summary())
    return Pairs(pairs, report)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ScoreStats:
    """Paired statistics of one score over all pairs; ``diff`` is the mean of d = B − A."""

    name: str
    n: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    bin_counts: dict[str, int]
    bin_fractions: dict[str, float]


@dataclass
class PromptStats:
    """One prompt: means over its seeds of A's and B's scores and their difference, per score."""

    prompt: str
    seeds: list[int]
    mean_a: dict[str, float]
    mean_b: dict[str, float]
    diff: dict[str, float]


@dataclass
class ComparisonStats:
    """Everything :func:`compare_scores` measured; JSON-able through :meth:`to_dict`."""

    n_pairs: int
    n_boot: int
    seed: int
    thresholds: BinThresholds
    scores: dict[str, ScoreStats]
    prompts: list[PromptStats]
    pairing: PairingReport | None = None
    #: the same statistics of the true scores and ``implausible_area`` (synthetic world), when every record of
    #: every pair carries ground truth (:func:`truth_pairs`); None otherwise
    truth: ComparisonStats | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bins"] = list(BINS)
        d["pairing"] = self.pairing.to_dict() if self.pairing is not None else None
        d["truth"] = self.truth.to_dict() if self.truth is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ComparisonStats:
        return cls(
            n_pairs=d["n_pairs"],
            n_boot=d["n_boot"],
            seed=d["seed"],
            thresholds=BinThresholds(**d["thresholds"]),
            scores={k: ScoreStats(**v) for k, v in d["scores"].items()},
            prompts=[PromptStats(**p) for p in d["prompts"]],
            pairing=PairingReport.from_dict(d["pairing"]) if d.get("pairing") else None,
            truth=ComparisonStats.from_dict(d["truth"]) if d.get("truth") else None,
        )

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as indented JSON (temp file, then rename); returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    def prompt_order(self, score: str = "overall") -> list[PromptStats]:
        """Prompts by mean difference of ``score`` (first of the compared scores when absent), largest first."""
        name = score if score in self.scores else next(iter(self.scores))
        return sorted(self.prompts, key=lambda p: -p.diff[name])


def _score_names(pairs: Sequence[tuple[ImageRecord, ImageRecord]], names: Sequence[str] | None) -> list[str]:
    if names is None:
        present = pairs[0][0].scores
        names = [n for n in SCORE_NAMES if n in present] + sorted(n for n in present if n not in SCORE_NAMES)
    if not names:
        raise ValueError("no score names to compare")
    return list(names)


def score_matrix(pairs: Sequence[tuple[ImageRecord, ImageRecord]], names: Sequence[str]) -> np.ndarray:
    """(2, N, S) float64 array of A's (index 0) and B's scores; every score must be present and in [0, 1]."""
    out = np.empty((2, len(pairs), len(names)), np.float64)
    for i, pair in enumerate(pairs):
        for side, r in enumerate(pair):
            for j, n in enumerate(names):
                v = r.scores.get(n)
                if v is None or not math.isfinite(v) or not 0 <= v <= 1:
                    raise ValueError(f"pair {i} ({r.prompt!r}, seed {r.seed}) side {'AB'[side]}: {n} = {v!r}")
                out[side, i, j] = v
    return out


def _score_stats(name: str, a: np.ndarray, b: np.ndarray, boot: np.ndarray, th: BinThresholds) -> ScoreStats:
    d = b - a
    counts = np.bincount(bin_differences(d, th), minlength=len(BINS))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    n = len(d)
    return ScoreStats(
        name=name,
        n=n,
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        diff=float(d.mean()),
        ci_low=float(lo),
        ci_high=float(hi),
        wins=int(counts[:2].sum()),
        ties=int(counts[2]),
        losses=int(counts[3:].sum()),
        bin_counts={k: int(c) for k, c in zip(BINS, counts)},
        bin_fractions={k: float(c) / n for k, c in zip(BINS, counts)},
    )


def _prompt_stats(
    pairs: Sequence[tuple[ImageRecord, ImageRecord]], s: np.ndarray, names: list[str]
) -> list[PromptStats]:
    rows: dict[str, list[int]] = {}
    for i, (ra, _) in enumerate(pairs):
        rows.setdefault(ra.prompt, []).append(i)
    out = []
    for prompt, idx in rows.items():
        ma, mb = s[0, idx].mean(axis=0), s[1, idx].mean(axis=0)
        out.append(
            PromptStats(
                prompt=prompt,
                seeds=[int(pairs[i][0].seed) for i in idx],
                mean_a={n: float(v) for n, v in zip(names, ma)},
                mean_b={n: float(v) for n, v in zip(names, mb)},
                diff={n: float(v) for n, v in zip(names, (s[1, idx] - s[0, idx]).mean(axis=0))},
            )
        )
    return out


#: what the truth side of a comparison compares: the four true scores and the true implausible area
TRUTH_NAMES = (*SCORE_NAMES, "implausible_area")


def truth_pairs(pairs: Sequence[tuple[ImageRecord, ImageRecord]]) -> Pairs | None:
    """The pairs with each record's scores replaced by its ground truth (``truth["scores"]`` and
    ``truth["implausible_area"]``, the synthetic world's; :data:`TRUTH_NAMES`), or None when a record has none."""
    out = []
    for pair in pairs:
        sides = []
        for r in pair:
            t = r.truth
            if not t or not all(n in t.get("scores", {}) for n in SCORE_NAMES) or "implausible_area" not in t:
                return None
            scores = {**{n: float(t["scores"][n]) for n in SCORE_NAMES}, "implausible_area": t["implausible_area"]}
            sides.append(replace(r, scores=scores, truth=None))
        out.append((sides[0], sides[1]))
    report = getattr(pairs, "report", None)
    return Pairs(out, report if report is not None else PairingReport(len(out), len(out), len(out)))


def compare_scores(
    pairs: Sequence[tuple[ImageRecord, ImageRecord]],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    thresholds: BinThresholds | None = None,
    score_names: Sequence[str] | None = None,
) -> ComparisonStats:
    """Paired comparison of B against A on every score (see the module docstring).

    Args:
        pairs: ``(a_record, b_record)`` of the same prompt and seed (from :func:`pair_records`, whose report is
            kept in ``pairing``); every record needs every compared score in [0, 1].
        n_boot: bootstrap resamples (≥ 1).
        seed: seed of ``np.random.default_rng`` for the resampling.
        thresholds: bin thresholds (default :class:`BinThresholds()`).
        score_names: scores to compare; default the first pair's A scores, in :data:`SCORE_NAMES` order.

    When every record carries ground truth (the synthetic world), ``truth`` holds the same statistics of the true
    scores and implausible area (:func:`truth_pairs`, the same ``n_boot``, ``seed`` and thresholds).
    """
    if not pairs:
        raise ValueError("no pairs to compare (see the pairing report)")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    th = thresholds if thresholds is not None else BinThresholds()
    names = _score_names(pairs, score_names)
    s = score_matrix(pairs, names)
    boot = bootstrap_means(s[1] - s[0], n_boot, seed)
    true = truth_pairs(pairs)
    return ComparisonStats(
        n_pairs=len(pairs),
        n_boot=n_boot,
        seed=seed,
        thresholds=th,
        scores={n: _score_stats(n, s[0, :, j], s[1, :, j], boot[:, j], th) for j, n in enumerate(names)},
        prompts=_prompt_stats(pairs, s, names),
        pairing=getattr(pairs, "report", None),
        truth=compare_scores(true, n_boot=n_boot, seed=seed, thresholds=th, score_names=TRUTH_NAMES) if true else None,
    )
