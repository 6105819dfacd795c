"""Before/after checkpoint comparison (the automatic form of the paper's Table 5, §5): paired statistics of RAHF
scores (:mod:`compare.stats`), a self-contained HTML report (:mod:`compare.report`) and blind human rating
sheets (:mod:`compare.rating`). See docs/compare.md."""

from compare.rating import export_rating_sheet, score_rating_sheets
from compare.report import describe_sides, is_tie, report_markdown, write_report
from compare.stats import (
    BIN_SYMBOLS,
    BINS,
    BinThresholds,
    ComparisonStats,
    PairingReport,
    Pairs,
    PromptStats,
    ScoreStats,
    compare_scores,
    pair_records,
)

__all__ = [
    "BINS",
    "BIN_SYMBOLS",
    "BinThresholds",
    "ComparisonStats",
    "PairingReport",
    "Pairs",
    "PromptStats",
    "ScoreStats",
    "compare_scores",
    "describe_sides",
    "export_rating_sheet",
    "is_tie",
    "pair_records",
    "report_markdown",
    "score_rating_sheets",
    "write_report",
]
