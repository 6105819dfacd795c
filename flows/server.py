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
import os
import signal
import subprocess
import sys
import threading
import time
from typing import ClassVar

from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings

WATCH_INTERVAL_S = 0.2  # how often the server looks for its parent
SHUTDOWN_GRACE_S = 5.0  # after SIGTERM, a server that has not stopped is ended with os._exit


class GuardedServer(SubprocessASGIServer):
    """A :class:`SubprocessASGIServer` whose process exits when the process that started it dies."""

    _instances: ClassVar[dict[int | None, SubprocessASGIServer]] = {}  # its own registry, not the base class's

    def _run_uvicorn_command(self) -> subprocess.Popen:
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        command = [sys.executable, "-m", "flows.server", "--parent", str(os.getpid()), "--port", str(self.port)]
        return subprocess.Popen(command, env=env)


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
    read them, and each flow run would wait up to a second at its end for the heartbeat thread to stop."""
    server = guard_temporary_server()
    if server is not None:
        no_heartbeats().__enter__()  # for the process's lifetime
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
    parser.add_argument("--parent", type=int, required=True, help="pid of the process the server belongs to")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
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
