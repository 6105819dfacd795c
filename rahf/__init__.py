"""RAHF: Rich Automatic Human Feedback for text-to-image generation (Liang et al., CVPR 2024).

Exports load lazily, so ``rahf.data`` (the dataset codecs and the synthetic renderer) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HEATMAP_NAMES": "common.names",
    "SCORE_NAMES": "common.names",
    "RAHFConfig": "rahf.model",
    "RAHFLabels": "rahf.model",
    "RAHFModel": "rahf.model",
    "RAHFOutput": "rahf.model",
    "PRESETS": "rahf.presets",
    "build_rahf": "rahf.presets",
    "preset_config": "rahf.presets",
    "InvalidImageError": "rahf.processor",
    "RAHFProcessor": "rahf.processor",
    "clean_prompt": "rahf.processor",
    "prompt_words": "rahf.processor",
    "RAHFScorer": "rahf.scorer",
    "RichFeedback": "common.records",
    "ScoringFailure": "common.records",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rahf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
