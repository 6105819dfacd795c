"""The loop-gain benchmark: how much of the ground-truth oracle's *true* gain a scorer achieves in the feedback
loop, on the synthetic world, where every image's true scores are known.

For every scorer (e.g. random, a RAHF model, the oracle :class:`~generators.synthetic.GroundTruthScorer`) the
loop runs ``rounds`` times from the same base world, on the same prompts and seeds:

1. generate ``per_prompt`` candidates for each of ``prompts`` training prompts (round r uses seeds
   ``r * per_prompt + k``), score them with the scorer;
2. select the best candidate per prompt by the scorer's ``select_by`` score (no threshold:
   :func:`finetune.select.select_best`, ties to the lower seed);
3. finetune: the world's :meth:`~generators.synthetic.SyntheticGenerator.fit` on the selected images' truth;
4. regenerate ``heldout_per_prompt`` images for each of ``heldout_prompts`` held-out prompts (fixed seeds
   ``HELDOUT_SEED + k``, the same every round) with the finetuned world;
5. repair the ``repair_limit`` held-out images the scorer finds least plausible (:func:`inpainting.repair.repair`
   with the scorer's implausibility map).

Measured per round and scorer, with paired bootstrap 95 % intervals (:func:`compare.stats.bootstrap_means`,
resampling prompts or images):

(a) selection: the true scores of the selected images against a random pick of the same prompts — the random
    pick is counted at its expectation, the mean true score of the prompt's candidates, so it carries no draw
    noise — and the share of the oracle's gain ``(selected − random) / (oracle − random)`` on the scorer's own
    candidates, where "oracle" is the truly best candidate of each prompt by ``select_by`` (the oracle scorer's
    share is 1 by construction; a random scorer's is near 0). In round 1 every scorer sees the same candidates;
    later rounds each scorer's own finetuned world makes them. Also the prompt diversity of the selected set
    (distinct prompts, and distinct "colour shape" concepts of their prompts) and the within-prompt ranking
    metrics of :func:`rahf.evaluate.within_prompt_metrics` on the candidates.
(b) generator: the true scores of the held-out images before against after the round, paired on (prompt, seed)
    (:func:`compare.stats.compare_scores`; ``implausible_area`` compared beside the four scores).
(c) repair: the true implausible area of the repaired images before and after (after = the accepted candidate,
    or the original when rejected), the acceptance rate, and the share of accepted repairs that are truly worse
    (true implausible area grew: false accepts).
(d) misalignment repair (with ``misalignment_repair``; beyond the paper): the ``repair_limit`` held-out images the
    scorer finds least aligned, repaired by its misalignment map (:meth:`inpainting.repair.RepairConfig.for_map`:
    the mask and the heat check from that map, candidates ranked by alignment, the original prompt with its
    misaligned keywords); measured on the held-out images themselves, apart from (c): true alignment and true
    misaligned area (mean of the true misalignment map) before and after with paired intervals, the acceptance
    rate and the false accepts (accepted and truly less aligned). Every image's numbers are kept in ``records``.
(e) independent judge (with a judge, ``judge`` or ``--judge``; a guard against reward hacking): a second scorer
    trained apart from the loop's (:mod:`compare.judge`) re-checks each round's picks and accepted repairs. A pick
    is flagged when the judge's ``select_by`` score of it is below the judge's mean of its prompt's candidates by
    more than ``judge_margin``; an accepted repair when the judge's plausibility of the accepted candidate is
    below its plausibility of the original by more than ``judge_margin``. Reported: flagged counts and the true
    gain (pick − the prompt's true mean) or true implausible-area change of flagged against kept items; with
    ``judge_drop`` flagged picks are left out of the fit and flagged repairs reverted (then (b) and (c) show the
    guarded loop).

Heatmap-weighted finetuning (``heatmap_weighted_fit``, a tuple of k; off when empty): beside best-of-``per_prompt``
each scorer also runs, from the same base world, a chain of rounds that fits on the top-k candidates per prompt of
the first ``prompts / k`` training prompts — the same number of finetuning images as best-of-``per_prompt`` over
all ``prompts`` — and leaves out of the fit's per-shape object and distortion counts every object whose mean
PREDICTED implausibility (the scorer's map over the object's disc) is above ``heat_threshold``
(:func:`heat_trusted_counts`): the fit learns from the regions the scorer trusts. k = 1 is the exclusion alone,
on the same picks as best-of-``per_prompt``. Measured: part (b) on the same held-out prompts and seeds, and how many
objects (and truly distorted ones) were left out.

Output: ``loop_gain.json`` (every number), ``loop_gain.md`` (the tables) and ``loop_gain.png`` (true overall and
plausibility of the held-out output against round, per scorer; needs matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.atomic import atomic_write_bytes, atomic_write_text
from common.names import HEATMAP_NAMES, SCORE_NAMES
from common.records import ImageRecord, RichFeedback, ScoringFailure
from compare.stats import bootstrap_means, compare_scores, pair_records
from finetune.select import SelectionConfig, select_best
from generators.base import GeneratedImage
from generators.synthetic import SyntheticGenerator
from inpainting.repair import IMPROVED, NOTHING_TO_REPAIR, RepairConfig, loop_repair_config, repair
from rahf.data.synthetic import Scene, flaw_counts, object_heat, parse_prompt, sample_prompts
from rahf.evaluate import within_prompt_markdown, within_prompt_metrics

HELDOUT_SEED = 1_000_000  # held-out images use seeds HELDOUT_SEED + k, apart from every training seed
WORSE_TOL = 1e-9  # a repair is truly worse when its true implausible area grew by more than this
PLOT_SCORES = ("overall", "plausibility")


@dataclass
class LoopGainConfig:
    """Every knob of the benchmark; the defaults are those of ``richfeedback bench-loop``."""

    prompts: int = 16  # training prompts (candidates per round: prompts x per_prompt)
    per_prompt: int = 8
    heldout_prompts: int = 16  # prompts of the before/after comparison and of repair, disjoint from training
    heldout_per_prompt: int = 4
    rounds: int = 3
    size: int = 64  # image side of the synthetic world, pixels
    select_by: str = "overall"  # the score that picks the best candidate per prompt
    prior_strength: float = 2.0  # pseudo-trials pulling each fitted flaw rate toward the previous world's
    repair_limit: int = 8  # held-out images repaired per round, least plausible (by the scorer) first
    #: mask and candidate settings of the repair step (its seed is replaced by ``seed``); the defaults are the
    #: supported ones of :func:`inpainting.repair.loop_repair_config`, shared with the feedback loop
    repair: RepairConfig = field(default_factory=loop_repair_config)
    seed: int = 0  # the prompts' seed; repair candidate k gets seed + k
    n_boot: int = 2000  # bootstrap resamples of every interval
    #: also repair the ``repair_limit`` least aligned held-out images by the misalignment map (table (d))
    misalignment_repair: bool = False
    #: k of each heatmap-weighted variant (top-k of prompts / k prompts, hot objects left out of the fit); () = off
    heatmap_weighted_fit: tuple[int, ...] = ()
    heat_threshold: float = 0.15  # an object is left out when its mean predicted implausibility is above this
    #: independent judge (table (e)): "" = off, "cnn" = the cached CNN judge of :mod:`compare.judge`, or a RAHF
    #: folder; a judge object given to :func:`run_loop_gain` takes its place
    judge: str = ""
    judge_margin: float = 0.05  # a pick / accepted repair is flagged when the judge sees it worse by more than this
    judge_drop: bool = False  # leave flagged picks out of the fit and revert flagged repairs

    def __post_init__(self) -> None:
        self.heatmap_weighted_fit = tuple(self.heatmap_weighted_fit)
        for k in self.heatmap_weighted_fit:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.per_prompt:
                raise ValueError(f"heatmap_weighted_fit takes ints in [1, per_prompt={self.per_prompt}], got {k!r}")
            if self.prompts % k:
                raise ValueError(f"heatmap_weighted_fit k={k} must divide prompts={self.prompts} (same image count)")
        if len(set(self.heatmap_weighted_fit)) != len(self.heatmap_weighted_fit):
            raise ValueError(f"heatmap_weighted_fit repeats a k: {self.heatmap_weighted_fit}")
        if not 0.0 <= self.heat_threshold < 1.0:
            raise ValueError(f"heat_threshold must lie in [0, 1), got {self.heat_threshold}")
        for name in ("prompts", "per_prompt", "heldout_prompts", "heldout_per_prompt", "rounds", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.per_prompt < 2:
            raise ValueError(f"per_prompt must be >= 2 (selection picks among candidates), got {self.per_prompt}")
        if isinstance(self.repair_limit, bool) or not isinstance(self.repair_limit, int) or self.repair_limit < 0:
            raise ValueError(f"repair_limit must be an int >= 0, got {self.repair_limit!r}")
        if self.select_by not in SCORE_NAMES:
            raise ValueError(f"select_by must be one of {SCORE_NAMES}, got {self.select_by!r}")
        if self.prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {self.prior_strength}")
        if not isinstance(self.misalignment_repair, bool):
            raise ValueError(f"misalignment_repair must be a bool, got {self.misalignment_repair!r}")
        if not isinstance(self.repair, RepairConfig):
            raise ValueError(f"repair must be a RepairConfig, got {type(self.repair).__name__}")
        if not self.judge_margin >= 0:
            raise ValueError(f"judge_margin must be >= 0, got {self.judge_margin}")
        if not isinstance(self.judge_drop, bool):
            raise ValueError(f"judge_drop must be a bool, got {self.judge_drop!r}")

    def repair_config(self) -> RepairConfig:
        """The :class:`~inpainting.repair.RepairConfig` of the repair step: ``repair`` with the benchmark's seed."""
        return replace(self.repair, seed=self.seed)


class RandomScorer:
    """The chance baseline, through the same ``score`` call as ``RAHFScorer``: four scores uniform in [0, 1] and
    an implausibility and a misalignment map, each of ``grid`` x ``grid`` uniform values upsampled (bilinear) to
    the image size; no misaligned keywords. Every
    number is a function of (seed, prompt, pixels) only, so the order and batching of calls change nothing."""

    def __init__(self, seed: int = 0, grid: int = 4) -> None:
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.seed, self.grid = int(seed), int(grid)
        self.identity = {"source": f"random (seed {seed})", "weights_hash": None}

    def score(
        self,
        prompt: str | Sequence[str],
        images: Sequence[Image.Image],
        *,
        heatmaps: Sequence[str] | None = None,
        keywords: bool = True,
        scores_only: bool = False,
        errors: str = "raise",
        **unused: Any,
    ) -> list[RichFeedback | ScoringFailure]:
        """Four uniform scores per image and, unless ``scores_only``, both maps (``heatmaps`` is not narrowed:
        the draws stay the same); never fails, so ``errors`` changes nothing."""
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        out = []
        for p, image in zip(prompts, images):
            digest = hashlib.sha256(p.encode() + image.tobytes() + f"{image.mode}{image.size}".encode()).digest()
            rng = np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])
            scores = {n: float(v) for n, v in zip(SCORE_NAMES, rng.random(len(SCORE_NAMES)))}
            coarse = [rng.random((self.grid, self.grid)).astype(np.float32) for _ in range(2)]
            maps = {}
            if not scores_only:
                heat = [np.asarray(Image.fromarray(c, mode="F").resize(image.size, Image.BILINEAR)) for c in coarse]
                maps = {n: np.clip(h, 0.0, 1.0).astype(np.float32) for n, h in zip(HEATMAP_NAMES, heat)}
            out.append(RichFeedback(p, scores, maps, []))
        return out


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _predict(scorer: Any, images: Sequence[GeneratedImage]) -> list[dict[str, float]]:
    """The scorer's four scores of each image (scores only)."""
    feedback = scorer.score([g.prompt for g in images], [g.image for g in images], scores_only=True)
    out = []
    for g, fb in zip(images, feedback):
        if isinstance(fb, ScoringFailure):
            raise RuntimeError(f"scoring failed for {g.prompt!r} seed {g.seed}: {fb.error}")
        out.append({n: float(fb.scores[n]) for n in SCORE_NAMES})
    return out


def _true(g: GeneratedImage) -> dict[str, float]:
    """True scores of a world image, with its implausible area."""
    assert g.truth is not None
    return {**{n: float(g.truth["scores"][n]) for n in SCORE_NAMES}, "implausible_area": g.truth["implausible_area"]}


def _record(g: GeneratedImage, scores: Mapping[str, float]) -> ImageRecord:
    return ImageRecord(g.id, g.prompt, g.seed, g.generator.to_dict(), dict(g.params), scores=dict(scores))


def _ci(values: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Mean of (N,) values and its bootstrap 95 % interval."""
    v = np.asarray(values, np.float64)
    lo, hi = np.percentile(bootstrap_means(v[:, None], n_boot, seed)[:, 0], [2.5, 97.5])
    return {"mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


def _paired(before: np.ndarray, after: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Means before and after, and the paired difference with its bootstrap 95 % interval."""
    d = _ci(after - before, n_boot, seed)
    return {
        "before": float(before.mean()),
        "after": float(after.mean()),
        "diff": d["mean"],
        "ci_low": d["ci_low"],
        "ci_high": d["ci_high"],
    }


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> dict[str, float | None]:
    """mean(num) / mean(den) over paired rows, with a bootstrap 95 % interval of the ratio (same resampled rows
    for both); None where the denominator's mean is 0."""
    d = float(np.mean(den))
    boot = bootstrap_means(np.stack([num, den], axis=1).astype(np.float64), n_boot, seed)
    ok = boot[:, 1] > 0
    ratios = boot[ok, 0] / boot[ok, 1]
    lo, hi = np.percentile(ratios, [2.5, 97.5]) if ratios.size else (np.nan, np.nan)
    return {
        "mean": float(np.mean(num)) / d if d > 0 else None,
        "ci_low": float(lo) if ratios.size else None,
        "ci_high": float(hi) if ratios.size else None,
        "resamples_defined": int(ok.sum()),
    }


def _concepts(prompt: str) -> set[str]:
    return {f"{g.colour} {g.shape}" for g in parse_prompt(prompt)}


# ---------------------------------------------------------------------------------------------------------
# The three measurements
# ---------------------------------------------------------------------------------------------------------


def measure_selection(
    candidates: Sequence[GeneratedImage],
    predicted: Sequence[Mapping[str, float]],
    config: LoopGainConfig,
    *,
    seed: int = 0,
) -> tuple[list[GeneratedImage], dict[str, Any]]:
    """Select the best candidate per prompt by the predicted ``select_by`` score and measure it in truth.

    Returns the selected images (prompt order) and ``{"prompts", "true": {score: {"selected", "random_pick",
    "oracle_pick", "gain", "ci_low", "ci_high"}}, "share_of_oracle_gain", "diversity", "within_prompt"}``.
    """
    sel_config = SelectionConfig(score=config.select_by, thresholds={}, top_k=1, expected_per_prompt=None)
    by_id = {g.id: g for g in candidates}
    truth = [_true(g) for g in candidates]
    chosen = select_best([_record(g, p) for g, p in zip(candidates, predicted)], sel_config).selected
    oracle = {
        r.prompt: r.id for r in select_best([_record(g, t) for g, t in zip(candidates, truth)], sel_config).selected
    }
    groups: dict[str, list[int]] = {}
    for k, g in enumerate(candidates):
        groups.setdefault(g.prompt, []).append(k)
    selected = [by_id[r.id] for r in chosen]
    names = [*SCORE_NAMES, "implausible_area"]
    sel = np.array([[_true(g)[n] for n in names] for g in selected])
    rnd = np.array([[np.mean([truth[k][n] for k in groups[g.prompt]]) for n in names] for g in selected])
    orc = np.array([[_true(by_id[oracle[g.prompt]])[n] for n in names] for g in selected])
    true_rows = {}
    for j, n in enumerate(names):
        gain = _ci(sel[:, j] - rnd[:, j], config.n_boot, seed)
        true_rows[n] = {
            "selected": float(sel[:, j].mean()),
            "random_pick": float(rnd[:, j].mean()),
            "oracle_pick": float(orc[:, j].mean()),
            "gain": gain["mean"],
            "ci_low": gain["ci_low"],
            "ci_high": gain["ci_high"],
        }
    j = names.index(config.select_by)
    share = _ratio_ci(sel[:, j] - rnd[:, j], orc[:, j] - rnd[:, j], config.n_boot, seed)
    all_concepts = set().union(*(_concepts(p) for p in groups))
    concepts = set().union(*(_concepts(g.prompt) for g in selected)) if selected else set()
    diversity = {
        "prompts": len({g.prompt for g in selected}),
        "prompts_of": len(groups),
        "concepts": len(concepts),
        "concepts_of": len(all_concepts),
    }
    prompts = [g.prompt for g in candidates]
    within = {
        n: within_prompt_metrics(
            [p[n] for p in predicted], [t[n] for t in truth], prompts, n_boot=config.n_boot, seed=seed
        )
        for n in dict.fromkeys((config.select_by, "plausibility"))
    }
    result = {
        "prompts": len(selected),
        "true": true_rows,
        "share_of_oracle_gain": share,
        "diversity": diversity,
        "within_prompt": within,
    }
    return selected, result


def _group(values: Sequence[float], n_boot: int, seed: int) -> dict[str, Any]:
    """Mean of (N,) values, with its bootstrap 95 % interval when N >= 2 (None entries where undefined)."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return {"mean": float(v[0]) if v.size else None, "ci_low": None, "ci_high": None, "n": int(v.size)}
    return _ci(v, n_boot, seed)


def judge_selection(
    candidates: Sequence[GeneratedImage],
    selected: Sequence[GeneratedImage],
    judged: Sequence[float],
    config: LoopGainConfig,
    *,
    seed: int = 0,
) -> tuple[list[GeneratedImage], dict[str, Any]]:
    """Re-check the picks with an independent judge (table (e)).

    ``judged``: the judge's ``select_by`` score of every candidate. A pick is flagged when the judge scores it
    below the judge's mean of its prompt's candidates by more than ``judge_margin`` (the judge sees it as worse
    than a random pick). True gain of a pick = its true ``select_by`` − the mean true ``select_by`` of its prompt's
    candidates; a gain <= 0 is not real. Returns the kept picks (in order) and ``{"picks", "flagged",
    "flagged_ids", "flagged_gain", "kept_gain" (mean [95% CI] of true gain), "flagged_not_real",
    "kept_not_real"}``.
    """
    if len(judged) != len(candidates):
        raise ValueError(f"got {len(judged)} judge scores for {len(candidates)} candidates")
    by = config.select_by
    groups: dict[str, list[int]] = {}
    for k, g in enumerate(candidates):
        groups.setdefault(g.prompt, []).append(k)
    index = {g.id: k for k, g in enumerate(candidates)}
    kept, flagged_ids, gains, flags = [], [], [], []
    for g in selected:
        ks = groups[g.prompt]
        advantage = judged[index[g.id]] - float(np.mean([judged[k] for k in ks]))
        gains.append(_true(g)[by] - float(np.mean([_true(candidates[k])[by] for k in ks])))
        flags.append(advantage < -config.judge_margin)
        if flags[-1]:
            flagged_ids.append(g.id)
        else:
            kept.append(g)
    gain, flag = np.array(gains, np.float64), np.array(flags, bool)
    stats = {
        "picks": len(selected),
        "flagged": int(flag.sum()),
        "flagged_ids": flagged_ids,
        "flagged_gain": _group(gain[flag], config.n_boot, seed),
        "kept_gain": _group(gain[~flag], config.n_boot, seed),
        "flagged_not_real": int((flag & (gain <= 0)).sum()),
        "kept_not_real": int((~flag & (gain <= 0)).sum()),
    }
    return kept, stats


def selection_gain(
    candidates: Sequence[ImageRecord],
    selected: Sequence[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """One selection of a run, measured in truth: the scorer's scores and the true scores of the ``selected``
    ids against a random pick of the same prompts, and the share of the oracle's true gain. Candidates with an
    ``error`` or without all four scores are left out.

    Per prompt with a selection (rows of the bootstrap, which resamples prompts): the mean over its selected
    images; the random pick counted at its expectation (the mean of the prompt's candidates); the oracle's pick
    (the mean of the prompt's truly best candidates by that score, as many as were selected; ties to the lower
    seed). Per score, over prompts: ``rahf_selected``, ``rahf_random_pick``, ``rahf_gain``, ``true_selected``,
    ``true_random_pick``, ``true_oracle_pick``, ``true_gain`` (selected − random, with ``true_gain_ci_low`` /
    ``_high``) and ``share_of_oracle_gain`` = (selected − random) / (oracle − random) of the means (with
    ``share_ci_low`` / ``_high``; None where the oracle gains nothing). Returns ``{"prompts", "images", "n_boot",
    "scores"}``, or None when nothing is selected or a candidate of a selected prompt carries no ground truth
    (``record.truth["scores"]``, the synthetic world's).
    """
    by_id = {r.id: r for r in candidates if not r.error and all(n in r.scores for n in SCORE_NAMES)}
    unknown = [i for i in selected if i not in by_id]
    if unknown:
        raise ValueError(f"selected ids not among the candidates: {unknown[:3]}")
    chosen: dict[str, list[ImageRecord]] = {}
    for i in dict.fromkeys(selected):
        chosen.setdefault(by_id[i].prompt, []).append(by_id[i])
    groups = {p: [r for r in by_id.values() if r.prompt == p] for p in chosen}
    if not chosen or any(r.truth is None or "scores" not in r.truth for g in groups.values() for r in g):
        return None
    rows: dict[str, np.ndarray] = {}  # score -> (P, 5): rahf sel, rahf random, true sel, true random, oracle
    for name in SCORE_NAMES:
        table = []
        for prompt, picks in chosen.items():
            cands = groups[prompt]
            best = sorted(cands, key=lambda r: (-r.truth["scores"][name], r.seed, r.id))[: len(picks)]  # type: ignore[index]
            table.append(
                [
                    np.mean([r.scores[name] for r in picks]),
                    np.mean([r.scores[name] for r in cands]),
                    np.mean([r.truth["scores"][name] for r in picks]),  # type: ignore[index]
                    np.mean([r.truth["scores"][name] for r in cands]),  # type: ignore[index]
                    np.mean([r.truth["scores"][name] for r in best]),  # type: ignore[index]
                ]
            )
        rows[name] = np.asarray(table, np.float64)
    scores = {}
    for name, t in rows.items():
        gain = _ci(t[:, 2] - t[:, 3], n_boot, seed)
        share = _ratio_ci(t[:, 2] - t[:, 3], t[:, 4] - t[:, 3], n_boot, seed)
        scores[name] = {
            "rahf_selected": float(t[:, 0].mean()),
            "rahf_random_pick": float(t[:, 1].mean()),
            "rahf_gain": float((t[:, 0] - t[:, 1]).mean()),
            "true_selected": float(t[:, 2].mean()),
            "true_random_pick": float(t[:, 3].mean()),
            "true_oracle_pick": float(t[:, 4].mean()),
            "true_gain": gain["mean"],
            "true_gain_ci_low": gain["ci_low"],
            "true_gain_ci_high": gain["ci_high"],
            "share_of_oracle_gain": share["mean"],
            "share_ci_low": share["ci_low"],
            "share_ci_high": share["ci_high"],
        }
    return {"prompts": len(chosen), "images": sum(map(len, chosen.values())), "n_boot": n_boot, "scores": scores}


def measure_generator(
    before: Sequence[GeneratedImage], after: Sequence[GeneratedImage], config: LoopGainConfig, *, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """True scores (and implausible area) of the same held-out prompts and seeds before and after a round:
    {name: {"n", "mean_a" (before), "mean_b" (after), "diff", "ci_low", "ci_high", "wins", "ties", "losses"}}."""
    a = [_record(g, _true(g)) for g in before]
    b = [_record(g, _true(g)) for g in after]
    stats = compare_scores(
        pair_records(a, b), n_boot=config.n_boot, seed=seed, score_names=[*SCORE_NAMES, "implausible_area"]
    )
    keep = ("n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "wins", "ties", "losses")
    return {n: {k: getattr(s, k) for k in keep} for n, s in stats.scores.items()}


def measure_repair(
    images: Sequence[GeneratedImage],
    predicted: Sequence[Mapping[str, float]],
    generator: SyntheticGenerator,
    scorer: Any,
    config: LoopGainConfig,
    *,
    seed: int = 0,
    judge: Any = None,
) -> dict[str, Any]:
    """Repair the ``repair_limit`` images of lowest predicted plausibility (ties: input order) and measure, in
    truth, what the repairs did (see the module docstring, part (c)).

    With a ``judge`` (table (e)), every accepted repair is re-checked: flagged when the judge's plausibility of
    the accepted candidate is below its plausibility of the original by more than ``judge_margin``; with
    ``judge_drop`` a flagged repair is reverted (the original kept, counted as not accepted). ``out["judge"]``:
    ``{"checked", "flagged", "reverted", "flagged_area_change", "kept_area_change" (mean [95% CI] of the true
    implausible area after − before, before any revert), "flagged_worse", "kept_worse" (truly worse)}``."""
    order = sorted(range(len(images)), key=lambda k: (predicted[k]["plausibility"], k))[: config.repair_limit]
    rconfig = config.repair_config()
    before, after, accepted, nothing = [], [], [], 0
    scores_before, scores_after = [], []
    checks: list[tuple[bool, float]] = []  # (flagged by the judge, true area change) of each accepted repair
    reverted = 0
    for k in order:
        g = images[k]
        result = repair(g.image, g.prompt, generator, scorer, rconfig)
        new = result.accepted_candidate.generated if result.accepted_candidate is not None else g
        ok = result.reason == IMPROVED
        if judge is not None and ok:
            fb = judge.score(g.prompt, [g.image, new.image], scores_only=True)
            if any(isinstance(f, ScoringFailure) for f in fb):
                raise RuntimeError(f"the judge failed on a repair of {g.prompt!r} seed {g.seed}")
            delta = new.truth["implausible_area"] - g.truth["implausible_area"]  # type: ignore[index]
            flag = fb[1].scores["plausibility"] - fb[0].scores["plausibility"] < -config.judge_margin
            checks.append((flag, delta))
            if flag and config.judge_drop:
                new, ok, reverted = g, False, reverted + 1
        before.append(g.truth["implausible_area"])  # type: ignore[index]
        after.append(new.truth["implausible_area"])  # type: ignore[index]
        scores_before.append([_true(g)[n] for n in SCORE_NAMES])
        scores_after.append([_true(new)[n] for n in SCORE_NAMES])
        accepted.append(ok)
        nothing += result.reason == NOTHING_TO_REPAIR
    n = len(order)
    out: dict[str, Any] = {"attempted": n, "nothing_to_repair": nothing}
    if judge is not None:
        flag = np.array([c[0] for c in checks], bool)
        change = np.array([c[1] for c in checks], np.float64)
        out["judge"] = {
            "checked": len(checks),
            "flagged": int(flag.sum()),
            "reverted": reverted,
            "flagged_area_change": _group(change[flag], config.n_boot, seed),
            "kept_area_change": _group(change[~flag], config.n_boot, seed),
            "flagged_worse": int((flag & (change > WORSE_TOL)).sum()),
            "kept_worse": int((~flag & (change > WORSE_TOL)).sum()),
        }
    if not n:
        return {**out, "accepted": 0, "accept_rate": None, "false_accepts": 0, "false_accept_share": None}
    b, a, acc = np.array(before), np.array(after), np.array(accepted, bool)
    worse = acc & (a > b + WORSE_TOL)
    diff = _ci(a - b, config.n_boot, seed)
    sb, sa = np.array(scores_before), np.array(scores_after)
    true_scores = {name: _paired(sb[:, j], sa[:, j], config.n_boot, seed) for j, name in enumerate(SCORE_NAMES)}
    out |= {
        "accepted": int(acc.sum()),
        "accept_rate": float(acc.mean()),
        "accept_rate_ci": [_ci(acc.astype(np.float64), config.n_boot, seed)[k] for k in ("ci_low", "ci_high")],
        "false_accepts": int(worse.sum()),
        "false_accept_share": float(worse.sum() / acc.sum()) if acc.any() else None,
        "truly_better": int((acc & (a < b - WORSE_TOL)).sum()),
        "area_before": float(b.mean()),
        "area_after": float(a.mean()),
        "area_diff": diff["mean"],
        "area_ci_low": diff["ci_low"],
        "area_ci_high": diff["ci_high"],
        "accepted_area_before": float(b[acc].mean()) if acc.any() else None,
        "accepted_area_after": float(a[acc].mean()) if acc.any() else None,
        "true_scores": true_scores,
    }
    return out


def _misaligned_area(g: GeneratedImage) -> float:
    """Mean of a world image's true misalignment map, in [0, 1]."""
    return float(np.mean(g.truth["maps"]["misalignment"]))  # type: ignore[index]


def measure_misalignment_repair(
    images: Sequence[GeneratedImage],
    predicted: Sequence[Mapping[str, float]],
    generator: SyntheticGenerator,
    scorer: Any,
    config: LoopGainConfig,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Repair the ``repair_limit`` images of lowest predicted alignment (ties: input order) by the scorer's
    misalignment map and measure, in truth, what the repairs did (module docstring, part (d)). ``records`` holds
    each image's prompt, seed, keywords, decision, true alignment, misaligned area and plausibility before and
    after; every mean of the result is a mean over them."""
    order = sorted(range(len(images)), key=lambda k: (predicted[k]["alignment"], k))[: config.repair_limit]
    rconfig = config.repair_config().for_map("misalignment")
    records = []
    for k in order:
        g = images[k]
        result = repair(g.image, g.prompt, generator, scorer, rconfig)
        new = result.accepted_candidate.generated if result.accepted_candidate is not None else g
        records.append(
            {
                "prompt": g.prompt,
                "seed": g.seed,
                "keywords": list(result.keywords),
                "reason": result.reason,
                "accepted": result.reason == IMPROVED,
                "mask_area": result.mask_area,
                **{f"{n}_before": v for n, v in _alignment_truth(g).items()},
                **{f"{n}_after": v for n, v in _alignment_truth(new).items()},
            }
        )
    n = len(records)
    out: dict[str, Any] = {"attempted": n, "nothing_to_repair": sum(r["reason"] == NOTHING_TO_REPAIR for r in records)}
    if not n:
        return {
            **out,
            "accepted": 0,
            "accept_rate": None,
            "false_accepts": 0,
            "false_accept_share": None,
            "records": [],
        }
    acc = np.array([r["accepted"] for r in records], bool)
    col = {
        key: np.array([r[key] for r in records], np.float64)
        for key in records[0]
        if key.endswith(("_before", "_after"))
    }
    worse = acc & (col["alignment_after"] < col["alignment_before"] - WORSE_TOL)
    true = {
        name: _paired(col[f"{name}_before"], col[f"{name}_after"], config.n_boot, seed)
        for name in ("alignment", "misaligned_area", "plausibility")
    }
    out |= {
        "accepted": int(acc.sum()),
        "accept_rate": float(acc.mean()),
        "accept_rate_ci": [_ci(acc.astype(np.float64), config.n_boot, seed)[k] for k in ("ci_low", "ci_high")],
        "false_accepts": int(worse.sum()),
        "false_accept_share": float(worse.sum() / acc.sum()) if acc.any() else None,
        "truly_better": int((acc & (col["alignment_after"] > col["alignment_before"] + WORSE_TOL)).sum()),
        "true": true,
        "records": records,
    }
    return out


def _alignment_truth(g: GeneratedImage) -> dict[str, float]:
    t = _true(g)
    return {"alignment": t["alignment"], "misaligned_area": _misaligned_area(g), "plausibility": t["plausibility"]}


def heat_trusted_counts(
    images: Sequence[GeneratedImage], heatmaps: Sequence[np.ndarray], threshold: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The fit's counts of world images with every object under predicted heat left out.

    ``heatmaps``: one (size, size) predicted implausibility map in [0, 1] per image. An object is left out of its
    image's per-shape object and distortion counts (:func:`rahf.data.synthetic.flaw_counts` with ``exclude``) when
    the map's mean over its disc (:func:`rahf.data.synthetic.object_heat`) is above ``threshold``. Returns the
    counts and ``{"objects", "excluded", "distorted", "excluded_distorted"}`` (distorted: in truth).
    """
    if len(heatmaps) != len(images):
        raise ValueError(f"got {len(heatmaps)} heatmaps for {len(images)} images")
    counts, stats = [], dict.fromkeys(("objects", "excluded", "distorted", "excluded_distorted"), 0)
    for g, heat in zip(images, heatmaps):
        if "scene" not in g.image.info:
            raise ValueError(f"image {g.id} carries no scene (not made by the synthetic world)")
        scene = Scene.from_json(g.image.info["scene"])
        hot = [h > threshold for h in object_heat(scene, heat)]
        counts.append(flaw_counts(scene, hot))
        bad = [o.distortion is not None for o in scene.objects]
        stats["objects"] += len(hot)
        stats["excluded"] += sum(hot)
        stats["distorted"] += sum(bad)
        stats["excluded_distorted"] += sum(h and b for h, b in zip(hot, bad))
    return counts, stats


def _implausibility(scorer: Any, images: Sequence[GeneratedImage]) -> list[np.ndarray]:
    """The scorer's implausibility map of each image, at the image's size."""
    feedback = scorer.score([g.prompt for g in images], [g.image for g in images], heatmaps=["implausibility"])
    out = []
    for g, fb in zip(images, feedback):
        if isinstance(fb, ScoringFailure):
            raise RuntimeError(f"scoring failed for {g.prompt!r} seed {g.seed}: {fb.error}")
        out.append(np.asarray(fb.heatmaps["implausibility"], np.float32))
    return out


def heatmap_weighted_round(
    gen: SyntheticGenerator,
    scorer: Any,
    train: Sequence[str],
    round_index: int,
    k: int,
    config: LoopGainConfig,
) -> tuple[SyntheticGenerator, dict[str, Any]]:
    """One round of the heatmap-weighted variant: the top-``k`` candidates (by the scorer's ``select_by``) of each
    of the first ``len(train) / k`` prompts, the fit on their heat-trusted counts. Returns the fitted world and
    ``{"k", "prompts", "images", "exclusion": heat_trusted_counts' stats}``."""
    prompts = list(train[: len(train) // k])
    seeds = [round_index * config.per_prompt + j for _ in prompts for j in range(config.per_prompt)]
    candidates = gen.generate(prompts, config.per_prompt, seeds)
    sel_config = SelectionConfig(score=config.select_by, thresholds={}, top_k=k, expected_per_prompt=None)
    by_id = {g.id: g for g in candidates}
    records = [_record(g, p) for g, p in zip(candidates, _predict(scorer, candidates))]
    picked = [by_id[r.id] for r in select_best(records, sel_config).selected]
    counts, stats = heat_trusted_counts(picked, _implausibility(scorer, picked), config.heat_threshold)
    tuned = gen.fit([{"counts": c} for c in counts], prior_strength=config.prior_strength)
    return tuned, {"k": k, "prompts": len(prompts), "images": len(picked), "exclusion": stats}


def _variant(name: str, k: int) -> str:
    return f"{name}, heat-weighted top-{k}"


def _level(images: Sequence[GeneratedImage], n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    return {n: _ci(np.array([_true(g)[n] for g in images]), n_boot, seed) for n in [*SCORE_NAMES, "implausible_area"]}


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


def run_loop_gain(
    config: LoopGainConfig,
    scorers: Mapping[str, Any],
    out_dir: str | Path | None = None,
    *,
    log: Any = None,
    judge: Any = None,
) -> dict[str, Any]:
    """Run the benchmark for every scorer (name -> object with RAHFScorer's ``score``) and, when ``out_dir`` is
    given, write ``loop_gain.json``, ``loop_gain.md`` and ``loop_gain.png`` there. Returns the JSON's content.
    ``judge``: the independent judge of table (e) (an object with the same ``score``); None builds
    ``config.judge`` when set (:func:`compare.judge.build_judge`)."""
    if not scorers:
        raise ValueError("no scorers to benchmark")
    log = log or (lambda msg: None)
    if judge is None and config.judge:
        from compare.judge import build_judge

        judge = build_judge(config.judge, log=log)
    all_prompts = sample_prompts(config.prompts + config.heldout_prompts, seed=config.seed)
    train, heldout = all_prompts[: config.prompts], all_prompts[config.prompts :]
    heldout_seeds = [HELDOUT_SEED + k for _ in heldout for k in range(config.heldout_per_prompt)]
    base = SyntheticGenerator(size=config.size)
    base_heldout = base.generate(heldout, config.heldout_per_prompt, heldout_seeds)
    state = {s: (base, base_heldout) for s in scorers}
    curve = {s: [_level(base_heldout, config.n_boot, config.seed)] for s in scorers}
    ks = config.heatmap_weighted_fit
    hw_state = {(s, k): (base, base_heldout) for s in scorers for k in ks}
    hw_curve = {_variant(s, k): [_level(base_heldout, config.n_boot, config.seed)] for s in scorers for k in ks}
    seconds = dict.fromkeys(scorers, 0.0)
    rounds = []
    for r in range(config.rounds):
        seeds = [r * config.per_prompt + k for _ in train for k in range(config.per_prompt)]
        row: dict[str, Any] = {"round": r + 1, "scorers": {}}
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            gen, before = state[name]
            candidates = gen.generate(train, config.per_prompt, seeds)
            selected, selection = measure_selection(candidates, _predict(scorer, candidates), config, seed=config.seed)
            fit_on = selected
            if judge is not None:
                judged = [p[config.select_by] for p in _predict(judge, candidates)]
                kept, selection["judge"] = judge_selection(candidates, selected, judged, config, seed=config.seed)
                fit_on = kept if config.judge_drop else selected
                selection["judge"]["fit_images"] = len(fit_on)
            # nothing left to fit on (every pick dropped by the judge): the world stays as it was
            truths = [g.truth for g in fit_on]
            tuned = gen.fit(truths, prior_strength=config.prior_strength) if truths else gen  # type: ignore[arg-type]
            after = tuned.generate(heldout, config.heldout_per_prompt, heldout_seeds)
            generator = measure_generator(before, after, config, seed=config.seed)
            predicted_after = _predict(scorer, after)
            repaired = measure_repair(after, predicted_after, tuned, scorer, config, seed=config.seed, judge=judge)
            state[name] = (tuned, after)
            curve[name].append(_level(after, config.n_boot, config.seed))
            seconds[name] += time.perf_counter() - t0
            row["scorers"][name] = {
                "selection": selection,
                "generator": generator,
                "repair": repaired,
                "flaws": tuned.flaws.to_dict(),
            }
            if config.misalignment_repair:
                row["scorers"][name]["misalignment_repair"] = measure_misalignment_repair(
                    after, predicted_after, tuned, scorer, config, seed=config.seed
                )
            variants = {}
            for k in ks:
                hw_gen, hw_before = hw_state[name, k]
                hw_tuned, info = heatmap_weighted_round(hw_gen, scorer, train, r, k, config)
                hw_after = hw_tuned.generate(heldout, config.heldout_per_prompt, heldout_seeds)
                info["generator"] = measure_generator(hw_before, hw_after, config, seed=config.seed)
                info["flaws"] = hw_tuned.flaws.to_dict()
                hw_state[name, k] = (hw_tuned, hw_after)
                hw_curve[_variant(name, k)].append(_level(hw_after, config.n_boot, config.seed))
                variants[str(k)] = info
            if ks:
                row["scorers"][name]["heatmap_weighted"] = variants
            s = selection["true"][config.select_by]
            log(
                f"round {r + 1} {name}: selected true {config.select_by} {s['selected']:.3f} vs random pick "
                f"{s['random_pick']:.3f}; held-out true overall {generator['overall']['mean_a']:.3f} -> "
                f"{generator['overall']['mean_b']:.3f}"
            )
        rounds.append(row)
    result = {
        "config": asdict(config),
        "scorers": {s: dict(getattr(sc, "identity", {}) or {}) for s, sc in scorers.items()},
        "prompts": {"train": train, "heldout": heldout},
        "rounds": rounds,
        "curve": curve,
        "seconds": seconds,
    }
    if judge is not None:
        result["judge"] = dict(getattr(judge, "identity", {}) or {})
    if ks:
        result["curve_heatmap_weighted"] = hw_curve
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None or not np.isfinite(v) else format(v, fmt)


def _interval(mean: float | None, lo: float | None, hi: float | None, fmt: str = "+.3f") -> str:
    if mean is None:
        return "–"
    return f"{format(mean, fmt)} [{_f(lo, fmt)}, {_f(hi, fmt)}]"


def _generator_cells(m: dict[str, Any]) -> list[str]:
    """Cells of one (b) row: before → after and Δ [95% CI] of overall, plausibility and implausible area."""
    cells = []
    for n in ("overall", "plausibility", "implausible_area"):
        g = m["generator"][n]
        fmt = ".4f" if n == "implausible_area" else ".3f"
        cells.append(f"{format(g['mean_a'], fmt)} → {format(g['mean_b'], fmt)}")
        cells.append(_interval(g["diff"], g["ci_low"], g["ci_high"], "+" + fmt))
    return cells


def _heatmap_weighted_markdown(result: dict[str, Any]) -> list[str]:
    """The heatmap-weighted variants' table (empty when there are none)."""
    c = result["config"]
    rows = [
        (row["round"], s, k, v)
        for row in result["rounds"]
        for s, m in row["scorers"].items()
        for k, v in m.get("heatmap_weighted", {}).items()
    ]
    if not rows:
        return []
    out = [
        "",
        f"**Heatmap-weighted finetuning** — top-k of prompts / k prompts, the same number of finetuning images as "
        f"best-of-{c['per_prompt']} ({c['prompts']}); objects with mean predicted implausibility above "
        f"{c['heat_threshold']} left out of the fit (their rows in (b) above)",
        "",
        "| round | variant | prompts | images | objects | left out | truly distorted | of them left out |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r, s, k, v in rows:
        e = v["exclusion"]
        out.append(
            f"| {r} | {_variant(s, int(k))} | {v['prompts']} | {v['images']} | {e['objects']} | {e['excluded']} | "
            f"{e['distorted']} | {e['excluded_distorted']} |"
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    """The benchmark's tables: (a) selection, (b) generator before/after, (c) repair, (d) misalignment repair
    (when run), within-prompt ranking."""
    c = result["config"]
    by = c["select_by"]
    r, m = c["repair"], c["repair"]["mask"]
    out = [
        f"Synthetic world at {c['size']} px; {c['prompts']} training prompts × {c['per_prompt']} candidates, "
        f"selection by {by}; {c['heldout_prompts']} held-out prompts × {c['heldout_per_prompt']} seeds; "
        f"{c['rounds']} round(s); repair of the {c['repair_limit']} least plausible held-out images "
        f"({r['n']} candidates, margin {r['margin']}, heat drop {r['heat_drop']}, "
        f"guard {'off' if r.get('guard') is None else r['guard']}, "
        f"mask threshold {m['threshold']} {m['threshold_mode']} floor {m['floor']}, dilation {m['dilate_frac']}); "
        f"bootstrap 95 % intervals ({c['n_boot']} resamples). Scorers: "
        + "; ".join(f"{s} = {i.get('source', '?')}" for s, i in result["scorers"].items())
        + ".",
        "",
        f"**(a) Selection** — true scores of the selected images; random pick = the mean of the prompt's "
        f"candidates; share of oracle gain = (selected − random) / (oracle − random) in true {by}",
        "",
        f"| round | scorer | true {by} selected | random pick | gain [95% CI] | share of oracle gain [95% CI] "
        "| true plausibility selected | random pick | gain [95% CI] | distinct prompts | distinct concepts |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rounds"]:
        for s, m in row["scorers"].items():
            sel = m["selection"]
            t, p, sh, d = sel["true"][by], sel["true"]["plausibility"], sel["share_of_oracle_gain"], sel["diversity"]
            out.append(
                f"| {row['round']} | {s} | {t['selected']:.3f} | {t['random_pick']:.3f} | "
                f"{_interval(t['gain'], t['ci_low'], t['ci_high'])} | "
                f"{_interval(sh['mean'], sh['ci_low'], sh['ci_high'], '.2f')} | {p['selected']:.3f} | "
                f"{p['random_pick']:.3f} | {_interval(p['gain'], p['ci_low'], p['ci_high'])} | "
                f"{d['prompts']}/{d['prompts_of']} | {d['concepts']}/{d['concepts_of']} |"
            )
    out += [
        "",
        "**(b) Generator** — true scores of the held-out prompts and seeds, before → after the round "
        "(paired difference [95% CI])",
        "",
        "| round | scorer | true overall | Δ [95% CI] | true plausibility | Δ [95% CI] | implausible area | "
        "Δ [95% CI] |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rounds"]:
        for s, m in row["scorers"].items():
            cells = _generator_cells(m)
            out.append(f"| {row['round']} | {s} | " + " | ".join(cells) + " |")
            for k, v in m.get("heatmap_weighted", {}).items():
                out.append(f"| {row['round']} | {_variant(s, int(k))} | " + " | ".join(_generator_cells(v)) + " |")
    out += _heatmap_weighted_markdown(result)
    out += [
        "",
        "**(c) Repair** of the least plausible held-out images (by the scorer) — true implausible area before → "
        "after (after = accepted candidate or the original); false accepts = accepted repairs that are truly worse",
        "",
        "| round | scorer | repaired | nothing to repair | accepted (rate) | false accepts (share of accepted) | "
        "true implausible area | Δ [95% CI] | true plausibility Δ [95% CI] | true overall Δ [95% CI] |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rounds"]:
        for s, m in row["scorers"].items():
            r = m["repair"]
            if not r["attempted"]:
                out.append(f"| {row['round']} | {s} | 0 | – | – | – | – | – | – | – |")
                continue
            out.append(
                f"| {row['round']} | {s} | {r['attempted']} | {r['nothing_to_repair']} | "
                f"{r['accepted']} ({r['accept_rate']:.0%}) | "
                f"{r['false_accepts']} ({_f(r['false_accept_share'], '.0%')}) | "
                f"{r['area_before']:.4f} → {r['area_after']:.4f} | "
                f"{_interval(r['area_diff'], r['area_ci_low'], r['area_ci_high'], '+.4f')} | "
                + " | ".join(
                    _interval(t["diff"], t["ci_low"], t["ci_high"]) if t else "–"
                    for t in (r.get("true_scores", {}).get(n) for n in ("plausibility", "overall"))
                )
                + " |"
            )
    if any("misalignment_repair" in m for row in result["rounds"] for m in row["scorers"].values()):
        out += _misalignment_table(result)
    if "judge" in result:
        out += _judge_table(result)
    within = {
        f"round {row['round']}, {s}": m["selection"]["within_prompt"]
        for row in result["rounds"]
        for s, m in row["scorers"].items()
    }
    out += [
        "",
        "**Within-prompt ranking** of each round's candidates (predicted vs true, among the images of a prompt)",
        "",
        *within_prompt_markdown(within),
    ]
    return "\n".join(out) + "\n"


def _judge_table(result: dict[str, Any]) -> list[str]:
    """Table (e): the independent judge's flags on each round's picks and accepted repairs."""
    c = result["config"]
    drop = c.get("judge_drop", False)
    out = [
        "",
        f"**(e) Independent judge** ({result['judge'].get('source', '?')}) — a pick is flagged when the judge scores "
        f"it below its mean of the prompt's candidates (in {c['select_by']}) by more than {c['judge_margin']}; an "
        f"accepted repair when the judge's plausibility of it is below the original's by more than "
        f"{c['judge_margin']}. True gain = true {c['select_by']} of the pick − the prompt's true mean (not real: "
        "<= 0); true area Δ = true implausible area after − before (worse: > 0). "
        + (
            "Flagged picks are left out of the fit and flagged repairs reverted."
            if drop
            else "Nothing is dropped (report only)."
        ),
        "",
        "| round | scorer | picks flagged | flagged: true gain [95% CI] | not real | kept: true gain [95% CI] | "
        "not real | repairs flagged | flagged: true area Δ [95% CI] | worse | kept: true area Δ [95% CI] | worse |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rounds"]:
        for s, m in row["scorers"].items():
            j = m["selection"].get("judge")
            if j is None:
                continue
            fg, kg = j["flagged_gain"], j["kept_gain"]
            cells = [
                f"{j['flagged']}/{j['picks']}",
                _interval(fg["mean"], fg["ci_low"], fg["ci_high"]),
                f"{j['flagged_not_real']}/{j['flagged']}",
                _interval(kg["mean"], kg["ci_low"], kg["ci_high"]),
                f"{j['kept_not_real']}/{j['picks'] - j['flagged']}",
            ]
            r = m["repair"].get("judge")
            if r is None:
                cells += ["–"] * 5
            else:
                fa, ka = r["flagged_area_change"], r["kept_area_change"]
                cells += [
                    f"{r['flagged']}/{r['checked']}",
                    _interval(fa["mean"], fa["ci_low"], fa["ci_high"], "+.4f"),
                    f"{r['flagged_worse']}/{r['flagged']}",
                    _interval(ka["mean"], ka["ci_low"], ka["ci_high"], "+.4f"),
                    f"{r['kept_worse']}/{r['checked'] - r['flagged']}",
                ]
            out.append(f"| {row['round']} | {s} | " + " | ".join(cells) + " |")
    return out


def _misalignment_table(result: dict[str, Any]) -> list[str]:
    """Table (d): the misalignment repair, one row per round and scorer that ran it."""
    out = [
        "",
        f"**(d) Misalignment repair** of the {result['config']['repair_limit']} least aligned held-out images (by "
        "the scorer), masked by its misalignment map, candidates ranked by alignment — true alignment and true "
        "misaligned area (mean of the true misalignment map) before → after; false accepts = accepted repairs "
        "that are truly less aligned",
        "",
        "| round | scorer | repaired | nothing to repair | accepted (rate) | false accepts (share of accepted) | "
        "true alignment | Δ [95% CI] | true misaligned area | Δ [95% CI] | true plausibility Δ [95% CI] |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rounds"]:
        for s, m in row["scorers"].items():
            r = m.get("misalignment_repair")
            if r is None:
                continue
            if not r["attempted"]:
                out.append(f"| {row['round']} | {s} | 0 | – | – | – | – | – | – | – | – |")
                continue
            al, ar, pl = r["true"]["alignment"], r["true"]["misaligned_area"], r["true"]["plausibility"]
            out.append(
                f"| {row['round']} | {s} | {r['attempted']} | {r['nothing_to_repair']} | "
                f"{r['accepted']} ({r['accept_rate']:.0%}) | "
                f"{r['false_accepts']} ({_f(r['false_accept_share'], '.0%')}) | "
                f"{al['before']:.3f} → {al['after']:.3f} | {_interval(al['diff'], al['ci_low'], al['ci_high'])} | "
                f"{ar['before']:.4f} → {ar['after']:.4f} | "
                f"{_interval(ar['diff'], ar['ci_low'], ar['ci_high'], '+.4f')} | "
                f"{_interval(pl['diff'], pl['ci_low'], pl['ci_high'])} |"
            )
    return out


def plot_png(result: dict[str, Any]) -> bytes:
    """PNG bytes: true overall and plausibility of the held-out output against round (0 = base), per scorer,
    with 95 % intervals of the mean over held-out images."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the loop-gain plot needs matplotlib: pip install -e '.[bench]'") from err
    fig, axes = plt.subplots(1, len(PLOT_SCORES), figsize=(5 * len(PLOT_SCORES), 3.6), constrained_layout=True)
    for ax, name in zip(np.atleast_1d(axes), PLOT_SCORES):
        curves = {**result["curve"], **result.get("curve_heatmap_weighted", {})}
        for k, (s, levels) in enumerate(curves.items()):
            x = np.arange(len(levels)) + (k - (len(curves) - 1) / 2) * 0.04
            m = np.array([lv[name]["mean"] for lv in levels])
            err = np.array([[m[i] - lv[name]["ci_low"], lv[name]["ci_high"] - m[i]] for i, lv in enumerate(levels)]).T
            ax.errorbar(x, m, yerr=err, marker="o", capsize=3, label=s)
        ax.set_xticks(range(len(next(iter(result["curve"].values())))))
        ax.set_xlabel("round (0 = base world)")
        ax.set_ylabel(f"true {name}, held-out output")
        ax.set_title(f"true {name} vs round")
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``loop_gain.json``, ``loop_gain.md`` and ``loop_gain.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "loop_gain.json", "markdown": out / "loop_gain.md", "plot": out / "loop_gain.png"}
    atomic_write_text(paths["json"], json.dumps(_finite(result), indent=1, ensure_ascii=False, allow_nan=False))
    atomic_write_text(paths["markdown"], markdown(result))
    atomic_write_bytes(paths["plot"], plot_png(result))
    return paths
