"""The baselines' settings of the synthetic benchmark's bar, beside the model's recipe (``rahf.zoo``).

The bar (docs/results.md, rounds 3-5) compares RAHF with the mean predictor and the small CNN of
:mod:`rahf.baselines`; the small CNN is trained with the settings below (1,100 steps of 16, lr 2e-3, MSE map loss
with an extra weight of 4 on empty target maps, seed 0). ``richfeedback eval --baselines`` uses them by default,
so a plain ``eval`` reproduces the bar's baseline numbers. This module imports no torch: the command line reads it
to show its defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BaselineRecipe:
    """How the small CNN baseline is trained (the mean predictor has no settings)."""

    steps: int = 1100  # optimizer steps
    batch_size: int = 16  # examples per step
    lr: float = 2e-3  # AdamW learning rate (weight decay 0.01)
    empty_heatmap_weight: float = 4.0  # extra map-loss weight on samples whose target map is empty (lambda)
    heatmap_loss: str = "mse"  # per-pixel map loss: "mse" | "bce" (BCE was far weaker for the CNN, round 5)
    seed: int = 0  # initialisation and batch order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BASELINES_RECIPE = BaselineRecipe()
"""The settings the bar's small CNN numbers were measured with (docs/results.md, rounds 3-5)."""
