"""A real Prefect deployment for tests and benchmarks: ``prefect server start`` on a free port (its own
PREFECT_HOME), the ``gpu-pool`` process work pool, deployments from ``prefect.yaml``, and ``prefect worker``
processes started in folders of their own (nothing of the repository's working directory), each in its own
process group so a test can SIGKILL one like a lost machine. A plain module, not a conftest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POOL = "gpu-pool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A running Prefect server with workers; ``env`` is what every process of it runs with."""

    base: Path
    api_url: str
    env: dict[str, str]
    server: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    write_log: Path | None = None

    def prefect(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """``python -m prefect <args>`` against this server; raises with its output on failure."""
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=cwd or self.base,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def start_worker(self, name: str, limit: int = 1) -> subprocess.Popen:
        """``prefect worker start`` in an empty folder of its own; at most ``limit`` flow runs at a time."""
        folder = self.base / name
        folder.mkdir(exist_ok=True)
        out = open(folder / "worker.log", "ab")  # noqa: SIM115 -- lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name, "--limit", str(limit)],
            cwd=folder,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL a worker's whole process group (the worker and the flow runs it started), like a lost machine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in [*self.workers, self.server]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, self.server]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_cluster(
    base: Path, workers: int = 2, extra_env: dict[str, str] | None = None, deploy: tuple[str, ...] = ()
) -> Iterator[Cluster]:
    """A Prefect server on a free port with ``workers`` process workers and the ``deploy`` deployments of
    prefect.yaml (by name) registered; everything is stopped at exit."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PYTHONPATH": str(REPO),  # the package is importable on the workers, as after `pip install .`
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    log = open(base / "server.log", "ab")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=base,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster = Cluster(
        base,
        api,
        env,
        server,
        write_log=Path(env["RICHFEEDBACK_WRITE_LOG"]) if "RICHFEEDBACK_WRITE_LOG" in env else None,
    )
    try:
        deadline = time.time() + 180
        while not _healthy(api):
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prefect server did not start: {(base / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        cluster.prefect("work-pool", "create", POOL, "--type", "process")
        for name in deploy:
            cluster.prefect("--no-prompt", "deploy", "--name", name, cwd=REPO)
        for k in range(workers):
            cluster.start_worker(f"worker-{k}")
        yield cluster
    finally:
        cluster.stop()


def wait_for_runs(client: Any, run_ids: list[Any], timeout: float = 240) -> list[Any]:
    """The flow runs once all are in a final state (or at the timeout: as they are then)."""
    deadline = time.time() + timeout
    while True:
        runs = [client.read_flow_run(i) for i in run_ids]
        if all(r.state is not None and r.state.is_final() for r in runs) or time.time() > deadline:
            return runs
        time.sleep(1.0)
