"""An independent judge for the loop-gain benchmark: a second scorer, trained apart from the loop's RAHF, that
re-checks the loop's picks and accepted repairs (:mod:`compare.loop_gain`, table (e)).

``cnn``: the small CNN baseline of :mod:`rahf.baselines` (image only, no prompt), trained on a synthetic split
drawn with a DIFFERENT seed than the demo model's data (:class:`JudgeRecipe`: seed 1, 2,000 train / 200 dev
images, 400 steps of the bar's batch size and learning rate — fewer than the bar's 1,100, for speed). The trained
weights are cached under ``<cache_root>/judges/cnn-<settings hash>/`` so they are trained once. A folder path
instead is loaded as an (independently trained) RAHF model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.atomic import atomic_write_bytes, atomic_write_text
from common.names import HEATMAP_NAMES, SCORE_NAMES
from common.records import RichFeedback, ScoringFailure
from rahf.baseline_recipe import BASELINES_RECIPE
from rahf.baselines import SmallCNN, train_small_cnn
from rahf.zoo import cache_root, recipe_hash


@dataclass(frozen=True)
class JudgeRecipe:
    """How the CNN judge is trained: its own synthetic data (seed ``data_seed``) and the bar's CNN settings."""

    data_seed: int = 1  # the demo model's data uses seed 0: the judge sees other images
    train: int = 2000  # training images
    dev: int = 200  # dev images (the judge's Pearson on them is reported in its identity)
    size: int = 64  # image side of the synthetic split
    preset: str = "rahf-tiny"  # whose image processor (resolution, normalisation) the CNN reads with
    steps: int = 400  # fewer than the bar's 1,100: the judge trains in about a minute on CPU
    batch_size: int = BASELINES_RECIPE.batch_size
    lr: float = BASELINES_RECIPE.lr
    empty_heatmap_weight: float = BASELINES_RECIPE.empty_heatmap_weight
    heatmap_loss: str = BASELINES_RECIPE.heatmap_loss
    seed: int = 1  # initialisation and batch order

    def key(self) -> str:
        return recipe_hash(asdict(self))


JUDGE_RECIPE = JudgeRecipe()


class SmallCNNScorer:
    """A :class:`~rahf.baselines.SmallCNN` through RAHFScorer's ``score`` call: four scores in [0, 1] and, unless
    ``scores_only``, the two maps resized to each image's size; no misaligned keywords (it reads no prompt)."""

    def __init__(self, model: SmallCNN, processor: Any, identity: dict[str, Any] | None = None) -> None:
        self.model, self.processor = model.eval(), processor
        self.identity = dict(identity or {"source": "small CNN judge", "weights_hash": None})

    @torch.no_grad()
    def score(
        self,
        prompt: str | Sequence[str],
        images: Sequence[Image.Image],
        *,
        heatmaps: Sequence[str] | None = None,
        scores_only: bool = False,
        batch_size: int = 64,
        **unused: Any,
    ) -> list[RichFeedback | ScoringFailure]:
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        wanted = HEATMAP_NAMES if heatmaps is None else tuple(heatmaps)
        out: list[RichFeedback | ScoringFailure] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            s, m = self.model(self.processor.preprocess_images(chunk))
            for k, image in enumerate(chunk):
                scores = {n: float(s[k, i]) for i, n in enumerate(SCORE_NAMES)}
                maps = {}
                if not scores_only:
                    for i, n in enumerate(HEATMAP_NAMES):
                        if n in wanted:
                            small = Image.fromarray(m[k, i].numpy().astype(np.float32), mode="F")
                            maps[n] = np.clip(np.asarray(small.resize(image.size, Image.BILINEAR)), 0.0, 1.0)
                out.append(RichFeedback(prompts[start + k], scores, maps, []))
        return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def cnn_judge(recipe: JudgeRecipe = JUDGE_RECIPE, root: str | Path | None = None, log: Any = None) -> SmallCNNScorer:
    """The CNN judge of ``recipe``: loaded from ``<root>/judges/cnn-<hash>/`` (root: :func:`rahf.zoo.cache_root`)
    or trained there first (writes the two splits, trains, scores the dev split, saves ``model.pt`` and
    ``judge.json``)."""
    from rahf.data.synthetic import write_split
    from rahf.evaluate import load_ground_truth
    from rahf.presets import build_rahf
    from rahf.train import load_split

    folder = Path(root or cache_root()) / "judges" / f"cnn-{recipe.key()}"
    processor = build_rahf(recipe.preset)[1]
    weights, meta_path = folder / "model.pt", folder / "judge.json"
    if weights.exists() and meta_path.exists():
        model = SmallCNN()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return SmallCNNScorer(model, processor, json.loads(meta_path.read_text()))
    (log or (lambda msg: None))(f"training the CNN judge ({recipe.steps} steps) into {folder}")
    data = folder / "data"
    write_split(data, "train", recipe.train, size=recipe.size, seed=recipe.data_seed)
    write_split(data, "dev", recipe.dev, size=recipe.size, seed=recipe.data_seed)
    model = train_small_cnn(
        load_split(data, "train", processor),
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        empty_heatmap_weight=recipe.empty_heatmap_weight,
        heatmap_loss_kind=recipe.heatmap_loss,
    )
    gt = load_ground_truth(data, "dev")
    scorer = SmallCNNScorer(model, processor)
    predicted = scorer.score(gt.prompts, [Image.open(p).convert("RGB") for p in gt.images], scores_only=True)
    dev = {n: _pearson(np.array([f.scores[n] for f in predicted]), gt.scores[n]) for n in SCORE_NAMES}
    identity = {
        "source": f"small CNN judge (seed {recipe.data_seed} data, {recipe.train} images, {recipe.steps} steps)",
        "weights_hash": recipe.key(),
        "recipe": asdict(recipe),
        "dev_pearson": dev,
    }
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(weights, buf.getvalue())
    atomic_write_text(meta_path, json.dumps(identity, indent=1, allow_nan=True))
    scorer.identity = identity
    return scorer


def build_judge(spec: str, *, device: str = "cpu", batch_size: int = 16, log: Any = None) -> Any:
    """``"cnn"``: the cached CNN judge (:func:`cnn_judge`); otherwise a RAHF folder, loaded as a scorer."""
    if spec == "cnn":
        return cnn_judge(log=log)
    if not Path(spec).is_dir():
        raise ValueError(f"judge must be 'cnn' or a RAHF model folder, got {spec!r}")
    from rahf.scorer import RAHFScorer

    return RAHFScorer.from_pretrained(spec, device=device, batch_size=batch_size)
