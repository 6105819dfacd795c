"""Average the weights of a run's last checkpoints into one RAHF folder (a weight-averaging diagnostic).

The last ``--last`` checkpoints of a training run (``RUN/checkpoints/step-N``, by step) are loaded, their floating
weights averaged element by element (in float64, stored in the weights' own dtype), and the result is written with
the last checkpoint's config and processor as a RAHF folder that ``richfeedback eval`` and the other benchmarks
load like any other. Late in a cosine schedule the checkpoints lie near one another, so their mean is a smoother
model of the same run; whether it is a better one is what ``eval`` on the result says (docs/results.md, round 18).

Usage: python benchmarks/checkpoint_average.py --run RUN --last 2 --out AVERAGED_FOLDER
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError

from rahf.model import RAHFModel
from rahf.processor import RAHFProcessor

_STEP = re.compile(r"step-(\d+)$")


def run_checkpoints(run: str | Path) -> list[Path]:
    """The checkpoint folders of a run, ordered by step (``RUN/checkpoints/step-N``)."""
    folder = Path(run) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if p.is_dir() and (m := _STEP.search(p.name))]
    if not found:
        raise FileNotFoundError(f"no step-N checkpoints under {folder}")
    return [p for _, p in sorted(found)]


def average_weights(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several state dicts with the same keys and shapes.

    Floating tensors are averaged in float64 and cast back to their dtype; other tensors (counters, indices) are
    taken from the last state, where they must equal every other state's."""
    if not states:
        raise ValueError("no state dicts to average")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"state dict {i} has other keys than state dict 0: {sorted(keys ^ set(s))[:8]}")
    out: dict[str, torch.Tensor] = {}
    for k, last in states[-1].items():
        if any(s[k].shape != last.shape for s in states):
            raise ValueError(f"{k}: shapes differ between the state dicts")
        if last.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / len(states)).to(last.dtype)
        else:
            if any(not torch.equal(s[k], last) for s in states):
                raise ValueError(f"{k}: a non-floating tensor differs between the state dicts")
            out[k] = last.clone()
    return out


def average_run(run: str | Path, last: int, out: str | Path) -> list[Path]:
    """Write the average of the run's last ``last`` checkpoints to ``out`` (a RAHF folder); returns the folders
    averaged, oldest first."""
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}")
    folders = run_checkpoints(run)[-last:]
    models = []
    for f in folders:  # nothing is written unless every checkpoint loads
        try:
            models.append(RAHFModel.from_pretrained(f))
        except (OSError, SafetensorError) as err:
            raise ValueError(f"checkpoint {f} cannot be read: {err}") from err
    averaged = models[-1]
    averaged.load_state_dict(average_weights([m.state_dict() for m in models]))
    averaged.save_pretrained(out)
    RAHFProcessor.from_pretrained(folders[-1]).save_pretrained(out)
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a training run folder (with checkpoints/step-N)")
    parser.add_argument("--last", type=int, default=2, help="how many of the last checkpoints to average (default: 2)")
    parser.add_argument("--out", required=True, help="folder for the averaged RAHF model")
    args = parser.parse_args(argv)
    try:
        folders = average_run(args.run, args.last, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"averaged {', '.join(f.name for f in folders)} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
