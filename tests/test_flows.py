"""The feedback loop's stages and Prefect flows, offline: resume after a real process kill (nothing finished is
regenerated or rescored, no duplicate record), the whole loop on a local path and on S3 (with an outage), the Dask
task runner giving the same manifest, and the deployments in prefect.yaml accepted by `prefect deploy`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.names import SCORE_NAMES
from flows import stages
from flows.config import LoopConfig
from flows.storage import RunStore
from tests.s3_server import s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "two red circles at the left and a blue square at the bottom",
    "three green triangles at the top",
    "a yellow diamond in the middle",
]
TINY = {"generator": "synthetic", "rahf": "rahf-tiny"}


def tiny(**kw) -> LoopConfig:
    return LoopConfig(**TINY, **kw)


def manifest_lines(root: str) -> list[dict]:
    store = RunStore(root)
    return [json.loads(line) for line in store.read_bytes("manifest.jsonl").decode().splitlines()]


# -- resume ----------------------------------------------------------------------------------------------------


def test_killed_run_resumes_without_redoing_or_duplicating(tmp_path):
    root = str(tmp_path / "run")
    prompts = [f"{n} {c} circles at the left" for n in ("two", "three") for c in ("red", "blue", "green")]
    script = (
        "from flows.config import LoopConfig\nfrom flows.stages import generate_and_score\n"
        f"generate_and_score({root!r}, {prompts!r}, LoopConfig(generator='synthetic', rahf='rahf-tiny', "
        "per_prompt=8, batch_size=4))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.DEVNULL)
    records = Path(root) / "records"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(records.glob("*.json"))) < 8:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill, mid-run
    proc.wait()
    finished = {p.stem for p in records.glob("*.json")}
    images_before = {p.stem for p in (Path(root) / "images").glob("*.png")}
    assert 8 <= len(finished) < 48, "the kill must land mid-run"
    report = stages.generate_and_score(root, prompts, tiny(per_prompt=8, batch_size=4))
    redone_generation = set(report.generated) & (finished | images_before)
    redone_scoring = set(report.scored) & finished
    assert (len(redone_generation), len(redone_scoring)) == (0, 0)
    assert report.skipped == len(finished) and len(set(report.ids)) == 48
    assert set(report.scored) | finished == set(report.ids)
    stages.write_manifest(root)
    ids = [r["id"] for r in manifest_lines(root)]
    assert sorted(ids) == sorted(set(report.ids)) and len(ids) == len(set(ids)) == 48
    again = stages.generate_and_score(root, prompts, tiny(per_prompt=8, batch_size=4))
    assert again.generated == () and again.scored == () and again.skipped == 48


def test_a_rerun_clears_the_claims_a_killed_run_left_on_finished_images(tmp_path):
    # killed after writing a record and before releasing its claim: the rerun skips that image, and still must not
    # leave its claim behind; a live process's claim stays
    from flows.claims import Claims, claim_key

    root = str(tmp_path / "run")
    first = stages.generate_and_score(root, [PROMPTS[2]], tiny(per_prompt=2))
    store = RunStore(root)
    assert len(first.scored) == 2 and store.list("claims") == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = Claims(store).host
    for id, pid in zip(first.scored, (dead.pid, os.getppid()), strict=True):
        body = {"host": host, "pid": pid, "token": "killed-run", "time": time.time()}
        store.write_bytes(claim_key(id), json.dumps(body).encode())
    again = stages.generate_and_score(root, [PROMPTS[2]], tiny(per_prompt=2))
    assert again.skipped == 2 and again.generated == ()
    assert store.list("claims") == [claim_key(first.scored[1])]


def test_a_failing_item_becomes_an_error_record_and_the_batch_goes_on(tmp_path):
    root = str(tmp_path / "run")
    report = stages.generate_and_score(root, [PROMPTS[2], "a photo of a cat"], tiny(per_prompt=2))
    # the synthetic world cannot draw a prompt outside its grammar: that prompt's images fail, the rest finish
    assert len(report.scored) == 2 and len(report.failed) == 2
    store = RunStore(root)
    errors = [store.read_json(k) for k in store.list("errors")]
    assert len(errors) == 2 and all("generation" in e["error"] for e in errors)
    assert stages.write_manifest(root).errors == 2


# -- the flows -------------------------------------------------------------------------------------------------


def _loop(root: str):
    from flows.loop import feedback_loop

    config = {
        **TINY,
        "per_prompt": 4,
        "selection": {"thresholds": {"plausibility": 0.0}},
        "compare": {"per_prompt": 2},
        "repair_limit": 2,
    }
    return feedback_loop(root=root, prompts=PROMPTS, config=config)


def test_feedback_loop_runs_and_reruns_from_its_records(prefect_harness, tmp_path, monkeypatch):
    import flows.loop

    monkeypatch.setattr(flows.loop, "PROGRESS_EVERY_S", 0.0)  # every stage makes its progress artifact
    root = str(tmp_path / "loop")
    summary = _loop(root)
    assert len(summary.generate.generated) == 12 and len(summary.selection.selected) == 3
    assert (Path(root) / "finetune" / "adapter" / "flaws.json").is_file()
    assert summary.compare.pairs == 6 and set(summary.compare.scores) == set(SCORE_NAMES)
    assert summary.compare.ground_truth["implausible_area"]["mean_a"] >= 0
    assert (Path(summary.compare.report)).is_file()
    assert summary.repair.considered == 2 and len(list((Path(root) / "repairs").glob("*.json"))) == 2
    assert {p.stem for p in (Path(root) / "repairs").glob("*.json")} <= set(summary.generate.ids)  # this run's
    assert summary.repair.truth is not None  # the synthetic world's ground truth, before and after
    truth = summary.selection.truth  # this round's selection in truth, the last section of the summary
    assert truth is not None and (truth.prompts, truth.images) == (3, 3)
    assert summary.to_markdown().endswith(truth.to_markdown())
    assert summary.compare.ground_truth["overall"]["ci_low"] <= summary.compare.ground_truth["overall"]["diff"]
    lines = manifest_lines(root)
    assert len(lines) == len({r["id"] for r in lines}) == 12 + len(summary.repair.accepted)
    assert json.loads((Path(root) / "loop.json").read_text()) == json.loads(json.dumps(summary.to_dict()))
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = {"best-per-prompt", "feedback-loop", "comparison", "selection"}
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(keys))))
        assert {"best-per-prompt", "feedback-loop"} <= {a.key for a in found}
        loop_md = [a.data for a in found if a.key == "feedback-loop"]
        assert any(md.endswith(truth.to_markdown()) for md in loop_md)  # the Prefect artifact: the same summary
        progress = [a for a in client.read_artifacts() if a.type == "progress"]
        assert progress and all(a.data == 100.0 for a in progress)  # complete when its task ended
        task_runs = {t.id for t in client.read_task_runs()}
        assert all(a.task_run_id in task_runs for a in progress)  # made in the task run's context, not a thread's
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterTags

        gpu = TaskRunFilter(tags=TaskRunFilterTags(all_=["gpu"]))
        assert client.read_task_runs(task_run_filter=gpu) == []  # no gpu limit: no task asks for a slot
    again = _loop(root)
    assert len(again.generate.generated) == 0 and again.generate.skipped == 12
    assert again.finetune.reused and again.repair.skipped == 2 - len(again.repair.no_mask)


def test_gpu_tag_only_where_a_gpu_limit_exists(prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.loop import GPU_TAG, gpu_tagged, on_gpu, repair_task

    assert on_gpu(repair_task, False) is repair_task and GPU_TAG not in repair_task.tags
    assert on_gpu(repair_task, True).tags == {GPU_TAG}
    with get_client(sync_client=True) as client:
        try:
            assert gpu_tagged() is False  # no limit, none asked for
            assert gpu_tagged(2) is True  # created with 2 slots
            assert client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit == 2
            assert gpu_tagged() is True and gpu_tagged(5) is True  # an existing limit is kept as it is
            assert client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit == 2
        finally:
            client.delete_concurrency_limit_by_tag(GPU_TAG)


def test_loop_on_s3_matches_the_local_run_and_survives_an_outage(prefect_harness, tmp_path, s3_server):  # noqa: F811
    local = str(tmp_path / "local")
    _loop(local)
    stopped = threading.Event()

    def outage() -> None:  # the endpoint goes away for 2 s while the loop writes
        time.sleep(1.5)
        s3_server.stop()
        stopped.set()
        time.sleep(2.0)
        s3_server.start()

    t = threading.Thread(target=outage)
    t.start()
    summary = _loop(s3_server.root)
    t.join()
    assert stopped.is_set()
    remote, here = manifest_lines(s3_server.root), manifest_lines(local)
    assert [r["id"] for r in remote] == [r["id"] for r in here]
    assert [r["scores"] for r in remote] == [r["scores"] for r in here]
    assert summary.finetune.adapter.startswith("s3://")
    assert RunStore(s3_server.root).exists("finetune/adapter/flaws.json")


@pytest.mark.slow
def test_dask_worker_processes_give_the_same_manifest(prefect_harness, tmp_path, monkeypatch):
    pytest.importorskip("prefect_dask")
    from prefect_dask import DaskTaskRunner

    from flows.loop import generate_and_score
    from flows.storage import WRITE_LOG_ENV

    default = str(tmp_path / "default")
    dask = str(tmp_path / "dask")
    log = tmp_path / "writes.log"
    monkeypatch.setenv(WRITE_LOG_ENV, str(log))  # inherited by the Dask worker processes
    options = dict(prompts=PROMPTS, config={**TINY, "per_prompt": 2, "chunk_prompts": 1})
    generate_and_score(root=default, **options)
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    merged = generate_and_score.with_options(task_runner=runner)(root=dask, **options)
    writers = {line.split("\t")[1] for line in log.read_text().splitlines() if f"{dask}/records/" in line}
    assert len(writers) == 2 and str(os.getpid()) not in writers  # the chunks ran in two worker processes
    assert len(merged.ids) == len(set(merged.ids)) == 6 and sorted(merged.scored) == sorted(merged.ids)
    skip = ("image_uri", "heatmap_uris", "scores")  # scores: equal to float precision (torch thread counts differ)
    strip = [{k: v for k, v in r.items() if k not in skip} for r in manifest_lines(default)]
    other = [{k: v for k, v in r.items() if k not in skip} for r in manifest_lines(dask)]
    assert strip == other and len(strip) == 6
    for a, b in zip(manifest_lines(default), manifest_lines(dask)):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)


def test_prefect_yaml_deploys_against_the_temporary_server(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(prefect_harness)}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run(
        [*prefect, "work-pool", "create", "gpu-pool", "--type", "process"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        assert {"feedback-loop", "select-finetune-data-daily", "repair-images", "compare-checkpoints"} <= names
        daily = client.read_deployment_by_name("select-finetune-data/select-finetune-data-daily")
        assert daily.schedules and daily.schedules[0].schedule.cron == "0 3 * * *"
