"""richfeedback: rich human feedback (RAHF) to measure, filter, finetune and repair text-to-image generators."""

__version__ = "0.1.0"
