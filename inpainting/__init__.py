"""Heatmap-guided inpainting repair (paper §5, Fig. 9).

* ``inpainting.masks``: implausibility heatmap → inpainting mask (resize, absolute or quantile threshold, dilation
  by at least one latent/token cell of the generator, small components dropped, optional feather).
* ``inpainting.repair``: repaint the masked region of an image with N seeded candidates, paste the untouched
  pixels back, rescore every candidate with RAHF, keep the best by plausibility (configurable) only when it beats
  the original by a margin, and record every candidate. An empty mask means nothing to repair.
"""
