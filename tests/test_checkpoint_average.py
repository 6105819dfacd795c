"""benchmarks/checkpoint_average.py: the mean of a run's last checkpoints as one loadable RAHF folder."""

from __future__ import annotations

import pytest
import torch

from benchmarks.checkpoint_average import average_weights, main, run_checkpoints
from rahf.model import RAHFModel
from rahf.presets import build_rahf
from rahf.scorer import RAHFScorer


def _run_with_checkpoints(root, steps_and_seeds):
    for step, seed in steps_and_seeds:
        model, processor = build_rahf("rahf-tiny", seed=seed)
        folder = root / "checkpoints" / f"step-{step}"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return root


def test_the_last_checkpoints_by_step_are_averaged_into_a_loadable_folder(tmp_path):
    run = _run_with_checkpoints(tmp_path / "run", [(5, 1), (20, 3), (10, 2)])
    assert [p.name for p in run_checkpoints(run)] == ["step-5", "step-10", "step-20"]  # by number, not by name
    out = tmp_path / "avg"
    assert main(["--run", str(run), "--last", "2", "--out", str(out)]) == 0
    averaged = RAHFModel.from_pretrained(out).state_dict()
    a = RAHFModel.from_pretrained(run / "checkpoints" / "step-10").state_dict()
    b = RAHFModel.from_pretrained(run / "checkpoints" / "step-20").state_dict()
    floating = [k for k, v in averaged.items() if v.is_floating_point() and not torch.equal(a[k], b[k])]
    assert floating  # the seeds differ, so the average is a new model
    for k in floating:
        torch.testing.assert_close(averaged[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7)
    scorer = RAHFScorer.from_pretrained(out)  # the processor came along: the folder is a complete RAHF model
    assert scorer.identity["weights_hash"] is not None


def test_mismatched_states_and_empty_runs_are_refused(tmp_path, capsys):
    x = {"w": torch.ones(2), "n": torch.tensor([3])}
    with pytest.raises(ValueError, match="other keys"):
        average_weights([x, {"w": torch.ones(2)}])
    with pytest.raises(ValueError, match="shapes differ"):
        average_weights([x, {"w": torch.ones(3), "n": torch.tensor([3])}])
    with pytest.raises(ValueError, match="non-floating tensor differs"):
        average_weights([x, {"w": torch.ones(2), "n": torch.tensor([4])}])
    with pytest.raises(ValueError, match="no state dicts"):
        average_weights([])
    assert torch.equal(average_weights([x, {"w": torch.zeros(2), "n": torch.tensor([3])}])["w"], torch.full((2,), 0.5))
    assert main(["--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no step-N checkpoints" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_named_and_nothing_is_written(tmp_path, capsys):
    run = _run_with_checkpoints(tmp_path / "run", [(1, 1), (2, 2)])
    (run / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "avg"
    assert main(["--run", str(run), "--last", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "step-1 cannot be read" in err
    assert not out.exists()  # nothing half-written
    # the last checkpoint alone still averages (to itself): the good one is not lost
    assert main(["--run", str(run), "--last", "1", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
