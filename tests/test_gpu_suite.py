"""The GPU run-book (benchmarks/gpu_suite.py): its dry run on the CPU writes a full table of finite numbers to
--out and never to BENCHMARKS.md; a failing or late row is recorded and the rest still runs."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import gpu_suite
from benchmarks.score_throughput import MARKER

EXPECTED_SCORE_COLUMNS = 12


def _table(text: str, header_start: str) -> list[list[str]]:
    """Cells of the rows of the markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def _finite(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value), cell
    return value


@pytest.mark.slow
def test_dry_run_writes_the_whole_table_to_out_only(tmp_path):
    before = gpu_suite.BENCHMARKS_MD.read_bytes()
    out = tmp_path / "suite.md"
    # a generous budget: this checks the content, not the speed of a shared test machine
    assert gpu_suite.main(["--dry-run", "--out", str(out), "--budget-s", "900"]) == 0
    assert gpu_suite.BENCHMARKS_MD.read_bytes() == before
    text = out.read_text()
    assert "<!-- bench:gpu-suite -->" in text and "<!-- /bench:gpu-suite -->" in text
    title = next(ln for ln in text.splitlines() if ln.startswith("### GPU suite"))
    assert "(CPU)" in title and "torch 2." in title and "bf16" in title and "dry run" in title

    cfg = gpu_suite.SuiteConfig.dry_run()
    rows = _table(text, "| outputs |")
    assert len(rows) == len(gpu_suite.score_plan(cfg)) == 15
    want = [
        (
            p["outputs"],
            str(p["batch"]),
            p["attention"],
            "on" if p["channels_last"] else "off",
            "on" if p["compile"] else "off",
        )
        for p in gpu_suite.score_plan(cfg)
    ]
    assert [tuple(r[:5]) for r in rows] == want
    for r in rows:
        assert len(r) == EXPECTED_SCORE_COLUMNS and r[-1] == "ok", r
        seconds, ips, first, peak, d_score = (_finite(c) for c in r[5:10])
        assert seconds > 0 and first > 0 and peak > 0
        assert ips == pytest.approx(int(r[1]) / seconds, rel=0.02)
        assert 0 < d_score < 0.05  # bf16 against fp32: a real, small difference
        if r[0] == "scores":
            assert r[10] == "–"  # no heatmap asked for
        else:
            assert 0 <= _finite(r[10]) < 0.05

    gens = _table(text, "| generator |")
    assert [g[0] for g in gens] == ["amused-tiny", "sd-tiny"]
    for g in gens:
        assert g[-1] == "ok" and g[2] == "64" and _finite(g[3]) > 0 and _finite(g[4]) > 0
    loras = _table(text, "| LoRA generator |")
    assert [x[0] for x in loras] == ["amused-tiny", "sd-tiny"]
    for x in loras:
        assert x[-1] == "ok" and x[1] == "2" and _finite(x[2]) > 0 and _finite(x[4]) > 0

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["job_errors"] == {} and len(saved["scores"]) == 15


def test_dry_run_refuses_to_write_benchmarks_md():
    before = gpu_suite.BENCHMARKS_MD.read_bytes()
    assert gpu_suite.main(["--dry-run", "--out", str(gpu_suite.BENCHMARKS_MD)]) == 2
    assert gpu_suite.BENCHMARKS_MD.read_bytes() == before


def _child_rows(capsys) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(ln[len(MARKER) :]) for ln in out.splitlines() if ln.startswith(MARKER)]


def _score_spec(plan: list[dict], budget_s: float) -> dict:
    cfg = gpu_suite.SuiteConfig.dry_run()
    return {
        "job": "score",
        "device": "cpu",
        "threads": 1,
        "model": "rahf-tiny",
        "dtype": "bf16",
        "plan": plan,
        "accuracy_images": 1,
        "repeats": 1,
        "compile_backend": "eager",
        "compile_reserve_s": cfg.compile_reserve_s,
        "max_keyword_tokens": 2,
        "budget_s": budget_s,
    }


def test_a_failing_row_is_recorded_and_the_next_one_runs(capsys):
    plan = [
        {"outputs": "no-such-set", "batch": 1, **gpu_suite.BASE_OPTIONS, "index": 0},
        {"outputs": "scores", "batch": 1, **gpu_suite.BASE_OPTIONS, "index": 1},
    ]
    gpu_suite.score_job(_score_spec(plan, budget_s=300))
    rows = {r["index"]: r for r in _child_rows(capsys) if r.get("kind") == "score"}
    assert rows[0]["status"].startswith("error: KeyError") and "seconds_per_batch" not in rows[0]
    assert rows[1]["status"] == "ok" and rows[1]["seconds_per_batch"] > 0
    assert 0 < rows[1]["max_score_diff_vs_fp32"] < 0.05


def test_rows_past_the_budget_are_skipped_not_run(capsys):
    plan = [{**p, "batch": 1} for p in gpu_suite.score_plan(gpu_suite.SuiteConfig.dry_run())[:2]]
    plan.append({"outputs": "impl", "batch": 1, **gpu_suite.BASE_OPTIONS, "compile": True, "index": 2})
    gpu_suite.score_job(_score_spec(plan, budget_s=-1))  # the budget is spent before the first row
    rows = [r for r in _child_rows(capsys) if r.get("kind") == "score"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["status"].startswith("skipped:") and "seconds_per_batch" not in r for r in rows)


def test_rows_a_killed_child_never_reported_are_listed_as_not_run():
    cfg = gpu_suite.SuiteConfig.dry_run()
    plan = gpu_suite.score_plan(cfg)
    first = {
        **plan[0],
        "kind": "score",
        "status": "ok",
        "seconds_per_batch": 0.5,
        "images_per_s": 2.0,
        "first_call_s": 1.0,
        "peak_gb": 1.5,
        "max_score_diff_vs_fp32": 0.001,
        "max_heatmap_diff_vs_fp32": 0.002,
    }
    facts = {"kind": "facts", "device_name": "Test GPU", "torch": "2.x", "cuda": "12.8"}
    errors = {"score": "killed at its 60 s budget", "tiny": "exit 1: boom"}
    result = gpu_suite.collect(cfg, plan, [facts, first], errors, wall_s=61.0)
    text = gpu_suite.render(result, dry_run=False)
    assert text.startswith("### GPU suite — Test GPU, torch 2.x, bf16\n")
    rows = _table(text, "| outputs |")
    assert len(rows) == len(plan) and rows[0][-1] == "ok" and rows[0][5] == "0.5000"
    assert all(r[-1] == "not run: killed at its 60 s budget" and r[5] == "–" for r in rows[1:])
    assert [g[-1] for g in _table(text, "| generator |")] == ["not run: exit 1: boom"] * 2
    assert [x[-1] for x in _table(text, "| LoRA generator |")] == ["not run: exit 1: boom"] * 2


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_past_its_timeout_is_killed_with_its_helpers_and_its_results_kept(tmp_path):
    import time

    from benchmarks.score_throughput import launch_child_results

    script, pid_file = tmp_path / "child.py", tmp_path / "helper.pid"
    script.write_text(
        "import json, subprocess, sys, time\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        f"print({MARKER!r} + json.dumps({{'n': 1}}), flush=True)\n"
        "time.sleep(120)\n"
    )
    t = time.perf_counter()
    found, error = launch_child_results(str(script), {"threads": 1}, timeout=3)
    assert time.perf_counter() - t < 30
    assert found == [{"n": 1}] and error == "killed at its 3 s budget"
    helper = int(pid_file.read_text())
    deadline = time.perf_counter() + 5
    while _alive(helper) and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert not _alive(helper)  # a helper of the child (a compile worker, say) does not outlive the kill


def test_child_env_keeps_the_callers_python_path_after_the_repository(monkeypatch):
    from benchmarks.score_throughput import ROOT, child_env

    monkeypatch.setenv("PYTHONPATH", "/opt/site-a:/opt/site-b")
    env = child_env(3)
    assert env["PYTHONPATH"].split(":") == [str(ROOT), "/opt/site-a", "/opt/site-b"]
    assert env["OMP_NUM_THREADS"] == "3"
    assert child_env(3, code=ROOT / "other")["PYTHONPATH"].split(":")[:2] == [str(ROOT / "other"), "/opt/site-a"]
    monkeypatch.delenv("PYTHONPATH")
    assert child_env(1)["PYTHONPATH"] == str(ROOT)


def test_a_missing_dependency_is_named_before_any_job_runs(monkeypatch, capsys, tmp_path):
    assert gpu_suite.missing_modules() == []  # the test environment has every module the jobs import
    monkeypatch.setattr(gpu_suite, "REQUIRED_MODULES", (*gpu_suite.REQUIRED_MODULES, "no_such_module_xyz"))
    ran = []
    monkeypatch.setattr(gpu_suite, "run_suite", lambda *a, **k: ran.append(a))
    out = tmp_path / "suite.md"
    assert gpu_suite.main(["--dry-run", "--out", str(out)]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().out
    assert ran == [] and not out.exists()
