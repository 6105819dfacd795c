"""Write-once keys and id-keyed claims: of concurrent creators exactly one wins (locally and on S3), abandoned
claims are taken over (a dead process on this host at once, another host's after the TTL), and two processes
running generate-and-score over overlapping prompts on one root write every image and record exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.claims import Claims, claim_key
from flows.storage import WRITE_LOG_ENV, RunStore
from tests.s3_server import s3_root  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _race(store: RunStore, key: str, n: int = 8) -> list[bool]:
    results: list[bool] = [False] * n
    go = threading.Barrier(n)

    def one(k: int) -> None:
        go.wait()
        results[k] = store.create_once(key, f"writer {k}".encode())

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_create_once_has_exactly_one_winner_locally(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    results = _race(store, "claims/a.json")
    assert sum(results) == 1
    assert store.read_bytes("claims/a.json") == f"writer {results.index(True)}".encode()
    assert store.list("claims") == ["claims/a.json"]  # no temporary file left behind


def test_create_once_has_exactly_one_winner_on_s3(s3_root):  # noqa: F811
    store = RunStore(s3_root)
    results = _race(store, "claims/a.json", n=4)
    assert sum(results) == 1
    assert store.read_bytes("claims/a.json") == f"writer {results.index(True)}".encode()
    assert store.create_once("claims/a.json", b"late") is False


def _foreign_claim(store: RunStore, id: str, host: str, pid: int, age_s: float) -> None:
    body = {"host": host, "pid": pid, "token": "someone-else", "time": time.time() - age_s}
    store.write_bytes(claim_key(id), json.dumps(body).encode())


def test_claims_skip_live_owners_and_take_over_abandoned_ones(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    claims = Claims(store, ttl_s=30)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_claim(store, "live-here", claims.host, os.getppid(), age_s=1)  # a live process on this host
    _foreign_claim(store, "dead-here", claims.host, dead.pid, age_s=1)  # its process is gone
    _foreign_claim(store, "other-host-fresh", "elsewhere", 1, age_s=1)
    _foreign_claim(store, "other-host-old", "elsewhere", 1, age_s=31)
    mine, busy = claims.acquire(["new", "live-here", "dead-here", "other-host-fresh", "other-host-old"])
    assert mine == ["new", "dead-here", "other-host-old"]
    assert busy == ["live-here", "other-host-fresh"]
    assert claims.taken_over == ["dead-here", "other-host-old"]
    assert Claims(store, ttl_s=30).acquire(["new"]) == ([], ["new"])  # another claimant in this process waits
    claims.release(mine + busy)  # only its own claims go
    assert store.list("claims") == [claim_key("live-here"), claim_key("other-host-fresh")]


def test_abandoned_claims_of_finished_images_are_cleared_and_live_ones_kept(tmp_path):
    # a process killed between writing a record and releasing its claim: no later run redoes that image, so
    # nothing would ever take the claim over
    store = RunStore(str(tmp_path / "run"))
    claims = Claims(store, ttl_s=30)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_claim(store, "done-dead", claims.host, dead.pid, age_s=1)
    _foreign_claim(store, "done-live", claims.host, os.getppid(), age_s=1)  # still at work: left alone
    _foreign_claim(store, "todo-dead", claims.host, dead.pid, age_s=1)  # not finished: acquire takes it over
    assert claims.acquire(["done-mine"]) == (["done-mine"], [])  # its own claim, of a finished image: kept
    store.write_bytes("claims/notes.txt", b"not a claim")  # other keys under claims/ are ignored
    assert claims.clear_finished(["done-dead", "done-live", "done-mine", "absent"]) == ["done-dead"]
    assert sorted(store.list("claims")) == sorted(
        [claim_key(i) for i in ("done-live", "todo-dead", "done-mine")] + ["claims/notes.txt"]
    )


@pytest.mark.slow
def test_two_processes_on_overlapping_prompts_do_no_work_twice(tmp_path):
    root = str(tmp_path / "run")
    log = tmp_path / "writes.log"
    a = ["three green triangles at the top", "a yellow diamond in the middle", "two red circles at the left"]
    b = [a[1], a[2], "a blue square at the bottom"]  # two of three prompts shared
    script = (
        "import sys, json\nfrom flows.config import LoopConfig\nfrom flows.stages import generate_and_score\n"
        "r = generate_and_score(sys.argv[1], json.loads(sys.argv[2]), LoopConfig(generator='synthetic', "
        "rahf='rahf-tiny', per_prompt=4, batch_size=2))\n"
        "print(json.dumps({'generated': r.generated, 'scored': r.scored, 'missing': r.missing, 'ids': r.ids}))\n"
    )
    env = {**os.environ, WRITE_LOG_ENV: str(log), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    RunStore(root).write_json("run.json", {"generator": "synthetic", "rahf": "rahf-tiny"})  # no claim race on it
    procs = [
        subprocess.Popen([sys.executable, "-c", script, root, json.dumps(p)], cwd=REPO, env=env, stdout=subprocess.PIPE)
        for p in (a, b)
    ]
    outs = [json.loads(p.communicate(timeout=240)[0].decode().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    everything = set(outs[0]["ids"]) | set(outs[1]["ids"])
    assert len(everything) == 16 and outs[0]["missing"] == outs[1]["missing"] == []
    generated = outs[0]["generated"] + outs[1]["generated"]
    assert sorted(generated) == sorted(everything)  # each image generated by exactly one process
    writes = Counter(line.split("\t")[0] for line in log.read_text().splitlines())
    for kind in ("images/", "records/"):
        written = {uri: n for uri, n in writes.items() if f"/{kind}" in uri}
        assert len(written) == 16 and set(written.values()) == {1}, kind
    pids = {line.split("\t")[1] for line in log.read_text().splitlines() if "/records/" in line}
    assert len(pids) == 2  # both processes did part of the work
    assert RunStore(root).list("claims") == []  # every claim released
