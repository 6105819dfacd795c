"""Typed results of the loop's stages: what :mod:`flows.stages` returns, what the Prefect flows publish as
artifacts and what the command line prints, so every entry point shows the same summary.

Each result is a frozen dataclass with ``to_dict`` / ``from_dict`` (the JSON form stored in the run folder and
sent through Prefect) and ``to_markdown`` (the summary). Sequences are tuples. No torch, no Prefect.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from common.names import SCORE_NAMES

T = TypeVar("T", bound="StageResult")

SCORES = SCORE_NAMES


class StageResult:
    """``to_dict`` / ``from_dict`` for the frozen result dataclasses below (nested results, tuples, optionals)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists when dumped)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """The result back from :meth:`to_dict`'s form (e.g. after JSON); unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**{k: _convert(v, hints[k]) for k, v in data.items()})


def _convert(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(value, inner[0]) if len(inner) == 1 else value
    if isinstance(hint, type) and issubclass(hint, StageResult):
        return hint.from_dict(value)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_convert(v, item) for v in value)
    return value


def _pct(before: float, after: float) -> str:
    return f"{(after - before) / before:+.0%}" if before > 0 else "n/a"


@dataclass(frozen=True)
class ManifestResult(StageResult):
    """``manifest.jsonl``: its location, the records and error records in it, files that did not parse, and
    the planned ids with neither a valid record nor an error record."""

    manifest: str
    records: int
    errors: int
    bad_files: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    def to_markdown(self) -> str:
        text = f"- manifest `{self.manifest}`: {self.records} records, {self.errors} error records"
        if self.bad_files:
            text += f", {len(self.bad_files)} unreadable files skipped"
        if self.missing:
            text += f", **{len(self.missing)} planned images missing**"
        return text


@dataclass(frozen=True)
class GenerateResult(StageResult):
    """Generate and score: every planned id (prompt-major), those generated, scored, failed (error records) and
    missing (neither), and how many were finished before (``skipped``)."""

    ids: tuple[str, ...]
    generated: tuple[str, ...] = ()
    scored: tuple[str, ...] = ()
    skipped: int = 0
    failed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    generator: str = ""
    rahf: str = ""
    swept: int = 0  # stale temporary files removed when the flow started
    manifest: ManifestResult | None = None

    def to_markdown(self) -> str:
        text = (
            f"- generated {len(self.generated)}, scored {len(self.scored)}, reused {self.skipped} finished images, "
            f"{len(self.failed)} failed, {len(self.missing)} missing (of {len(self.ids)} planned; generator "
            f"`{self.generator}`, RAHF `{self.rahf}`)"
        )
        return text + ("\n" + self.manifest.to_markdown() if self.manifest else "")


def _opt(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


@dataclass(frozen=True)
class SelectionTruth(StageResult):
    """One selection measured in truth (synthetic world; :func:`compare.loop_gain.selection_gain`): per score,
    the RAHF and the true means of the selected images against a random pick of the same prompts (the mean of a
    prompt's candidates), the oracle's pick (the truly best candidate of each prompt by that score) and the share
    of the oracle's true gain, (selected − random) / (oracle − random), with bootstrap 95 % intervals over
    prompts."""

    prompts: int
    images: int
    select_by: str
    n_boot: int
    scores: dict[str, dict[str, Any]]  # score -> rahf_selected, rahf_random_pick, true_*, share_of_oracle_gain, ...

    def to_markdown(self) -> str:
        lines = [
            f"This round's selection in truth (synthetic world): {self.images} images of {self.prompts} prompts, "
            f"selected by RAHF {self.select_by}; random pick = the mean of the prompt's candidates; oracle = the "
            "truly best candidate of each prompt by that score; share of oracle gain = (selected − random) / "
            f"(oracle − random) in truth; 95 % intervals over prompts ({self.n_boot} resamples).",
            "",
            "| score | RAHF selected | RAHF random pick | RAHF gain | true selected | true random pick | "
            "true oracle pick | true gain [95% CI] | share of oracle gain [95% CI] |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in self.scores.items():
            gain = (
                f"{s['true_gain']:+.3f} [{_opt(s['true_gain_ci_low'], '+.3f')}, {_opt(s['true_gain_ci_high'], '+.3f')}]"
            )
            share = "–"
            if s["share_of_oracle_gain"] is not None:
                share = (
                    f"{s['share_of_oracle_gain']:.2f} [{_opt(s['share_ci_low'], '.2f')}, "
                    f"{_opt(s['share_ci_high'], '.2f')}]"
                )
            lines.append(
                f"| {name} | {s['rahf_selected']:.3f} | {s['rahf_random_pick']:.3f} | {s['rahf_gain']:+.3f} | "
                f"{s['true_selected']:.3f} | {s['true_random_pick']:.3f} | {s['true_oracle_pick']:.3f} | {gain} | "
                f"{share} |"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class SelectResult(StageResult):
    """The finetuning set: where it was exported, the selected ids, how many candidates there were, the
    selection's summary (``finetune.select.SelectionResult.summary()``) and, when every candidate carries the
    synthetic world's ground truth, the selection measured in truth (``truth``; None otherwise)."""

    dataset: str
    selected: tuple[str, ...]
    candidates: int
    prompts_without_selection: int = 0
    selection: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    truth: SelectionTruth | None = None

    def to_markdown(self, truth: bool = True) -> str:
        """The summary line, then (``truth`` and known) the truth table."""
        text = (
            f"- selected **{len(self.selected)}** images from {self.candidates} candidates "
            f"({self.prompts_without_selection} prompts without a selection) -> `{self.dataset}`"
        )
        return text + ("\n\n" + self.truth.to_markdown() if truth and self.truth else "")


@dataclass(frozen=True)
class FinetuneResult(StageResult):
    """The adapter a finetuning wrote (or reused), the generator it adapts, and the trainer's summary."""

    adapter: str
    generator: str
    reused: bool = False
    seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)  # the trainer's summary (flaws, steps, config, ...)

    def to_markdown(self) -> str:
        how = "trained" if self.seconds is None else f"trained in {self.seconds:.1f} s"
        how = "reused" if self.reused else how
        return f"- adapter `{self.adapter}` on `{self.generator}` ({how})"


@dataclass(frozen=True)
class CompareResult(StageResult):
    """Checkpoints A and B on the same prompts and seeds: RAHF scores, and the true ones when the images carry
    the synthetic world's ground truth."""

    a: dict[str, Any]  # {"generator": ..., "lora": ...}
    b: dict[str, Any]
    pairs: int
    planned: int
    failed: dict[str, int]
    missing: dict[str, int]
    scores: dict[str, dict[str, Any]]  # score -> mean_a, mean_b, diff, ci_low, ci_high, wins, ties, losses
    ground_truth: dict[str, dict[str, Any]] | None = None
    report: str | None = None

    def to_markdown(self) -> str:
        """Per score A, B, B − A (95 % CI), win / tie / loss; with ground truth, the true A, B and B − A beside."""
        if self.ground_truth:
            lines = self._with_truth(self.ground_truth)
        else:
            lines = ["| score | A | B | B − A (95 % CI) | win / tie / loss |", "|---|---:|---:|---:|---:|"]
            for name, s in self.scores.items():
                lines.append(
                    f"| {name} | {s['mean_a']:.4f} | {s['mean_b']:.4f} | {_diff_ci(s)} | "
                    f"{s['wins']} / {s['ties']} / {s['losses']} |"
                )
        if self.report:
            lines += ["", f"Report: `{self.report}`"]
        return "\n".join(lines)

    def _with_truth(self, truth: dict[str, dict[str, Any]]) -> list[str]:
        """RAHF's and the true statistics side by side (the true-only measures get "–" on RAHF's side)."""
        lines = [
            "RAHF's scores and the true ones (synthetic world), B − A with its paired 95 % interval:",
            "",
            "| score | RAHF A | RAHF B | RAHF B − A (95 % CI) | win / tie / loss | true A | true B | "
            "true B − A (95 % CI) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in dict.fromkeys([*self.scores, *truth]):
            r, t = self.scores.get(name), truth.get(name)
            cells = ["–"] * 4 if r is None else [
                f"{r['mean_a']:.4f}", f"{r['mean_b']:.4f}", _diff_ci(r), f"{r['wins']} / {r['ties']} / {r['losses']}"
            ]  # fmt: skip
            cells += ["–"] * 3 if t is None else [f"{t['mean_a']:.4f}", f"{t['mean_b']:.4f}", _diff_ci(t)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return lines


def _diff_ci(s: dict[str, Any]) -> str:
    """``+0.1000 (+0.0500, +0.1500)``, or the difference alone when it has no interval."""
    if s.get("ci_low") is None:
        return f"{s['diff']:+.4f}"
    return f"{s['diff']:+.4f} ({s['ci_low']:+.4f}, {s['ci_high']:+.4f})"


@dataclass(frozen=True)
class RepairTruth(StageResult):
    """Ground truth of the repaired images (synthetic world): means over the ``images`` considered, before and
    after (after = the accepted candidate, or the original when none was accepted), and how many accepted
    repairs are truly worse (their true implausible area grew)."""

    images: int
    implausible_area_before: float
    implausible_area_after: float
    plausibility_before: float
    plausibility_after: float
    overall_before: float
    overall_after: float
    accepted: int
    truly_worse: int

    def to_markdown(self) -> str:
        return (
            f"  - true implausible area {self.implausible_area_before:.4f} -> {self.implausible_area_after:.4f} "
            f"({_pct(self.implausible_area_before, self.implausible_area_after)}), true plausibility "
            f"{self.plausibility_before:.3f} -> {self.plausibility_after:.3f}, true overall "
            f"{self.overall_before:.3f} -> {self.overall_after:.3f} over {self.images} images; "
            f"{self.truly_worse} of {self.accepted} accepted repairs truly worse"
        )


@dataclass(frozen=True)
class RepairPair(StageResult):
    parent: str
    repaired: str


@dataclass(frozen=True)
class RepairStageResult(StageResult):
    """The repair stage over many images (one image's repair is :class:`inpainting.repair.RepairResult`).

    Outcomes per considered id: ``accepted`` (a repaired record was written), ``rejected`` (no candidate beat the
    original), ``no_mask`` (the heatmap marked nothing above the mask threshold: nothing was inpainted, and a
    rerun tries again), ``failed`` (an error; retried by a rerun); ``skipped`` counts ids decided before.
    """

    considered: int
    accepted: tuple[RepairPair, ...] = ()
    rejected: tuple[str, ...] = ()
    no_mask: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    skipped: int = 0
    not_found: tuple[str, ...] = ()  # given ids without a valid generated record
    truth: RepairTruth | None = None

    def to_markdown(self) -> str:
        lines = [
            f"- repair: {len(self.accepted)} of {self.considered} images repaired ({len(self.rejected)} kept their "
            f"original, {len(self.no_mask)} had an empty mask, {len(self.failed)} failed, {self.skipped} decided "
            "before)"
        ]
        if self.not_found:
            first = ", ".join(self.not_found[:3])
            lines.append(f"  - {len(self.not_found)} given ids have no generated record: {first}")
        if self.truth:
            lines.append(self.truth.to_markdown())
        return "\n".join(lines)


@dataclass(frozen=True)
class LoopResult(StageResult):
    """The whole loop. ``finetune`` and ``compare`` are None when nothing was selected (``skipped`` says why)."""

    root: str
    generate: GenerateResult
    selection: SelectResult
    repair: RepairStageResult
    manifest: ManifestResult
    finetune: FinetuneResult | None = None
    compare: CompareResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    swept: int = 0

    def to_markdown(self) -> str:
        lines = [f"# Feedback loop — `{self.root}`", self.generate.to_markdown(), self.selection.to_markdown(False)]
        if self.finetune:
            lines.append(self.finetune.to_markdown())
        lines += [f"- {stage}: skipped, {why}" for stage, why in self.skipped.items()]
        lines += [self.repair.to_markdown(), self.manifest.to_markdown()]
        if self.compare:
            lines += ["", "Finetuning, same prompts and seeds (A = before, B = after):", "", self.compare.to_markdown()]
        if self.selection.truth:  # last: what this round's selection truly gained (synthetic world only)
            lines += ["", self.selection.truth.to_markdown()]
        return "\n".join(lines)
