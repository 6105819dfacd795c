"""RAHF: Rich Automatic Human Feedback for text-to-image generation (Liang et al., CVPR 2024)."""

from rahf.model import HEATMAP_NAMES, SCORE_NAMES, RAHFConfig, RAHFLabels, RAHFModel, RAHFOutput
from rahf.presets import PRESETS, build_rahf, preset_config
from rahf.processor import InvalidImageError, RAHFProcessor, clean_prompt, prompt_words
from rahf.scorer import RAHFScorer, RichFeedback, ScoringFailure

__all__ = [
    "HEATMAP_NAMES",
    "PRESETS",
    "SCORE_NAMES",
    "InvalidImageError",
    "RAHFConfig",
    "RAHFLabels",
    "RAHFModel",
    "RAHFOutput",
    "RAHFProcessor",
    "RAHFScorer",
    "RichFeedback",
    "ScoringFailure",
    "build_rahf",
    "clean_prompt",
    "preset_config",
    "prompt_words",
]
