"""Config dataclasses checked field by field from their type annotations, and read from JSON files.

One mechanism for every config: :func:`check_fields` walks a dataclass's annotations and checks (and normalises)
each value. Understood annotations: ``int``, ``float``, ``bool``, ``str``, ``Any``, ``Literal[...]``,
``X | None``, ``tuple[X, ...]`` (a JSON list becomes a tuple), ``dict[str, X]``, and ``Annotated[X, ...]``
carrying a :class:`Range` (bounds on a number) or a :class:`Fields` (a ``dict`` whose keys are the fields of
another dataclass, checked the same way, e.g. the keyword arguments of a transformers config).

Normalisation is limited to what JSON cannot express: lists become tuples and integers given for ``float`` fields
become floats. Everything else that does not match raises ``ValueError("field <name>: expected <type>, got
<type>")``; :func:`load_json_config` prefixes the file's path. Floats must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """Bounds on a number: ``low <= x <= high`` (``<`` where open); ``None`` = unbounded."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.open_high else x > self.high))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"{'<' if self.open_high else '<='} {self.high:g}"


@dataclass(frozen=True)
class Fields:
    """A ``dict`` field whose keys are the fields of ``spec`` (a dataclass); absent optional keys stay absent."""

    spec: type
    label: str  # how errors name the dict's fields ("vision": "unknown vision fields")


PositiveInt = Annotated[int, Range(1)]
Count = Annotated[int, Range(0)]  # also token ids
NonNegative = Annotated[float, Range(0)]
Positive = Annotated[float, Range(0, open_low=True)]
Fraction = Annotated[float, Range(0, 1)]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        bounds = [m.describe() for m in meta if isinstance(m, Range)]
        return " ".join([_describe(base), *bounds])
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        return "list"
    if origin is dict:
        return "dict"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def check_value(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against the annotation ``hint``; returns it normalised. ``name`` is used in errors."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        nested = [m for m in meta if isinstance(m, Fields)]
        value = check_value(value, base, name)
        if nested:
            return check_mapping(nested[0].spec, value, nested[0].label, prefix=f"{name}.")
        for bound in (m for m in meta if isinstance(m, Range)):
            if not bound.holds(value):
                raise ValueError(f"field {name}: expected {_describe(hint)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(value, arg, name)
            except ValueError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ValueError(f"field {name}: expected {_describe(hint)}, got {_type_name(value)}")
    if origin is Literal:
        if value not in typing.get_args(hint) or isinstance(value, bool):
            raise ValueError(f"field {name}: expected {_describe(hint)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"field {name}: expected list, got {_type_name(value)}")
        item = typing.get_args(hint)[0]
        return tuple(check_value(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"field {name}: expected dict, got {_type_name(value)}")
        key_hint, item = typing.get_args(hint)
        return {check_value(k, key_hint, f"{name} key"): check_value(v, item, f"{name}[{k}]") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"field {name}: expected float, got {_type_name(value)}")
        if not math.isfinite(value):
            raise ValueError(f"field {name}: expected a finite float, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"field {name}: expected int, got {_type_name(value)}")
        return value
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise ValueError(f"field {name}: expected {hint.__name__}, got {_type_name(value)}")
        return value
    raise TypeError(f"field {name}: annotation {hint!r} is not supported by check_value")


def check_keys(spec: type, data: Any, label: str) -> None:
    """``data`` must be a dict holding every required field of ``spec`` and no unknown one."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object of {label} fields, got {_type_name(data)}")
    fields = dataclasses.fields(spec)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"unknown {label} fields: {unknown}")
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"missing {label} fields: {missing}")


def check_mapping(spec: type, data: Any, label: str, prefix: str = "") -> dict[str, Any]:
    """A dict checked against the fields of ``spec`` (keys and values); returns the normalised dict."""
    check_keys(spec, data, label)
    hints = _hints(spec)
    return {k: check_value(v, hints[k], prefix + k) for k, v in data.items()}


def check_fields(obj: Any) -> None:
    """Check and normalise every field of a dataclass instance in place (call it from ``__post_init__``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, check_value(getattr(obj, f.name), hints[f.name], f.name))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding an object; bad JSON raises ``ValueError`` naming the file and the position."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {_type_name(data)}")
    return data


def from_mapping(cls: type[T], data: dict[str, Any], label: str) -> T:
    """Build the dataclass ``cls`` from a dict: unknown or missing keys raise; the values are checked by
    ``cls.__post_init__`` (which calls :func:`check_fields`)."""
    check_keys(cls, data, label)
    return cls(**data)


def load_json_config(cls: type[T], path: str | Path, label: str, ignore: tuple[str, ...] = ()) -> T:
    """Read ``cls`` from a JSON file; every error is a ``ValueError`` starting with the file's path."""
    data = read_json_object(path)
    try:
        return from_mapping(cls, {k: v for k, v in data.items() if k not in ignore}, label)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
