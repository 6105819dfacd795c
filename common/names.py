"""The names every package shares: the four scores and the two heatmaps of rich feedback (one place, no torch).

Scores are in [0, 1], higher is better; heatmaps are (H, W) maps in [0, 1], higher is worse.
"""

from __future__ import annotations

#: the four predicted (and ground-truth) scores, in the order tables and score heads use
SCORE_NAMES: tuple[str, ...] = ("plausibility", "alignment", "aesthetics", "overall")
#: the two heatmaps: where an image is implausible, where it does not match its prompt
HEATMAP_NAMES: tuple[str, ...] = ("implausibility", "misalignment")
