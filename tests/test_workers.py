"""Deployments run by real Prefect workers: a `prefect server start` subprocess, the process work pool, the
generate-and-score deployment from prefect.yaml, two `prefect worker` processes in folders of their own. Two runs
over overlapping prompts share one root (a local folder, then the moto S3 server): every image id once in the
manifest, every image and record written once (the store's write log; object versions on S3), the runs Completed.
One GPU slot keeps the gpu-tagged tasks of two concurrent runs from overlapping. A worker SIGKILLed mid-run: the
re-triggered run completes on the other worker without redoing a finished image. And the deployments travel: module
entry points, no pull step tied to the deployer's folder, models by name or URI."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flows.storage import WRITE_LOG_ENV, RunStore
from tests.workers import REPO, running_cluster, wait_for_runs

DEPLOYMENT = "generate-and-score/generate-and-score"
TINY = {"generator": "synthetic", "rahf": "rahf-tiny", "per_prompt": 2, "batch_size": 2, "chunk_prompts": 1}
SHAPES = ["circles", "squares", "triangles", "diamonds"]
COLOURS = ["red", "blue", "green", "yellow"]


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"two {COLOURS[(k + offset) % 4]} {SHAPES[(k + offset) // 4 % 4]} at the top" for k in range(n)]


def expected_ids(ps: list[str], per_prompt: int) -> set[str]:
    from flows.stages import jobs_of, load_generator

    gen = load_generator("synthetic")
    return {gen.expected_id(p, s) for p, s in jobs_of(ps, per_prompt)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.s3_server import running_s3

    base = tmp_path_factory.mktemp("workers")
    with pytest.MonkeyPatch.context() as mp, running_s3(mp) as s3:
        import boto3

        bucket = s3.root.removeprefix("s3://").split("/")[0]
        boto3.client("s3").put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        extra = {WRITE_LOG_ENV: str(base / "writes.log")}
        with running_cluster(base, workers=2, extra_env=extra, deploy=("generate-and-score",)) as c:
            c.s3 = s3
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: c.api_url}):
                yield c


def writes_under(cluster, root: str) -> Counter:
    """How often each key under ``root`` was written, from the write log of every process."""
    prefix = RunStore(root).uri("x")[:-1]
    lines = cluster.write_log.read_text().splitlines() if cluster.write_log.exists() else []
    return Counter(line.split("\t")[0].removeprefix(prefix) for line in lines if line.startswith(prefix))


def trigger(client, parameters: dict) -> object:
    deployment = client.read_deployment_by_name(DEPLOYMENT)
    return client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id


def manifest_ids(root: str) -> list[str]:
    return [r.id for r in RunStore(root).read_manifest()]


# -- the deployments travel -------------------------------------------------------------------------------------


def _local_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or (REPO / value).exists() or Path(value).exists()


def test_deployments_name_no_path_of_the_deploying_machine():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert doc["pull"] == []  # no step that ties a run to the deployer's folder
    for dep in doc["deployments"]:
        module, _, name = dep["entrypoint"].partition(":")
        assert module == "flows.loop" and name, dep["name"]  # importable wherever the package is installed
        params = dep["parameters"]
        for key in ("root", "dataset"):
            if key in params:
                assert params[key].startswith("s3://"), (dep["name"], key)
        for key in ("generator", "rahf"):
            value = params["config"].get(key)
            assert value is None or value.startswith("s3://") or not _local_path(value), (dep["name"], key, value)


# -- two workers, one root -------------------------------------------------------------------------------------


def _two_runs_share_one_root(cluster, root: str) -> None:
    from prefect.client.orchestration import get_client

    a, b = prompts(3), prompts(3, offset=1)  # two of three prompts shared
    with get_client(sync_client=True) as client:
        runs = [trigger(client, {"root": root, "prompts": p, "config": TINY}) for p in (a, b)]
        done = wait_for_runs(client, runs)
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert [r.state.type.value for r in done] == ["COMPLETED", "COMPLETED"], [r.state for r in done]
    assert deployment.pull_steps == [] and deployment.entrypoint == "flows.loop:generate_and_score"
    want = expected_ids(sorted(set(a) | set(b)), 2)
    ids = manifest_ids(root)
    assert sorted(ids) == sorted(want) and len(want) == 8  # every id exactly once, none lost
    writes = writes_under(cluster, root)
    for kind in ("images/", "records/"):
        counts = {k: n for k, n in writes.items() if k.startswith(kind)}
        assert len(counts) == 8 and set(counts.values()) == {1}, (kind, counts)  # no work done twice
    assert RunStore(root).list("claims") == []


@pytest.mark.slow
def test_two_workers_share_a_local_root(cluster, tmp_path):
    _two_runs_share_one_root(cluster, str(tmp_path / "run"))


@pytest.mark.slow
def test_two_workers_share_an_s3_prefix(cluster):
    import boto3

    root = cluster.s3.root + "-shared"
    _two_runs_share_one_root(cluster, root)
    bucket, prefix = root.removeprefix("s3://").split("/", 1)
    versions = boto3.client("s3").list_object_versions(Bucket=bucket, Prefix=f"{prefix}/records/")["Versions"]
    per_key = Counter(v["Key"] for v in versions)
    assert len(per_key) == 8 and set(per_key.values()) == {1}  # one object version per record


# -- one GPU slot ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_gpu_slot_keeps_tagged_tasks_of_two_workers_apart(cluster, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    root = str(tmp_path / "run")
    config = {**TINY, "gpu_slots": 1}
    with get_client(sync_client=True) as client:
        runs = [trigger(client, {"root": root, "prompts": prompts(2, offset=k * 2), "config": config}) for k in (0, 1)]
        done = wait_for_runs(client, runs)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)))
    assert [r.state.type.value for r in done] == ["COMPLETED", "COMPLETED"]
    (a0, a1), (b0, b1) = [(r.start_time, r.end_time) for r in done]
    assert a0 < b1 and b0 < a1  # the two flow runs ran at the same time, on the two workers
    tagged = sorted((t.start_time, t.end_time) for t in tasks if "gpu" in t.tags)
    assert len(tagged) == 4  # one task per prompt chunk
    for (_, end), (start, _) in itertools.pairwise(tagged):
        assert start >= end, tagged  # never two at a time


# -- a worker dies mid-run -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_s_run_is_retriggered_and_redoes_nothing(cluster, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    root = str(tmp_path / "run")
    ps = prompts(6)
    params = {"root": root, "prompts": ps, "config": {**TINY, "chunk_prompts": 6}}
    records = Path(root) / "records"
    with get_client(sync_client=True) as client:
        first = trigger(client, params)
        deadline = time.time() + 180
        while time.time() < deadline and len(list(records.glob("*.json"))) < 2:
            time.sleep(0.1)
        writer = next(
            int(line.split("\t")[1])
            for line in reversed(cluster.write_log.read_text().splitlines())
            if line.startswith(root)
        )
        worker = next(w for w in cluster.workers if w.poll() is None and _ancestor(w.pid, writer))
        cluster.kill_worker(worker)  # the worker and its flow run, like a lost machine
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer, 9)
        finished = {p.stem for p in records.glob("*.json")}
        assert 2 <= len(finished) < 12, "the kill must land mid-run"
        assert client.read_flow_run(first).state.type.value == "RUNNING"  # nobody left to say otherwise
        client.set_flow_run_state(first, Crashed(message="worker lost"), force=True)  # what an operator does
        second = trigger(client, params)  # picked up by the surviving worker
        (done,) = wait_for_runs(client, [second])
    assert done.state.type.value == "COMPLETED"
    assert sorted(manifest_ids(root)) == sorted(expected_ids(ps, 2))
    writes = writes_under(cluster, root)
    for kind in ("images/", "records/"):
        counts = {k: n for k, n in writes.items() if k.startswith(kind)}
        assert len(counts) == 12 and set(counts.values()) == {1}, (kind, counts)  # nothing finished was redone
    assert RunStore(root).list("claims") == []  # the dead run's claims were taken over and released


def _ancestor(pid: int, child: int) -> bool:
    """Whether ``pid`` is ``child`` or one of its ancestors (from /proc)."""
    while child > 1:
        if child == pid:
            return True
        try:
            child = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False
