"""One config for the feedback loop: :class:`LoopConfig` holds every knob of every stage with its default, for the
command line, the Prefect flows and ``prefect.yaml`` alike (a test fails on any drift between them).

It nests the library's own settings instead of restating them: :class:`finetune.select.SelectionConfig` (which
images become finetuning data), :class:`inpainting.repair.RepairConfig` with its
:class:`inpainting.masks.MaskConfig` (how a repair is made and accepted). Importing this module imports neither
torch nor Prefect.

A run folder remembers what made it: the first stage that writes a folder stores its generator and RAHF source in
``run.json`` (:func:`claim_run_folder`); later commands on the folder default to those and refuse another one.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common.config_fields import check_value
from common.keys import run_key
from finetune.select import SelectionConfig
from inpainting.masks import THRESHOLD_MODES, MaskConfig
from inpainting.repair import RepairConfig, loop_repair_config
from rahf.zoo import DEMO_MODEL

DEFAULT_GENERATOR = "synthetic"  # the generator of a run folder that records none
DEFAULT_RAHF = DEMO_MODEL  # the RAHF of a run folder that records none: the trained demo model
RUN_FILE = run_key()  # {"generator": ..., "rahf": ...} at the root of a run folder (and of an exported dataset)


@dataclass
class CompareSettings:
    """The before/after comparison of the loop (and of ``richfeedback compare``)."""

    per_prompt: int = 4  # images per prompt and side
    seed_offset: int = 1000  # seeds per_prompt images from here, apart from the generation's seeds
    n_boot: int = 10_000  # bootstrap resamples of every interval


def _loop_selection() -> SelectionConfig:
    return SelectionConfig(score="overall")


@dataclass
class LoopConfig:
    """Every knob of the feedback loop; the defaults are the ones the loop-gain benchmark supports.

    ``generator`` and ``rahf`` None (the default) mean: the run folder's (``run.json``), else
    :data:`DEFAULT_GENERATOR` / :data:`DEFAULT_RAHF` (see :func:`claim_run_folder`).
    """

    generator: str | None = None  # preset, hub id or folder
    rahf: str | None = None  # RAHF folder, hub id, preset, "synthetic-default" (the demo model) or "ground-truth"
    device: str = "cpu"
    per_prompt: int = 8  # candidates per prompt
    batch_size: int = 16  # images generated and scored at a time
    chunk_prompts: int = 8  # prompts per generate task (the unit a parallel task runner fans out)
    #: tasks tagged ``gpu`` running at once across all workers (a Prefect tag concurrency limit); None: no limit
    gpu_slots: int | None = None
    #: seconds after which another host's claim on an image (claims/<id>.json) counts as abandoned
    claim_ttl_s: float = 600.0
    #: which images become finetuning data: best by predicted overall, plausibility >= 0.8
    selection: SelectionConfig = field(default_factory=_loop_selection)
    #: LoraTrainConfig fields (steps, lr, rank, ...); data_dir, out_dir and generator come from the loop
    finetune: dict[str, Any] = field(default_factory=dict)
    compare: CompareSettings = field(default_factory=CompareSettings)
    #: how a repair is made and accepted (mask, candidates, margin, heat check)
    repair: RepairConfig = field(default_factory=loop_repair_config)
    repair_below: float = 1.0  # repair images whose predicted repair score (plausibility) is below this ...
    repair_limit: int | None = 8  # ... at most this many, worst first (None: all)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(LoopConfig)
        nested = {"selection": SelectionConfig, "compare": CompareSettings, "repair": RepairConfig}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in nested:
                if not isinstance(value, nested[f.name]):
                    raise ValueError(f"field {f.name}: expected {nested[f.name].__name__}, got {type(value).__name__}")
            else:
                setattr(self, f.name, check_value(value, hints[f.name], f.name))
        for name in ("per_prompt", "batch_size", "chunk_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"field {name}: expected an int >= 1, got {getattr(self, name)}")
        for name in ("per_prompt", "seed_offset", "n_boot"):
            v = check_value(getattr(self.compare, name), int, f"compare.{name}")
            if v < (0 if name == "seed_offset" else 1):
                raise ValueError(f"field compare.{name}: expected an int >= {0 if name == 'seed_offset' else 1}")
        if self.gpu_slots is not None and self.gpu_slots < 1:
            raise ValueError(f"field gpu_slots: expected an int >= 1 or null, got {self.gpu_slots}")
        if not self.claim_ttl_s > 0:
            raise ValueError(f"field claim_ttl_s: expected a float > 0, got {self.claim_ttl_s}")
        if not 0.0 <= self.repair_below <= 1.0:
            raise ValueError(f"field repair_below: expected a float in [0, 1], got {self.repair_below}")
        if self.repair_limit is not None and self.repair_limit < 0:
            raise ValueError(f"field repair_limit: expected an int >= 0 or null, got {self.repair_limit}")
        if any(k in self.finetune for k in ("data_dir", "out_dir", "generator")):
            raise ValueError("field finetune: data_dir, out_dir and generator come from the loop, not from finetune")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form (nested dicts), as flows take it and ``prefect.yaml`` states it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LoopConfig:
        """The defaults with ``data`` laid over them: nested dicts override field by field (``{"repair": {"mask":
        {"threshold": 0.3}}}`` keeps the other repair and mask defaults). Unknown keys and bad values raise
        ValueError naming the field, e.g. ``repair.mask.threshold``."""
        return _merge(cls(), data or {}, "")

    def with_overrides(self, data: dict[str, Any]) -> LoopConfig:
        """This config with ``data`` laid over it, as :meth:`from_dict` does over the defaults."""
        return _merge(self, data, "")


def _merge(obj: Any, data: Any, prefix: str) -> Any:
    """``obj`` (a dataclass) with the fields of ``data`` replaced; nested dataclasses merge recursively."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config fields: {[prefix + k for k in unknown]}")
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, f"{prefix}{key}.")
        elif isinstance(obj, LoopConfig):
            changes[key] = value  # checked by LoopConfig.__post_init__
        else:
            changes[key] = check_value(value, hints[key], prefix + key)
    try:
        return dataclasses.replace(obj, **changes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def get_path(config: Any, path: str) -> Any:
    """The value at a dotted path of a config, e.g. ``repair.mask.threshold`` or ``selection.thresholds.
    plausibility`` (a dict key); None for an absent dict key."""
    value = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value


def _nest(path: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _deep_update(target: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = v


# ---------------------------------------------------------------------------------------------------------
# Command-line flags from the config
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A command-line flag bound to a dotted path of :class:`LoopConfig`; its default is the config's value."""

    name: str  # e.g. "--mask-threshold"
    path: str  # e.g. "repair.mask.threshold"
    help: str
    type: Any = None  # derived from the field's annotation when None


_SOURCE_HELP = "default: the run folder's (run.json), else"
FLAG_HELP: dict[str, str] = {
    "generator": f"synthetic | amused-tiny | sd-tiny | <hub id or folder> ({_SOURCE_HELP} {DEFAULT_GENERATOR})",
    "rahf": f"RAHF folder, hub id, preset or {DEMO_MODEL} (the trained demo model) ({_SOURCE_HELP} {DEFAULT_RAHF})",
    "device": "cpu, cuda, cuda:1, ...",
    "per_prompt": "candidates generated per prompt",
    "batch_size": "images generated and scored at a time",
    "chunk_prompts": "prompts per generate task (the unit that parallel workers share)",
    "gpu_slots": "tasks tagged gpu running at once across all workers (Prefect tag concurrency limit; "
    "default: no limit)",
    "claim_ttl_s": "seconds after which another host's claim on an image counts as abandoned",
    "selection.score": "the score that picks the best image per prompt",
    "selection.thresholds.plausibility": "plausibility a selected image must reach",
    "selection.top_k": "images kept per prompt at most",
    "compare.per_prompt": "images per prompt and side of the before/after comparison",
    "repair_below": "repair images whose predicted plausibility is below this (1.0: the least plausible)",
    "repair_limit": "repair at most this many, worst first",
    "repair.n": "inpainted candidates per image",
    "repair.margin": "a candidate must beat the original's plausibility by more than this",
    "repair.heat_drop": "a candidate must cut the mean predicted implausibility inside the mask by this fraction "
    "(0: off)",
    "repair.guard": "a candidate may lower no other predicted score (alignment, aesthetics, overall for a "
    "plausibility repair) by more than this",
    "repair.mask.threshold": "implausibility heat that enters the repair mask (see --mask-threshold-mode)",
    "repair.mask.threshold_mode": "absolute: heat > threshold; quantile: above the map's threshold-quantile; "
    "relative: above threshold x the map's own maximum",
    "repair.mask.floor": "heat every masked pixel must also exceed, whatever the mode",
    "repair.mask.dilate_frac": "mask dilation radius, fraction of the image's shorter side",
    "finetune.steps": "LoRA optimizer steps (diffusers generators; default: LoraTrainConfig's)",
}


def _flags(pairs: Sequence[tuple[str, str]], **types: Any) -> tuple[Flag, ...]:
    return tuple(Flag(name, path, FLAG_HELP[path], types.get(path)) for name, path in pairs)


MASK_FLAGS = _flags(
    [
        ("--mask-threshold", "repair.mask.threshold"),
        ("--mask-threshold-mode", "repair.mask.threshold_mode"),
        ("--mask-floor", "repair.mask.floor"),
        ("--mask-dilate-frac", "repair.mask.dilate_frac"),
    ]
)
SOURCE_FLAGS = _flags([("--generator", "generator"), ("--rahf", "rahf"), ("--device", "device")])
SELECT_FLAGS = _flags(
    [
        ("--select-by", "selection.score"),
        ("--threshold", "selection.thresholds.plausibility"),
        ("--top-k", "selection.top_k"),
    ],
    **{"selection.thresholds.plausibility": float},
)
#: ``richfeedback loop`` and ``demo``
LOOP_FLAGS = (
    SOURCE_FLAGS
    + _flags([("--per-prompt", "per_prompt"), ("--batch-size", "batch_size")])
    + _flags([("--chunk-prompts", "chunk_prompts"), ("--gpu-slots", "gpu_slots"), ("--claim-ttl", "claim_ttl_s")])
    + SELECT_FLAGS
    + _flags([("--compare-per-prompt", "compare.per_prompt")])
    + _flags(
        [
            ("--repair-below", "repair_below"),
            ("--repair-limit", "repair_limit"),
            ("--repair-n", "repair.n"),
            ("--repair-margin", "repair.margin"),
            ("--repair-heat-drop", "repair.heat_drop"),
            ("--repair-guard", "repair.guard"),
        ],
        **{"repair.guard": float},
    )
    + MASK_FLAGS
    + _flags([("--finetune-steps", "finetune.steps")], **{"finetune.steps": int})
)
#: ``richfeedback repair``
REPAIR_FLAGS = (
    SOURCE_FLAGS
    + _flags(
        [
            ("--below", "repair_below"),
            ("--limit", "repair_limit"),
            ("--n", "repair.n"),
            ("--margin", "repair.margin"),
            ("--heat-drop", "repair.heat_drop"),
            ("--guard", "repair.guard"),
        ],
        **{"repair.guard": float},
    )
    + MASK_FLAGS
)
#: ``richfeedback compare``
COMPARE_FLAGS = SOURCE_FLAGS + _flags([("--per-prompt", "compare.per_prompt")])
#: ``richfeedback bench-loop``: the repair settings (the benchmark's own RepairConfig)
BENCH_REPAIR_FLAGS = (
    _flags(
        [
            ("--repair-n", "repair.n"),
            ("--repair-margin", "repair.margin"),
            ("--repair-heat-drop", "repair.heat_drop"),
            ("--repair-guard", "repair.guard"),
        ],
        **{"repair.guard": float},
    )
    + MASK_FLAGS
)


def _hint_of(path: str) -> Any:
    """The annotation of a dotted path's field (the value type for a dict key)."""
    cls: Any = LoopConfig
    hint: Any = None
    for part in path.split("."):
        if typing.get_origin(hint) is dict:
            return typing.get_args(hint)[1]
        hint = typing.get_type_hints(cls)[part]
        cls = hint
    return hint


def _argparse_type(hint: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(type callable, choices) of an annotation: the non-None member of ``X | None``; a Literal's choices."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return str, tuple(args)
    if args and typing.get_origin(hint) is not dict:
        return _argparse_type(args[0])
    return hint, None


def add_config_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag], base: Any = None) -> None:
    """Add one flag per entry of ``flags``, default (shown in the help) = the value in ``base`` (a LoopConfig,
    default ``LoopConfig()``)."""
    base = base if base is not None else LoopConfig()
    for f in flags:
        typ, choices = (f.type, None) if f.type is not None else _argparse_type(_hint_of(f.path))
        if f.path == "repair.mask.threshold_mode":
            choices = THRESHOLD_MODES
        default = get_path(base, f.path)
        shown = "" if default is None and f.path in ("generator", "rahf") else " (default: %(default)s)"
        metavar = None if choices else _METAVARS.get(f.path, f.path.split(".")[-1].upper())
        parser.add_argument(
            f.name, dest=_dest(f), type=typ, choices=choices, default=default, metavar=metavar, help=f.help + shown
        )


_METAVARS = {
    "gpu_slots": "N",
    "claim_ttl_s": "SECONDS",
    "generator": "NAME",
    "rahf": "SOURCE",
    "selection.score": "SCORE",
    "finetune.steps": "STEPS",
}


def _dest(flag: Flag) -> str:
    return "cfg__" + flag.path.replace(".", "__")


def config_from_args(args: argparse.Namespace, flags: Sequence[Flag], base: LoopConfig | None = None) -> LoopConfig:
    """``base`` (default ``LoopConfig()``) with the values of ``flags`` parsed into ``args``; a dict-key flag
    left at None (``--finetune-steps``) sets nothing."""
    overrides: dict[str, Any] = {}
    for f in flags:
        value = getattr(args, _dest(f))
        container = f.path.rsplit(".", 1)[0] if "." in f.path else ""
        if value is None and container and isinstance(get_path(base or LoopConfig(), container), dict):
            continue
        extra = _nest(f.path, value)
        _deep_update(overrides, extra)
    base = base or LoopConfig()
    for key in ("finetune",):  # a dict field: keep the base's other keys
        if key in overrides:
            overrides[key] = {**getattr(base, key), **overrides[key]}
    if "selection" in overrides and "thresholds" in overrides["selection"]:
        overrides["selection"]["thresholds"] = {**base.selection.thresholds, **overrides["selection"]["thresholds"]}
    return base.with_overrides(overrides)


# ---------------------------------------------------------------------------------------------------------
# What made a run folder
# ---------------------------------------------------------------------------------------------------------


class RunFolderMismatchError(ValueError):
    """A command asked for another generator or RAHF than the run folder (or dataset) was made with."""


def read_run_sources(root: str) -> dict[str, str] | None:
    """``{"generator": ..., "rahf": ...}`` of ``<root>/run.json``, or None when the folder records none."""
    from flows.storage import RunStore

    store = RunStore(root)
    try:
        data = store.read_json(RUN_FILE)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("generator", "rahf")):
        raise ValueError(f"{store.uri(RUN_FILE)}: expected {{'generator': str, 'rahf': str}}, got {data!r}")
    return {"generator": data["generator"], "rahf": data["rahf"]}


def _pick(what: str, given: str | None, recorded: str, where: str) -> str:
    if given is None or given == recorded:
        return recorded
    raise RunFolderMismatchError(
        f"{where} was made with {what} {recorded!r} (its {RUN_FILE}), not {given!r}: leave --{what} out to use "
        f"{recorded!r}, or use another run folder"
    )


def claim_run_folder(
    root: str, generator: str | None = None, rahf: str | None = None, *, write: bool = True
) -> tuple[str, str]:
    """The (generator, rahf) a command uses on the run folder ``root``.

    The rule: a folder whose ``run.json`` records a generator and RAHF uses those; a value given (not None) must
    equal the recorded one, else :class:`RunFolderMismatchError`. A folder that records none uses the given values,
    else :data:`DEFAULT_GENERATOR` / :data:`DEFAULT_RAHF`, and (``write``) records them: the first command that
    writes a folder claims it.
    """
    recorded = read_run_sources(root)
    if recorded is not None:
        return _pick("generator", generator, recorded["generator"], root), _pick("rahf", rahf, recorded["rahf"], root)
    chosen = (generator or DEFAULT_GENERATOR, rahf or DEFAULT_RAHF)
    if write:
        from flows.storage import RunStore

        RunStore(root).write_json(RUN_FILE, {"generator": chosen[0], "rahf": chosen[1]})
    return chosen


def dataset_generator(data_dir: str) -> str | None:
    """The generator that made an exported finetuning set: its ``run.json`` (written by the selection stage),
    else the generator identity of its ``metadata.jsonl`` rows when they all agree (the synthetic world, or a
    pipeline loaded by hub id or folder); None when it records none."""
    recorded = read_run_sources(data_dir)
    if recorded is not None:
        return recorded["generator"]
    from finetune.dataset import read_metadata

    try:
        rows = read_metadata(data_dir)
    except (FileNotFoundError, ValueError):
        return None
    names = set()
    for row in rows:
        ident = row.get("generator") or {}
        if not isinstance(ident, dict) or not ident.get("model"):
            return None
        names.add(DEFAULT_GENERATOR if ident.get("backend") == "synthetic" else str(ident["model"]).split("@seed")[0])
    return names.pop() if len(names) == 1 else None


def resolve_dataset_generator(data_dir: str, given: str | None) -> str | None:
    """The generator to finetune on ``data_dir``: the dataset's (:func:`dataset_generator`) when ``given`` is None
    or equal to it; ``given`` when the dataset records none; :class:`RunFolderMismatchError` when they differ."""
    recorded = dataset_generator(data_dir)
    if recorded is None:
        return given
    return _pick("generator", given, recorded, data_dir)


__all__ = [
    "BENCH_REPAIR_FLAGS",
    "COMPARE_FLAGS",
    "DEFAULT_GENERATOR",
    "DEFAULT_RAHF",
    "LOOP_FLAGS",
    "REPAIR_FLAGS",
    "RUN_FILE",
    "SELECT_FLAGS",
    "CompareSettings",
    "Flag",
    "LoopConfig",
    "MaskConfig",
    "RepairConfig",
    "RunFolderMismatchError",
    "SelectionConfig",
    "add_config_flags",
    "claim_run_folder",
    "config_from_args",
    "dataset_generator",
    "get_path",
    "read_run_sources",
    "resolve_dataset_generator",
]
