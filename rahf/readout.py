"""The score read-out: a linear map from a trained RAHF's own outputs to its four scores, fit after training.

A score head reads the fused feature grid through one small convolution and a pooling; the heatmap heads are
trained on dense per-pixel targets and often carry more of what a score means than the score head learned to
use (a plausibility score falls with the implausible area, an aesthetics score with it too). The read-out
takes, for each image, the four head scores and each heatmap's mean, peak and hot area (share of pixels above
``area_threshold``) — :func:`feature_names` — and fits one ridge regression per score on a held-out labelled
split (standardised features, unpenalised intercept, penalty ``lam``). At scoring time the calibrated score is
that regression's value clipped to [0, 1].

The read-out also fits, per heatmap, a presence gate: a logistic regression on the same features that gives the
probability that the image has any of that heat (its labelled map is not empty). The map returned is the model's
map times that probability, which takes faint false heat off flawless images; the scale-free map metrics of a
flawed image (CC, KLD, SIM, NSS, AUC-Judd) do not change, since a map is only scaled.

The model's weights are untouched; the read-out is saved beside them as ``score_readout.safetensors`` (its
numbers as tensors, its settings and fit statistics as metadata) and :class:`rahf.scorer.RAHFScorer` applies it
whenever the folder has one.

Fit it on a split the model was not trained on (the dev split): fit on training images, the read-out learns
how the heads behave on images they have memorised. ``richfeedback calibrate`` fits and saves one.

The module imports without torch (the command line reads :class:`ReadoutConfig`'s defaults); the functions that
take tensors import it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save

from common.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import torch

READOUT_FILE = "score_readout.safetensors"
MAP_STATS = ("mean", "max", "area")


@dataclass(frozen=True)
class ReadoutConfig:
    """How a read-out is fit."""

    split: str = "dev"  # the labelled split it is fit on (not the training split)
    lam: float = 10.0  # ridge penalty on the standardised features
    area_threshold: float = 0.25  # a heatmap pixel above this counts toward the hot area
    map_gates: bool = True  # also fit a presence gate per heatmap (the map returned is scaled by it)

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not 0.0 <= self.area_threshold < 1.0:
            raise ValueError(f"area_threshold must be in [0, 1), got {self.area_threshold}")


def feature_names(score_names: Sequence[str], heatmap_names: Sequence[str]) -> tuple[str, ...]:
    """The read-out's input columns: the head scores, then ``<heatmap>/<mean|max|area>`` per heatmap."""
    return (*score_names, *[f"{h}/{stat}" for h in heatmap_names for stat in MAP_STATS])


def output_features(
    scores: Mapping[str, torch.Tensor],
    heatmaps: Mapping[str, torch.Tensor],
    score_names: Sequence[str],
    heatmap_names: Sequence[str],
    area_threshold: float,
) -> torch.Tensor:
    """(B, F) float32 features of a batch of outputs: scores (B,) each, heatmaps (B, H, W) in [0, 1].

    Differentiable through the scores and the maps' mean and peak (the hot area is a count, gradient zero)."""
    import torch

    cols = [scores[s].float() for s in score_names]
    for h in heatmap_names:
        m = heatmaps[h].float().flatten(1)
        cols += [m.mean(1), m.amax(1), (m > area_threshold).float().mean(1)]
    return torch.stack(cols, dim=1)


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression of y (N,) on x (N, F) with standardised columns and an unpenalised intercept.

    Returns (mean (F,), scale (F,), weights (F + 1,), intercept first); predict with :func:`predict`.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, F) and y (N,), got {x.shape} and {y.shape}")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale == 0] = 1.0  # a constant feature carries nothing; keep it finite
    a = np.c_[np.ones(len(x)), (x - mean) / scale]
    # min |a w - y|^2 + lam |w[1:]|^2 as one least-squares system; lstsq's minimum-norm answer gives a constant
    # (all-zero standardised) column weight 0 even at lam = 0
    rows = np.sqrt(lam) * np.eye(a.shape[1])[1:]
    weights = np.linalg.lstsq(np.r_[a, rows], np.r_[y, np.zeros(len(rows))], rcond=None)[0]
    return mean, scale, weights


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """L2-penalised logistic regression of y (N,) in {0, 1} on x (N, F) standardised by ``mean``/``scale``
    (Newton's method; the intercept unpenalised). Returns the weights (F + 1,), intercept first."""
    a = np.c_[np.ones(len(x)), (x - mean) / scale]
    penalty = np.eye(a.shape[1]) * max(lam, 1e-6)  # a little even at lam = 0: separable data stays finite
    penalty[0, 0] = 0.0
    w = np.zeros(a.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        hessian = a.T @ (a * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(w)), a.T @ (p - y) + penalty @ w)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def predict(x: np.ndarray, fit: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """(N,) predictions of a :func:`fit_ridge` result for features x (N, F)."""
    mean, scale, weights = fit
    return np.c_[np.ones(len(x)), (x - mean) / scale] @ weights


@dataclass
class ScoreReadout:
    """A fitted read-out: per score, ``clip(bias + weight · (features − mean) / scale, 0, 1)``; per heatmap, the
    presence probability ``sigmoid(gate_bias + gate_weight · (features − mean) / scale)`` that scales the map.

    ``mean``/``scale`` are (F,), ``weight`` (S, F) and ``bias`` (S,) float64 for the S ``score_names`` and the F
    :func:`feature_names` columns; ``gate_weight`` (M, F) and ``gate_bias`` (M,) are the gates of the M
    ``heatmap_names`` (None: maps are returned as the model makes them); ``info`` records how it was fit (split,
    examples, penalty, fit statistics).
    """

    score_names: tuple[str, ...]
    heatmap_names: tuple[str, ...]
    area_threshold: float
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    gate_weight: np.ndarray | None = None
    gate_bias: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f, s = len(feature_names(self.score_names, self.heatmap_names)), len(self.score_names)
        m = len(self.heatmap_names)
        shapes = (self.mean.shape, self.scale.shape, self.weight.shape, self.bias.shape)
        if shapes != ((f,), (f,), (s, f), (s,)):
            raise ValueError(f"read-out arrays have shapes {shapes}, expected {((f,), (f,), (s, f), (s,))}")
        if (self.gate_weight is None) != (self.gate_bias is None):
            raise ValueError("a read-out has both gate arrays or neither")
        gates = () if self.gate_weight is None else (self.gate_weight, self.gate_bias)
        if gates and (gates[0].shape, gates[1].shape) != ((m, f), (m,)):
            raise ValueError(
                f"gate arrays have shapes {gates[0].shape} and {gates[1].shape}, expected {(m, f)}, {(m,)}"
            )
        if not (all(np.all(np.isfinite(a)) for a in (self.weight, self.bias, *gates)) and np.all(self.scale > 0)):
            raise ValueError("read-out weights must be finite and its feature scales positive")

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        truth: np.ndarray,
        score_names: Sequence[str],
        heatmap_names: Sequence[str],
        config: ReadoutConfig,
        present: np.ndarray | None = None,
    ) -> ScoreReadout:
        """Fit on features (N, F) of :func:`output_features` and true scores (N, S) in ``score_names`` order; with
        ``config.map_gates``, ``present`` (N, M) bool says which labelled maps have heat (``heatmap_names`` order)."""
        f = len(feature_names(score_names, heatmap_names))
        if features.shape[1:] != (f,) or truth.shape != (len(features), len(score_names)):
            raise ValueError(
                f"features must be (N, {f}) and truth (N, {len(score_names)}), got {features.shape} and {truth.shape}"
            )
        if len(features) < f + 2:
            raise ValueError(
                f"a read-out of {f} features needs at least {f + 2} labelled examples, got {len(features)}"
            )
        fits = [fit_ridge(features, truth[:, j], config.lam) for j in range(len(score_names))]
        mean, scale = fits[0][0], fits[0][1]  # the same standardisation for every score
        gates = []
        if config.map_gates:
            if present is None or present.shape != (len(features), len(heatmap_names)):
                got = None if present is None else present.shape
                raise ValueError(f"map gates need present (N, {len(heatmap_names)}) bool, got {got}")
            gates = [
                fit_logistic(features, present[:, k].astype(np.float64), config.lam, mean, scale)
                for k in range(len(heatmap_names))
            ]
        return cls(
            score_names=tuple(score_names),
            heatmap_names=tuple(heatmap_names),
            area_threshold=config.area_threshold,
            mean=mean,
            scale=scale,
            weight=np.stack([w[1:] for _, _, w in fits]),
            bias=np.array([w[0] for _, _, w in fits]),
            gate_weight=np.stack([w[1:] for w in gates]) if gates else None,
            gate_bias=np.array([w[0] for w in gates]) if gates else None,
            info={"split": config.split, "lam": config.lam, "examples": len(features)},
        )

    def apply_numpy(self, features: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N, S) calibrated scores in [0, 1]."""
        return np.clip(self.bias + ((features - self.mean) / self.scale) @ self.weight.T, 0.0, 1.0)

    def gates_numpy(self, features: np.ndarray) -> np.ndarray | None:
        """(N, F) features -> (N, M) presence probabilities in (0, 1), or None without gates."""
        if self.gate_weight is None:
            return None
        return 1.0 / (1.0 + np.exp(-(self.gate_bias + ((features - self.mean) / self.scale) @ self.gate_weight.T)))

    def apply(
        self, scores: Mapping[str, torch.Tensor], heatmaps: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Calibrated scores {name: (B,) float32 in [0, 1]} and maps {name: (B, H, W)} (each scaled by its gate;
        as given without gates) of a batch's raw head scores and heatmaps, all of ``score_names`` and
        ``heatmap_names``. Both come from the raw outputs; differentiable like :func:`output_features`."""
        import torch

        missing = [n for n in self.score_names if n not in scores] + [
            n for n in self.heatmap_names if n not in heatmaps
        ]
        if missing:
            raise ValueError(f"the score read-out needs the outputs {missing}")
        device = next(iter(scores.values())).device
        with torch.autocast(device.type, enabled=False):  # float32 whatever the scorer's autocast
            x = output_features(scores, heatmaps, self.score_names, self.heatmap_names, self.area_threshold)
            t = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in self._arrays().items()}
            z = (x - t["mean"]) / t["scale"]
            y = (t["bias"] + z @ t["weight"].T).clamp(0.0, 1.0)
            maps = dict(heatmaps)
            if "gate_weight" in t:
                p = torch.sigmoid(t["gate_bias"] + z @ t["gate_weight"].T)
                for k, n in enumerate(self.heatmap_names):
                    maps[n] = heatmaps[n] * p[:, k, None, None].to(heatmaps[n].dtype)
        return {n: y[:, j] for j, n in enumerate(self.score_names)}, maps

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}
        if self.gate_weight is not None:
            arrays |= {"gate_weight": self.gate_weight, "gate_bias": self.gate_bias}
        return arrays

    # -- files ------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/score_readout.safetensors`` atomically (float64 tensors; settings as metadata)."""
        tensors = {k: np.ascontiguousarray(v, np.float64) for k, v in self._arrays().items()}
        meta = {
            "score_names": json.dumps(list(self.score_names)),
            "heatmap_names": json.dumps(list(self.heatmap_names)),
            "area_threshold": repr(float(self.area_threshold)),
            "info": json.dumps(self.info, sort_keys=True),
        }
        return atomic_write_bytes(Path(folder) / READOUT_FILE, save(tensors, metadata=meta))

    @classmethod
    def load(cls, folder: str | Path) -> ScoreReadout | None:
        """The read-out saved in ``folder``, or None when it has none; a damaged file is a clear error."""
        path = Path(folder) / READOUT_FILE
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                meta = f.metadata() or {}
            arrays = load_file(str(path))
            return cls(
                score_names=tuple(json.loads(meta["score_names"])),
                heatmap_names=tuple(json.loads(meta["heatmap_names"])),
                area_threshold=float(meta["area_threshold"]),
                info=json.loads(meta.get("info", "{}")),
                **{k: arrays[k] for k in ("mean", "scale", "weight", "bias")},
                gate_weight=arrays.get("gate_weight"),
                gate_bias=arrays.get("gate_bias"),
            )
        except (KeyError, ValueError, OSError, SafetensorError) as err:
            raise ValueError(f"{path}: not a score read-out ({type(err).__name__}: {err})") from err

    def check_model(self, score_names: Sequence[str], heatmap_names: Sequence[str], where: str) -> None:
        """Refuse a read-out fit for other outputs than the model's."""
        if not set(self.score_names) <= set(score_names) or not set(self.heatmap_names) <= set(heatmap_names):
            raise ValueError(
                f"{where}: the score read-out reads scores {list(self.score_names)} and heatmaps "
                f"{list(self.heatmap_names)}, the model has {list(score_names)} and {list(heatmap_names)}"
            )


def fit_score_readout(
    model_dir: str | Path,
    data_dir: str | Path,
    config: ReadoutConfig = ReadoutConfig(),
    *,
    batch_size: int = 32,
    device: str = "cpu",
) -> tuple[ScoreReadout, dict[str, dict[str, float]]]:
    """Score ``data_dir``/``config.split`` with the model's heads (any saved read-out ignored) and fit a read-out.

    Returns the read-out (not yet saved) and, per score, PLCC / SRCC of the head and of the read-out on the fit
    split (``{"head_plcc", "head_srcc", "readout_plcc", "readout_srcc"}``; in-sample, so optimistic). The gates' fit
    (per heatmap ``{"accuracy", "with_heat"}``, the share with heat) is in ``info["gates"]``. Examples
    whose image cannot be read are left out and counted in ``info["skipped"]``.
    """
    import torch

    from common.records import ScoringFailure
    from rahf.data.richhf import read_split
    from rahf.metrics import plcc, srcc
    from rahf.scorer import RAHFScorer

    records, _ = read_split(data_dir, config.split)
    scorer = RAHFScorer.from_pretrained(model_dir, device=device, batch_size=batch_size, score_readout=False)
    cfg = scorer.model.config
    feedback = scorer.score(
        records.prompts, [records.image(i) for i in range(len(records))], keywords=False, errors="return"
    )
    kept = [i for i, fb in enumerate(feedback) if not isinstance(fb, ScoringFailure)]
    if not kept:
        raise ValueError(f"no image of {data_dir}/{config.split} could be scored")
    x = np.stack(
        [
            output_features(
                {n: torch.tensor([feedback[i].scores[n]]) for n in cfg.score_names},
                {n: torch.from_numpy(feedback[i].heatmaps[n])[None] for n in cfg.heatmap_names},
                cfg.score_names,
                cfg.heatmap_names,
                config.area_threshold,
            )[0].numpy()
            for i in kept
        ]
    ).astype(np.float64)
    labels = records.read(kept)
    truth = np.asarray([[r.example.scores[n] for n in cfg.score_names] for r in labels], np.float64)
    present = np.asarray([[float(np.max(r.example.heatmaps[n])) > 0 for n in cfg.heatmap_names] for r in labels])
    readout = ScoreReadout.fit(x, truth, cfg.score_names, cfg.heatmap_names, config, present)
    fitted = readout.apply_numpy(x)
    table = {
        n: {
            "head_plcc": plcc(x[:, j], truth[:, j]),
            "head_srcc": srcc(x[:, j], truth[:, j]),
            "readout_plcc": plcc(fitted[:, j], truth[:, j]),
            "readout_srcc": srcc(fitted[:, j], truth[:, j]),
        }
        for j, n in enumerate(cfg.score_names)
    }
    gates = readout.gates_numpy(x)
    gate_fit = (
        {  # in-sample: the share of images whose gate is on the right side of 0.5, and of those with heat
            n: {
                "accuracy": float(np.mean((gates[:, k] > 0.5) == present[:, k])),
                "with_heat": float(np.mean(present[:, k])),
            }
            for k, n in enumerate(cfg.heatmap_names)
        }
        if gates is not None
        else {}
    )
    readout.info |= {
        "skipped": len(records) - len(kept),
        "fit": table,
        "gates": gate_fit,
        "model_weights": scorer.identity["weights_hash"],
    }
    return readout, table
