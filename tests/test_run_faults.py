"""Faults of a run and how the store and the loop answer them: a truncated record is redone (finished means a valid
record, not an existing file), corrupt side files are named and skipped, a loop where nothing clears the selection
still repairs and writes its manifest, a killed CLI leaves no Prefect server behind and its temporary files are
swept by the next run, and tasks retry transient errors only."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import stages
from flows.config import LoopConfig
from flows.results import GenerateResult, LoopResult, ManifestResult, RepairStageResult, SelectResult
from flows.storage import RunStore, is_transient, record_key

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["three green triangles at the top", "a yellow diamond in the middle"]
TINY = {"generator": "synthetic", "rahf": "rahf-tiny"}
ONE = LoopConfig(**TINY, per_prompt=1)


def manifest_ids(root: str) -> list[str]:
    return [json.loads(line)["id"] for line in RunStore(root).read_bytes("manifest.jsonl").decode().splitlines()]


# -- row 1: an unreadable record is unfinished work ---------------------------------------------------------------


def test_truncated_record_is_redone_and_reaches_the_manifest(tmp_path, caplog):
    root = str(tmp_path / "run")
    first = stages.generate_and_score(root, PROMPTS, ONE)
    assert len(first.scored) == 2 and first.missing == ()
    victim = first.ids[1]
    path = Path(root) / record_key(victim)
    path.write_bytes(path.read_bytes()[:25])  # a torn record
    store = RunStore(root)
    with caplog.at_level(logging.WARNING, logger="flows.storage"):
        assert store.has_records(first.ids) == set(first.ids) - {victim}
    assert any(record_key(victim) in r.getMessage() for r in caplog.records)
    again = stages.generate_and_score(root, PROMPTS, ONE)
    assert (again.scored, again.generated, again.skipped, again.missing) == ((victim,), (), 1, ())
    assert store.get_record(victim).scores  # whole again
    report = stages.write_manifest(root, ids=first.ids)
    assert (report.records, report.missing, report.bad_files) == (2, (), ())
    assert sorted(manifest_ids(root)) == sorted(first.ids)


def test_manifest_counts_planned_items_with_neither_record_nor_error(tmp_path):
    root = str(tmp_path / "run")
    first = stages.generate_and_score(root, PROMPTS, ONE)
    gone = first.ids[0]
    Path(root, record_key(gone)).write_text("{")
    report = stages.write_manifest(root, ids=[*first.ids, "0123456789abcdef0123"])
    assert report.missing == tuple(sorted([gone, "0123456789abcdef0123"]))
    assert report.bad_files == (record_key(gone),) and report.records == 1
    assert manifest_ids(root) == [first.ids[1]]


def test_cli_loop_exits_1_when_planned_items_are_missing(tmp_path, monkeypatch, capsys):
    from richfeedback import cli

    def fake_loop(**kw):
        return _summary(kw["root"], missing=2, failed=1)

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no server is started for a fake flow
    monkeypatch.setattr("flows.loop.feedback_loop", fake_loop)
    args = ["loop", "--out", str(tmp_path / "run"), "--rahf", "rahf-tiny", "--num-prompts", "1", "--per-prompt", "1"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "2 of 5 planned images have neither a valid record nor an error record" in err
    monkeypatch.setattr("flows.loop.feedback_loop", lambda **kw: _summary(kw["root"], missing=0, failed=1))
    assert cli.main(args) == 0
    assert "1 of 5 planned images failed" in capsys.readouterr().out


def _summary(root: str, missing: int, failed: int) -> LoopResult:
    ids = tuple(f"i{k}" for k in range(5))
    return LoopResult(
        root=root,
        generate=GenerateResult(ids=ids, generated=ids, scored=ids[: 5 - failed - missing], failed=ids[:failed]),
        selection=SelectResult(f"{root}/finetune-data", (), candidates=5),
        repair=RepairStageResult(considered=0),
        manifest=ManifestResult(f"{root}/manifest.jsonl", records=2, errors=failed, missing=("x",) * missing),
    )


# -- row 2: corrupt side files are named and skipped --------------------------------------------------------------


def test_corrupt_error_record_is_named_skipped_and_redone(tmp_path, caplog):
    root = str(tmp_path / "run")
    report = stages.generate_and_score(root, [PROMPTS[1], "a photo of a cat"], ONE)
    [failed] = report.failed  # the synthetic world cannot draw a cat
    Path(root, "errors", f"{failed}.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="flows.stages"):
        out = stages.write_manifest(root, ids=report.ids)
    assert out.bad_files == (f"errors/{failed}.json",) and out.errors == 0 and out.missing == (failed,)
    assert any(f"errors/{failed}.json" in r.getMessage() for r in caplog.records)
    again = stages.generate_and_score(root, [PROMPTS[1], "a photo of a cat"], ONE)
    assert again.failed == (failed,) and again.skipped == 1  # redone: a valid error record again
    out = stages.write_manifest(root, ids=report.ids)
    assert (out.errors, out.missing, out.bad_files) == (1, (), ())


def test_corrupt_repair_decision_is_redone(tmp_path):
    root = str(tmp_path / "run")
    stages.generate_and_score(root, PROMPTS, ONE)
    # an absolute mask threshold of 0: every image gets a mask and a decision (rahf-tiny's heat is faint)
    config = ONE.with_overrides(
        {
            "repair_limit": 2,
            "repair": {
                "n": 1,
                "heat_drop": 0.0,
                "mask": {"threshold_mode": "absolute", "threshold": 0.0, "floor": 0.0},
            },
        }
    )
    first = stages.repair_images(root, config)
    assert first.considered == 2 and first.skipped == 0 and first.no_mask == ()
    decided = sorted(Path(root, "repairs").glob("*.json"))
    decided[0].write_text('{"parent_id": ')
    Path(root, "repairs", "0123456789abcdef0123.json").write_text("{")  # a decision nobody will make again
    again = stages.repair_images(root, config)
    assert again.skipped == 1 and len(again.accepted) + len(again.rejected) == 1
    assert json.loads(decided[0].read_text())["parent_id"] == decided[0].stem
    assert "repair: " in again.to_markdown() and f"{again.skipped} decided before" in again.to_markdown()


# -- row 3: nothing selected --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loop_with_nothing_selected_skips_finetune_and_compare(prefect_harness, tmp_path):
    from flows.loop import feedback_loop

    root = str(tmp_path / "loop")
    config = {
        **TINY,
        "per_prompt": 2,
        "selection": {"thresholds": {"plausibility": 1.0}},  # nothing reaches 1.0
        "repair": {"n": 1},
        "repair_limit": 1,
    }
    summary = feedback_loop(root=root, prompts=PROMPTS, config=config)
    assert summary.selection.selected == ()
    assert summary.finetune is None and summary.compare is None
    assert summary.skipped == {"finetune": "nothing selected", "compare": "nothing selected"}
    assert summary.repair.considered == 1
    assert summary.manifest.records >= 4 and len(manifest_ids(root)) >= 4
    assert not (Path(root) / "finetune").exists() and not (Path(root) / "compare").exists()
    assert "finetune: skipped, nothing selected" in summary.to_markdown()


# -- row 4: a killed run leaves no process and no temporary file --------------------------------------------------


def test_stale_temp_files_are_swept_when_a_flow_starts(prefect_harness, tmp_path):
    from flows.loop import generate_and_score

    root = tmp_path / "run"
    (root / "records").mkdir(parents=True)
    stale = root / "records" / ".x.json.abc123.tmp"
    fresh = root / "images" / ".y.png.def456.tmp"
    fresh.parent.mkdir()
    stale.write_text("{")
    fresh.write_bytes(b"\x89PNG")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    report = generate_and_score(root=str(root), prompts=PROMPTS[:1], config={**TINY, "per_prompt": 1})
    assert report.swept == 1
    assert not stale.exists() and fresh.exists()  # a temp file younger than a minute may be a live write


@pytest.mark.slow
def test_killed_cli_leaves_no_server_process(tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(DO_NOT_TRACK="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "richfeedback", "loop", "--out", str(out), "--rahf", "rahf-tiny"]
    cmd += ["--num-prompts", "2", "--per-prompt", "2", "--compare-per-prompt", "1", "--repair-limit", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    seen: dict[int, float] = {}
    deadline = time.time() + 300
    server_up = False
    while time.time() < deadline and proc.poll() is None:
        try:
            for child in parent.children(recursive=True):
                seen.setdefault(child.pid, child.create_time())
                line = " ".join(child.cmdline())
                server_up |= "uvicorn" in line or "flows.server" in line
        except psutil.NoSuchProcess:
            pass
        if server_up and (out / "records").is_dir():
            break
        time.sleep(0.1)
    assert proc.poll() is None and server_up, "the run must be killed while it runs, with its server up"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def survivors() -> list[int]:
        alive = []
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == proc.pid and p.pid not in alive:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return alive

    end = time.time() + 10
    while survivors() and time.time() < end:
        time.sleep(0.2)
    left = survivors()
    for pid in left:  # do not leave them running for the next test
        os.kill(pid, signal.SIGKILL)
    assert seen and left == []


# -- row 5: retries only for transient errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/run/x"), False),
        (FileNotFoundError(errno.ENOENT, "No such file", "/run/x"), False),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/run/x"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (ValueError("bad config"), False),
        (RuntimeError("CUDA error"), False),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.EIO, "I/O error"), True),
        (OSError("s3: service unavailable"), True),
    ],
)
def test_which_errors_are_transient(error, transient):
    assert is_transient(error) is transient


def _counting_select(monkeypatch, errors: list[BaseException]) -> list[int]:
    calls: list[int] = []

    def select(root, config=None, *, ids=None):
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return SelectResult("d", (), candidates=0)

    monkeypatch.setattr(stages, "select_finetune_data", select)
    return calls


def test_permission_error_is_attempted_once_with_the_path_in_the_message(prefect_harness, tmp_path, monkeypatch):
    from flows import loop

    denied = str(tmp_path / "run" / "selection.json")
    calls = _counting_select(monkeypatch, [PermissionError(errno.EACCES, "Permission denied", denied)] * 5)
    monkeypatch.setattr(loop, "select_task", loop.select_task.with_options(retry_delay_seconds=0))
    with pytest.raises(PermissionError, match=denied):
        loop.select_finetune_data(root=str(tmp_path / "run"))
    assert len(calls) == 1


def test_transient_error_is_retried(prefect_harness, tmp_path, monkeypatch):
    from flows import loop

    calls = _counting_select(monkeypatch, [ConnectionResetError(errno.ECONNRESET, "connection reset by peer")])
    monkeypatch.setattr(loop, "select_task", loop.select_task.with_options(retry_delay_seconds=0))
    assert loop.select_finetune_data(root=str(tmp_path / "run")).dataset == "d"
    assert len(calls) == 2


def test_store_permission_error_fails_the_flow_at_once(prefect_harness, tmp_path, monkeypatch):
    """The write itself is refused (injected: this test may run as root, whom chmod does not stop)."""
    from flows import loop, storage

    attempts = []

    def refuse(path, data, **kw):
        attempts.append(str(path))
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(storage, "atomic_write_bytes", refuse)
    monkeypatch.setattr(
        loop, "generate_and_score_task", loop.generate_and_score_task.with_options(retry_delay_seconds=0)
    )
    root = str(tmp_path / "run")
    with pytest.raises(PermissionError, match=str(tmp_path / "run" / "run.json")):  # its first write
        loop.generate_and_score(root=root, prompts=PROMPTS[:1], config={**TINY, "per_prompt": 1})
    assert len(attempts) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root is not stopped by file modes")
def test_read_only_run_folder_fails_at_once(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=str(root)):
            stages.generate_and_score(str(root), PROMPTS[:1], ONE)
    finally:
        root.chmod(0o700)


def test_runs_against_the_temporary_server_send_no_heartbeats(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    from flows import server

    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})  # no temporary server set up yet
    heartbeats_on = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}  # Prefect's default (the test harness turns it off)
    with temporary_settings(heartbeats_on, restore_defaults={PREFECT_API_URL}):
        assert get_current_settings().flows.heartbeat_frequency == 180
        assert isinstance(server.use_temporary_server(), server.GuardedServer)
        assert get_current_settings().flows.heartbeat_frequency is None
    with temporary_settings(heartbeats_on):
        assert get_current_settings().flows.heartbeat_frequency == 180  # the process-long scope ended with the block
        with server.no_heartbeats():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == 180


def test_the_temporary_server_runs_without_the_services_nothing_reads(monkeypatch):
    """Every LEAN_SERVICES variable is a real Prefect setting (read back in a child process with the server's
    environment), and a variable set by the user wins."""
    import json
    import subprocess
    import sys

    from flows import server

    probe = (
        "import json; from prefect.settings import get_current_settings as g; s = g().server; "
        "print(json.dumps([s.services.task_run_recorder.enabled, s.services.event_persister.enabled, "
        "s.services.triggers.enabled, s.events.stream_out_enabled, s.analytics_enabled]))"
    )
    for name in server.LEAN_SERVICES:
        monkeypatch.delenv(name, raising=False)

    def read() -> list[bool]:
        out = subprocess.run([sys.executable, "-c", probe], env=server.server_environment(), capture_output=True)
        assert out.returncode == 0, out.stderr.decode()
        return json.loads(out.stdout)

    assert len(server.LEAN_SERVICES) == 5 and read() == [False] * 5
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED", "true")
    assert read() == [True, False, False, False, False]


def test_a_fresh_prefect_home_starts_from_the_migrated_database(tmp_path):
    import sqlite3

    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME, temporary_settings

    from flows import server
    from rahf.zoo import cache_root

    def tables(path) -> dict:
        with sqlite3.connect(path) as db:
            names = [r[0] for r in db.execute("select name from sqlite_master where type = 'table'")]
            return {
                "version": db.execute("select version_num from alembic_version").fetchall(),
                "block types": db.execute("select count(*) from block_type").fetchone()[0],
                "tables": len(names),
            }

    cache = cache_root() / "prefect"
    default_db = {PREFECT_API_DATABASE_CONNECTION_URL}  # the home's database (the test harness may have set one)
    with temporary_settings({PREFECT_HOME: tmp_path / "home"}, restore_defaults=default_db):
        assert server.seed_database(cache) is True
        seeded = tables(tmp_path / "home" / "prefect.db")
        assert seeded == tables(server.database_template(cache))
        assert seeded["version"] and seeded["block types"] > 5 and seeded["tables"] > 20
        assert server.server_environment()["PREFECT_API_BLOCKS_REGISTER_ON_START"] == "false"
        assert server.seed_database(cache) is False  # a home with a database keeps it
    with temporary_settings({PREFECT_HOME: tmp_path / "other"}, restore_defaults=default_db):
        assert "PREFECT_API_BLOCKS_REGISTER_ON_START" not in server.server_environment()  # not seeded: registers
    url = f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}"
    with temporary_settings({PREFECT_HOME: tmp_path / "third", PREFECT_API_DATABASE_CONNECTION_URL: url}):
        assert server.seed_database(cache) is False  # a database of the user's choice is not touched
    assert not (tmp_path / "third" / "prefect.db").exists()


def test_a_damaged_template_leaves_the_home_untouched_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import sqlite3

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows import server

    cache = tmp_path / "cache" / "prefect"
    cache.mkdir(parents=True)
    (cache / f"prefect-{prefect.__version__}.db").write_bytes(b"not a database" * 100)
    home = tmp_path / "home"
    default_db = {PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL}
    with temporary_settings({PREFECT_HOME: home}, restore_defaults=default_db):
        with pytest.raises(sqlite3.DatabaseError):
            server.seed_database(cache)
        assert not home.exists() or sorted(p.name for p in home.iterdir()) == []  # no database, mark or partial
        monkeypatch.setattr(SubprocessASGIServer, "_instances", {})
        monkeypatch.setenv("RICHFEEDBACK_CACHE", str(tmp_path / "cache"))
        with caplog.at_level("WARNING", logger="flows.server"):
            assert isinstance(server.use_temporary_server(), server.GuardedServer)  # the run goes on
        assert "no migrated Prefect database copied" in caplog.text
        assert "PREFECT_API_BLOCKS_REGISTER_ON_START" not in server.server_environment()  # the server registers
