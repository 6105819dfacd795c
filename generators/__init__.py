"""Text-to-image generators behind one interface: the synthetic world (``generators.synthetic``),
aMUSEd (``generators.amused``) and Stable Diffusion (``generators.stable_diffusion``). ``generators.base`` holds the
interface and the generator identity; ``generators.registry`` turns generator and scorer names into models. Neither
imports torch nor diffusers."""

from __future__ import annotations

from generators.registry import (
    build_generator,
    build_scorer,
    list_generators,
    list_scorers,
    register_generator,
    register_scorer,
)

__all__ = [
    "build_generator",
    "build_scorer",
    "list_generators",
    "list_scorers",
    "register_generator",
    "register_scorer",
]
