"""An S3-protocol server for tests: moto's threaded server on a free loopback port, fake credentials, one bucket.

Tests import the fixture they use by name, ``from tests.s3_server import s3_root  # noqa: F401`` (or ``s3_server``
for the server object itself), and take it as ``def test_x(s3_root):  # noqa: F811``; this is a plain module, not a
conftest. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
s3fs = pytest.importorskip("s3fs")


class S3Server:
    """moto's ``ThreadedMotoServer`` on 127.0.0.1 that can go away and come back on the same port.

    moto keeps its buckets and objects in the test process, not in the server thread, so what was written
    before :meth:`stop` is there again after :meth:`start`.
    """

    def __init__(self) -> None:
        self.port = 0
        self.root = ""  # s3://bucket/run once running_s3 made the bucket
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve on ``self.port`` (a free one the first time)."""
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        """Shut the server down: connections to the port are refused until :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None


@contextlib.contextmanager
def running_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A running :class:`S3Server` with a fresh bucket; the AWS environment variables point at it until exit.

    moto's state is process-wide, so every use gets a bucket of its own.
    """
    werkzeug_log = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    monkeypatch.setattr(werkzeug_log, "level", max(werkzeug_log.level, logging.WARNING))
    server = S3Server()
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        server.root = f"s3://{bucket}/run"
        yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A running :class:`S3Server`; ``.root`` is ``s3://<fresh bucket>/run`` on it."""
    with running_s3(monkeypatch) as server:
        yield server


@pytest.fixture
def s3_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<fresh bucket>/run`` on a server of the test's own."""
    with running_s3(monkeypatch) as server:
        yield server.root
