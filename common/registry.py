"""A name -> builder registry (torch-free), the one way every entry point turns a name into a model.

A registry maps names to builders (callables returning the built object). A name that is not registered goes to
the registry's fallback rule (a local folder, a hub id, ...), which returns a builder or None; a name neither
registered nor taken by the fallback is a ValueError that lists every known name. Entries that need heavy imports
to enumerate can be added lazily by a *loader*, run once on the first lookup or listing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
Builder = Callable[..., T]


class UnknownNameError(ValueError):
    """A name that is neither registered nor taken by the registry's fallback rule."""


class Registry(Generic[T]):
    """Names -> builders of one kind of object.

    Args:
        kind: what is built, for messages (``"generator"``, ``"scorer"``).
        fallback: ``name -> builder or None`` for names that are not registered (a folder, a hub id, ...).
        fallback_help: one phrase saying what the fallback accepts, appended to the unknown-name error.
    """

    def __init__(
        self,
        kind: str,
        fallback: Callable[[str], Builder[T] | None] | None = None,
        fallback_help: str = "",
    ) -> None:
        self.kind = kind
        self._builders: dict[str, Builder[T]] = {}
        self._loaders: list[Callable[[Registry[T]], None]] = []
        self._fallback = fallback
        self._fallback_help = fallback_help

    def register(self, name: str, builder: Builder[T] | None = None, *, overwrite: bool = False):
        """Register ``builder`` under ``name``; without ``builder``, a decorator that registers the function.
        Registering a taken name is a ValueError unless ``overwrite``."""

        def add(fn: Builder[T]) -> Builder[T]:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
            if name in self._builders and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn

        return add if builder is None else add(builder)

    def add_loader(self, loader: Callable[[Registry[T]], None]) -> None:
        """``loader(self)`` registers entries on the first lookup or listing (for entries whose names need a
        heavy import to enumerate)."""
        self._loaders.append(loader)

    def _load(self) -> None:
        while self._loaders:
            self._loaders.pop(0)(self)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._builders

    def resolve(self, name: str) -> Builder[T]:
        """The builder of ``name``: the registered one, else the fallback rule's; UnknownNameError otherwise."""
        if name not in self._builders:
            self._load()  # lazily added entries: only when the name is not registered already
        if name in self._builders:
            return self._builders[name]
        builder = self._fallback(name) if self._fallback is not None and isinstance(name, str) and name else None
        if builder is None:
            tail = f"; or {self._fallback_help}" if self._fallback_help else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known names: {', '.join(self.names())}{tail}")
        return builder

    def build(self, name: str, **kwargs) -> T:
        """``resolve(name)(**kwargs)``."""
        return self.resolve(name)(**kwargs)
