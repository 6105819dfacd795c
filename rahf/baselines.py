"""Baselines for the synthetic benchmark (paper §4.2 compares RAHF with ResNet-50 regressors).

* ``MeanPredictor``: the training mean of every score and of every heatmap, for every image.
* ``SmallCNN``: an image-only convolutional regressor of the four scores and two heatmaps (a small stand-in
  for the paper's ResNet-50 baseline), trained with the same steps and batch size as RAHF (and, where RAHF
  uses one, the same empty-map loss weight). Its defaults are the bar's settings,
  :data:`rahf.baseline_recipe.BASELINES_RECIPE`.

Neither reads the prompt, so neither marks keywords: their keyword sequences are the prompts unmarked.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.names import HEATMAP_NAMES, SCORE_NAMES
from rahf.baseline_recipe import BASELINES_RECIPE
from rahf.evaluate import GroundTruth, Predictions
from rahf.model import heatmap_loss
from rahf.processor import RAHFProcessor, clean_prompt
from rahf.train import SplitData, micro_batch_index


class MeanPredictor:
    """Predicts the training means."""

    def fit(self, data: SplitData) -> MeanPredictor:
        self.scores = {n: float(data.scores[n].mean()) for n in SCORE_NAMES}
        self.maps = {n: data.heatmaps[n].mean(dim=0).numpy() for n in HEATMAP_NAMES}
        return self

    def predict(self, gt: GroundTruth, processor: RAHFProcessor) -> Predictions:
        n = len(gt.uids)
        return Predictions(
            scores={k: np.full(n, v) for k, v in self.scores.items()},
            heatmaps={k: np.repeat(v[None], n, axis=0) for k, v in self.maps.items()},
            sequences=[clean_prompt(p) for p in gt.prompts],
        )


class SmallCNN(nn.Module):
    """(B, 3, S, S) -> scores (B, 4) and heatmaps (B, 2, S, S), all in [0, 1]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        c = width

        def down(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(a, b, 3, 2, 1),
                nn.BatchNorm2d(b),
                nn.ReLU(inplace=True),
                nn.Conv2d(b, b, 3, 1, 1),
                nn.BatchNorm2d(b),
                nn.ReLU(inplace=True),
            )

        def up(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU(inplace=True))

        self.encoder = nn.Sequential(down(3, c), down(c, 2 * c), down(2 * c, 4 * c))
        self.score_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * c, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, len(SCORE_NAMES)),
        )
        self.decoder = nn.Sequential(
            up(4 * c, 2 * c), up(2 * c, c), up(c, c), nn.Conv2d(c, len(HEATMAP_NAMES), 3, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(x)
        return torch.sigmoid(self.score_head(f)), torch.sigmoid(self.decoder(f))


def train_small_cnn(
    data: SplitData,
    *,
    steps: int = BASELINES_RECIPE.steps,
    batch_size: int = BASELINES_RECIPE.batch_size,
    lr: float = BASELINES_RECIPE.lr,
    seed: int = BASELINES_RECIPE.seed,
    empty_heatmap_weight: float = BASELINES_RECIPE.empty_heatmap_weight,
    heatmap_loss_kind: str = BASELINES_RECIPE.heatmap_loss,
) -> SmallCNN:
    """Train with AdamW on MSE (scores) + RAHF's map loss (``heatmap_loss``: kind, extra weight on empty maps)."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    targets_s = torch.stack([data.scores[n] for n in SCORE_NAMES], dim=1)
    targets_m = torch.stack([data.heatmaps[n] for n in HEATMAP_NAMES], dim=1)
    model.train()
    for step in range(steps):
        index = micro_batch_index(step, len(data), batch_size, seed)
        scores, maps = model(data.pixels[index])
        target_maps = targets_m[index]
        loss = F.mse_loss(scores, targets_s[index]) * len(SCORE_NAMES) + sum(
            heatmap_loss(maps[:, i], target_maps[:, i], empty_heatmap_weight, heatmap_loss_kind)
            for i in range(len(HEATMAP_NAMES))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict_small_cnn(model: SmallCNN, gt: GroundTruth, processor: RAHFProcessor, batch_size: int = 64) -> Predictions:
    scores, maps = [], []
    for start in range(0, len(gt.images), batch_size):
        px = processor.preprocess_images(gt.images[start : start + batch_size])
        s, m = model(px)
        scores.append(s)
        maps.append(m)
    s, m = torch.cat(scores).numpy(), torch.cat(maps).numpy()
    return Predictions(
        scores={n: s[:, i] for i, n in enumerate(SCORE_NAMES)},
        heatmaps={n: m[:, i] for i, n in enumerate(HEATMAP_NAMES)},
        sequences=[clean_prompt(p) for p in gt.prompts],
    )
