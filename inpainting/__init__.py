"""Heatmap-guided inpainting repair (paper §5, Fig. 9). Not built yet."""
