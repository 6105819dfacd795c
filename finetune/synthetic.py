"""The synthetic world's finetuning stage: a maximum-likelihood fit of its flaw rates, not a LoRA.

The data is the folder :func:`finetune.dataset.export_dataset` writes; every image carries its ground truth (the
synthetic generator's PNG text chunk ``scene``). The fit (:meth:`generators.synthetic.SyntheticGenerator.fit`)
counts each flaw's successes / trials over the images, smoothed toward the current rates by ``prior_strength``
pseudo-trials, and saves the fitted world as an adapter folder (``<out_dir>/adapter/flaws.json``) that
``SyntheticGenerator.from_pretrained`` loads. The resolved config is written to ``<out_dir>/fit_config.json``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config_fields import NonNegative, check_fields
from training.harness import write_config

ADAPTER_DIR = "adapter"  # the same folder name as a LoRA run's adapter (finetune.lora.ADAPTER_DIR)
CONFIG_FILE = "fit_config.json"


@dataclass
class SyntheticFitConfig:
    """The synthetic world's fit: where the selected images are, where the adapter goes, and the prior."""

    data_dir: str  # image folder with metadata.jsonl (local path or fsspec URL)
    out_dir: str  # fit_config.json and adapter/ (flaws.json)
    prior_strength: NonNegative = 2.0  # pseudo-trials pulling each fitted rate toward the current one

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_options(cls, data_dir: str, out_dir: str, options: dict[str, Any]) -> SyntheticFitConfig:
        """The fit's config from a loop's finetuning options (``LoraTrainConfig`` fields): ``prior_strength`` is
        taken; the LoRA-only fields (steps, lr, rank, ...) do not apply to this world and are left out; any other
        key raises ``ValueError``."""
        from finetune.lora import LoraTrainConfig

        lora_fields = {f.name for f in dataclasses.fields(LoraTrainConfig)}
        unknown = sorted(set(options) - lora_fields)
        if unknown:
            raise ValueError(f"unknown finetuning options {unknown}")
        own = {f.name for f in dataclasses.fields(cls)} - {"data_dir", "out_dir"}
        return cls(data_dir, out_dir, **{k: v for k, v in options.items() if k in own})


def fit_synthetic(cfg: SyntheticFitConfig) -> dict[str, Any]:
    """Fit the default synthetic world's flaw rates to the ground truth of the images in ``cfg.data_dir``.

    Returns a summary: examples, seconds, the adapter folder and the fitted flaw rates (``FlawModel.to_dict``).
    Raises ``ValueError`` for an empty folder or an image the synthetic world did not make.
    """
    from finetune.lora import load_folder
    from generators.synthetic import SyntheticGenerator, ground_truth

    started = time.perf_counter()
    out = Path(cfg.out_dir)
    write_config(out / CONFIG_FILE, cfg)
    images, _ = load_folder(cfg.data_dir)
    fitted = SyntheticGenerator().fit([ground_truth(im) for im in images], prior_strength=cfg.prior_strength)
    fitted.save_adapter(out / ADAPTER_DIR)
    return {
        "examples": len(images),
        "seconds": time.perf_counter() - started,
        "adapter": str(out / ADAPTER_DIR),
        "flaws": fitted.flaws.to_dict(),
    }
