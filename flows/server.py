"""Prefect's temporary API server, made to die with the process that started it.

Without a ``PREFECT_API_URL``, Prefect runs flows against a temporary server: a ``uvicorn`` child process
(``prefect.server.api.server.SubprocessASGIServer``) that it stops at interpreter exit. A parent killed with
SIGKILL never reaches that exit, and the child would keep running. :func:`guard_temporary_server` registers a
server whose child runs this module instead of plain ``uvicorn``: it serves the same app and exits as soon as its
parent process is gone (it checks ``os.getppid()`` every 0.2 s, which works from any thread of the parent and
on every POSIX system). Prefect itself still finds, starts and stops the server as usual.
:func:`use_temporary_server` is the set-up of a run against it: the guard, and flow-run heartbeats off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings

WATCH_INTERVAL_S = 0.2  # how often the server looks for its parent

#: Server services that a run against its own temporary server never reads: off there, each one back on when its
#: variable is set in the environment. Prefect's task runs reach the database only as events, through the
#: task-run recorder; the event persister stores every event; triggers run automations; the distributor streams
#: events to subscribers; analytics sends usage reports. Flow runs with their states, logs and artifacts are
#: written by the API itself and are kept (in the run folder's ``.prefect`` database for the command line). A
#: lasting server (``PREFECT_API_URL``) is not touched: it runs what its own settings say.
LEAN_SERVICES = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
SHUTDOWN_GRACE_S = 5.0  # after SIGTERM, a server that has not stopped is ended with os._exit


class GuardedServer(SubprocessASGIServer):
    """A :class:`SubprocessASGIServer` whose process exits when the process that started it dies."""

    _instances: ClassVar[dict[int | None, SubprocessASGIServer]] = {}  # its own registry, not the base class's

    def _run_uvicorn_command(self) -> subprocess.Popen:
        command = [sys.executable, "-m", "flows.server", "--parent", str(os.getpid()), "--port", str(self.port)]
        return subprocess.Popen(command, env=server_environment())


def server_environment() -> dict[str, str]:
    """The temporary server process's environment: :data:`LEAN_SERVICES` under this process's environment and
    settings (so a variable set there wins), the UI off, ephemeral mode on; block registration off when the
    database came from :func:`seed_database` (its block types are registered already)."""
    seeded = {"PREFECT_API_BLOCKS_REGISTER_ON_START": "false"} if _seed_mark(_home_database()).exists() else {}
    return {
        **LEAN_SERVICES,
        **seeded,
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }


# ---------------------------------------------------------------------------------------------------------
# A migrated database for a fresh PREFECT_HOME
# ---------------------------------------------------------------------------------------------------------


def _home_database() -> Path:
    """``PREFECT_HOME/prefect.db``, the SQLite file of Prefect's default database URL."""
    return get_current_settings().home / "prefect.db"


def _seed_mark(database: Path) -> Path:
    return database.with_name(database.name + ".seeded")


def _uses_home_database() -> bool:
    url = get_current_settings().server.database.connection_url
    return url is not None and url.get_secret_value() == f"sqlite+aiosqlite:///{_home_database()}"


def database_template(cache: Path) -> Path:
    """An empty Prefect database, migrated and with Prefect's block types registered, built once per Prefect
    version under ``cache`` (in a child process with its own ``PREFECT_HOME``; concurrent builders each finish
    and the first rename wins)."""
    template = cache / f"prefect-{prefect.__version__}.db"
    if template.exists():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".prefect-db-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=tmp, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        subprocess.run([sys.executable, "-m", "flows.server", "--build-database"], env=env, check=True)
        built = Path(tmp) / "template.db"
        _copy_database(Path(tmp) / "prefect.db", built)
        os.replace(built, template)
    return template


def seed_database(cache: Path) -> bool:
    """Start a fresh ``PREFECT_HOME`` from :func:`database_template`, so the temporary server skips the database
    migrations and the block registration (most of its start-up on a 2-core machine); returns True when it
    did. Nothing is done when the home has a database already or Prefect's database is not the home's SQLite
    file (``PREFECT_API_DATABASE_CONNECTION_URL`` set)."""
    database = _home_database()
    if database.exists() or not _uses_home_database():
        return False
    template = database_template(cache)
    database.parent.mkdir(parents=True, exist_ok=True)
    partial = database.with_name(f".{database.name}.{os.getpid()}")
    try:
        _copy_database(template, partial)
        os.replace(partial, database)
    finally:
        partial.unlink(missing_ok=True)  # a failed copy leaves the home as it was
    _seed_mark(database).touch()  # only a database that came from the template skips block registration
    return True


def _copy_database(source: Path, target: Path) -> None:
    """SQLite's online backup: a consistent copy whatever the source's journal (WAL) holds."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


async def _build_database() -> None:
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)


def guard_temporary_server() -> GuardedServer | None:
    """Make the temporary server that Prefect starts in this process a :class:`GuardedServer`; returns it, or None
    when ``PREFECT_API_URL`` names a server (nothing is started then) or a temporary server is already set up."""
    if PREFECT_API_URL.value():
        return None
    current = SubprocessASGIServer._instances.get(None)
    if current is not None:
        return current if isinstance(current, GuardedServer) else None
    server = GuardedServer()
    SubprocessASGIServer._instances[None] = server  # what Prefect's own SubprocessASGIServer() now returns
    return server


def use_temporary_server() -> GuardedServer | None:
    """Set up this process's flow runs against the temporary server (nothing when ``PREFECT_API_URL`` names a
    server): :func:`guard_temporary_server`, and :func:`no_heartbeats` for the rest of the process. Heartbeats let
    a lasting server mark a silent run Crashed; the temporary server ends with this process, so nothing would ever
    read them, and each flow run would wait up to a second at its end for the heartbeat thread to stop. A fresh
    ``PREFECT_HOME`` starts from the migrated database of :func:`seed_database` (kept under
    ``$RICHFEEDBACK_CACHE/prefect``); if that fails the server migrates its own, as Prefect does."""
    server = guard_temporary_server()
    if server is not None:
        no_heartbeats().__enter__()  # for the process's lifetime
        from rahf.zoo import cache_root

        try:
            seed_database(cache_root() / "prefect")
        except (OSError, sqlite3.Error, subprocess.CalledProcessError) as err:
            logging.getLogger(__name__).warning("no migrated Prefect database copied (%s); the server builds one", err)
    return server


def no_heartbeats():
    """A Prefect settings context (``with no_heartbeats(): ...``) in which flow runs send no heartbeats. None
    ("off") passes no settings validation (environment, ``prefect.toml`` and ``temporary_settings`` all fall back
    to the default of 180 s), so the current settings are copied with the field set."""
    from prefect.context import SettingsContext

    context = SettingsContext.get()
    flows = context.settings.flows.model_copy(update={"heartbeat_frequency": None})
    return SettingsContext(profile=context.profile, settings=context.settings.model_copy(update={"flows": flows}))


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down gracefully ...
    time.sleep(SHUTDOWN_GRACE_S)
    os._exit(1)  # ... or not at all


def main(argv: list[str] | None = None) -> None:
    """Serve Prefect's API on 127.0.0.1:``--port`` until the process ``--parent`` is gone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, help="pid of the process the server belongs to")
    parser.add_argument("--port", type=int)
    parser.add_argument("--build-database", action="store_true", help="migrate PREFECT_HOME's database and exit")
    args = parser.parse_args(argv)
    if args.build_database:
        asyncio.run(_build_database())
        return
    if args.parent is None or args.port is None:
        parser.error("--parent and --port are required to serve")
    if os.getppid() != args.parent:  # the parent died before this process got here
        return
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True, name="watch-parent").start()
    import uvicorn

    # exits with uvicorn's code 3 when the port is taken; the parent then picks another port
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
