"""The run store: everything of a run under one root, a local folder or ``s3://bucket/prefix``.

Layout under the root (keys are POSIX paths relative to it)::

    images/<id>.png              the image of record <id>
    heatmaps/<id>-<name>.png     its heatmaps (implausibility, misalignment, ...)
    records/<id>.json            one ImageRecord per image: finished work, found again by a rerun
    manifest.jsonl               every record, one JSON line each, sorted by id

(each key built by one function of :mod:`common.keys`, which lists the other kinds: errors, repairs, ...).

Every write is whole or absent: locally a temporary file in the same folder, then ``os.replace``; on object stores
one ``pipe_file`` (a single PUT, or a multipart upload that only appears when completed). A rerun skips an id whose
record is valid (parses, and names the id of its key); an unreadable record counts as unfinished work. Remote calls
go through :func:`with_retries` (exponential backoff on :func:`is_transient` errors), so an endpoint that is away
for a few seconds costs time, not the run. Ids are content-derived (``generators.base.
image_id``), so several workers sharing one prefix never write different bytes to the same key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from common.atomic import atomic_write_bytes, is_temp_name
from common.keys import RECORDS, id_of_record_key, manifest_key, record_key
from common.keys import check_id as _check_id
from common.keys import heatmap_key as heatmap_key  # re-exported: older callers import the key builders here
from common.keys import image_key as image_key
from common.records import ImageRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST = manifest_key()

RETRY_TRIES = 6  # attempts in all
RETRY_FIRST_DELAY_S = 0.2  # doubles after every failure ...
RETRY_MAX_DELAY_S = 3.0  # ... up to this: 0.2 + 0.4 + 0.8 + 1.6 + 3.0 = 6 s of waiting over 6 attempts

# Not transient: retrying cannot make a missing key appear or a denied request pass.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# OSError numbers that waiting does not cure (a full disk, a read-only mount, a bad name).
_PERMANENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.EINVAL,
        errno.EBADF,
        errno.ELOOP,
    }
)
_TRANSIENT: tuple[type[BaseException], ...] | None = None


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exception types worth retrying: OS/connection/timeout errors, and botocore's and aiohttp's connection
    errors where those packages are installed (imported on first use)."""
    global _TRANSIENT
    if _TRANSIENT is None:
        errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
        try:
            from botocore.exceptions import ConnectionError as BotoConnectionError
            from botocore.exceptions import HTTPClientError

            errors += [BotoConnectionError, HTTPClientError]
        except ImportError:
            pass
        try:
            import aiohttp

            errors += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        except ImportError:
            pass
        _TRANSIENT = tuple(errors)
    return _TRANSIENT


def is_transient(error: BaseException) -> bool:
    """Whether retrying may cure ``error``: connection errors, timeouts and OSErrors other than missing paths,
    refused permissions, full or read-only disks and bad names. Everything else (ValueError, RuntimeError, ...)
    is a bug or a bad input and is not retried."""
    if isinstance(error, _PERMANENT) or not isinstance(error, transient_errors()):
        return False
    return getattr(error, "errno", None) not in _PERMANENT_ERRNOS


def with_retries(
    fn: Callable[..., T],
    *args: Any,
    what: str = "storage call",
    tries: int = RETRY_TRIES,
    first_delay: float = RETRY_FIRST_DELAY_S,
    max_delay: float = RETRY_MAX_DELAY_S,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retried on :func:`is_transient` errors with exponential backoff.

    Args:
        what: what is being done, for the log line of each retry.
        tries: attempts in all (>= 1); the last failure is raised.
        first_delay, max_delay: seconds before the first retry, doubling, capped at ``max_delay``.
    """
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    delay = first_delay
    for attempt in range(1, tries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == tries or not is_transient(e):
                raise
            name = type(e).__name__
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, name, e, attempt, tries - 1, delay)
            time.sleep(delay)
            delay = min(2 * delay, max_delay)
    raise AssertionError("unreachable")


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"key must be a relative POSIX path without '.', '..' or empty parts, got {key!r}")
    return key


@dataclass
class RecordsRead:
    """All readable records (sorted by id) and the record files that could not be read: ``bad`` holds
    ``(key, error message)`` pairs."""

    records: list[ImageRecord] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]


class RunStore:
    """Bytes, JSON and records under a root URI (local path, ``file://``, ``s3://bucket/prefix``, any fsspec URL).

    Args:
        root: where the run lives; created on first write.
        storage_options: passed to the fsspec filesystem (e.g. ``{"endpoint_url": ..., "key": ..., "secret":
            ...}`` for s3fs). Remote listing caches are off unless set here: other workers write under the same
            prefix, so a cached listing would go stale.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        if not root:
            raise ValueError("root must be a non-empty path or URI")
        options = dict(storage_options or {})
        protocol = fsspec.core.split_protocol(root)[0] or "file"
        self.local = issubclass(fsspec.get_filesystem_class(protocol), LocalFileSystem)
        if not self.local:
            options.setdefault("use_listings_cache", False)
        self.fs, path = fsspec.core.url_to_fs(root, **options)
        self.root = root
        self.path = path.rstrip("/")

    def __repr__(self) -> str:
        return f"RunStore({self.root!r})"

    # -- plumbing ------------------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return posixpath.join(self.path, _check_key(key))

    def _call(self, fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> T:
        if self.local:
            return fn(*args, **kwargs)
        return with_retries(fn, *args, what=f"{what} ({self.root})", **kwargs)

    def uri(self, key: str) -> str:
        """Full location of ``key``: a plain path for a local root, else a URI like ``s3://bucket/run/key``."""
        full = self._full(key)
        return full if self.local else self.fs.unstrip_protocol(full)

    # -- bytes ---------------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (a connection error is raised after retries, never read as "missing")."""
        full = self._full(key)

        def probe() -> bool:
            try:
                self.fs.info(full)
            except FileNotFoundError:
                return False
            return True

        return self._call(probe, what=f"exists {key}")

    def read_bytes(self, key: str) -> bytes:
        """The bytes at ``key``; FileNotFoundError if absent."""
        return self._call(self.fs.cat_file, self._full(key), what=f"read {key}")

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically (temp file + ``os.replace`` locally, one PUT remotely); returns
        :meth:`uri`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"data must be bytes, got {type(data).__name__}")
        full = self._full(key)
        try:
            if self.local:
                atomic_write_bytes(full, bytes(data), fsync=True)
            else:
                with_retries(self.fs.pipe_file, full, bytes(data), what=f"write {key} ({self.root})")
        except _PERMANENT as e:
            if e.filename is None:  # name the place: a remote refusal often does not
                raise type(e)(e.errno, e.strerror or str(e), self.uri(key)) from e
            raise
        return self.uri(key)

    def read_json(self, key: str) -> Any:
        """The JSON value stored at ``key``."""
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, value: Any) -> str:
        """Write ``value`` as JSON (sorted keys, so equal values give equal bytes); returns :meth:`uri`."""
        return self.write_bytes(key, json.dumps(value, sort_keys=True, indent=1).encode())

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all files below the folder ``prefix`` ("" for everything), sorted; [] if it does not exist.
        Temporary files of unfinished local writes are left out."""
        base = self._full(prefix.strip("/")) if prefix.strip("/") else self.path

        def find() -> list[str]:
            try:
                return self.fs.find(base)
            except FileNotFoundError:
                return []

        found = self._call(find, what=f"list {prefix or '/'}")
        keys = (posixpath.relpath(p, self.path) for p in found)
        return sorted(k for k in keys if not k.startswith("..") and not is_temp_name(posixpath.basename(k)))

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        full = self._full(key)

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(full)

        self._call(remove, what=f"delete {key}")

    def _read_many(self, keys: list[str]) -> dict[str, bytes | Exception]:
        """Bytes (or the error) of every key; remote stores fetch them concurrently in one batched call."""
        if self.local or not keys:
            out: dict[str, bytes | Exception] = {}
            for k in keys:
                try:
                    out[k] = self.read_bytes(k)
                except OSError as e:
                    out[k] = e
            return out
        fulls = {self._full(k): k for k in keys}
        got = self._call(self.fs.cat, list(fulls), what=f"read {len(keys)} keys", on_error="return")
        out = {}
        for full, k in fulls.items():
            value = got.get(full)
            if isinstance(value, Exception) and is_transient(value):
                try:
                    value = self.read_bytes(k)  # retried one by one
                except OSError as e:
                    value = e
            out[k] = value if value is not None else FileNotFoundError(k)
        return out

    # -- records -------------------------------------------------------------------------------------------

    def put_record(self, record: ImageRecord) -> str:
        """Store ``record`` at :func:`record_key`; returns its key."""
        key = record_key(record.id)
        self.write_bytes(key, record.to_json().encode())
        return key

    def get_record(self, id: str) -> ImageRecord:
        """The record of ``id``; FileNotFoundError if there is none."""
        return ImageRecord.from_json(self.read_bytes(record_key(id)).decode())

    def has_record(self, id: str) -> bool:
        """Whether ``id`` has a valid record (see :meth:`has_records`)."""
        return id in self.has_records([id])

    def has_records(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` whose record is valid: finished work. One listing of ``records/``, then a read of
        the listed ones (one batched request on remote stores); a record that does not parse or names another id
        is logged by key and left out, so it is redone."""
        wanted = {_check_id(i) for i in ids}
        listed = sorted(wanted & set(self.record_ids()))
        return set(self._parse_records([record_key(i) for i in listed]).ids)

    def record_ids(self) -> list[str]:
        """Ids of all record files, sorted (from one listing; a file listed here may still be unreadable)."""
        ids = (id_of_record_key(k) for k in self.list(RECORDS))
        return [i for i in ids if i is not None]

    def records(self) -> RecordsRead:
        """Every valid record, sorted by id; unreadable or unparseable record files go to ``.bad``, never raise."""
        return self._parse_records([record_key(i) for i in self.record_ids()])

    def _parse_records(self, keys: list[str]) -> RecordsRead:
        out = RecordsRead()
        for key, data in self._read_many(keys).items():
            try:
                if isinstance(data, Exception):
                    raise data
                record = ImageRecord.from_json(data.decode())
                if record.id != id_of_record_key(key):
                    raise ValueError(f"record id {record.id!r} does not match its key")
            except Exception as e:
                out.bad.append((key, f"{type(e).__name__}: {e}"))
                log.warning("unreadable record %s (%s): its item counts as unfinished", self.uri(key), e)
                continue
            out.records.append(record)
        out.records.sort(key=lambda r: r.id)
        out.bad.sort()
        return out

    def write_manifest(self, records: Iterable[ImageRecord], key: str = MANIFEST) -> str:
        """One JSON line per record, sorted by id (equal records give equal bytes); returns :meth:`uri`.

        A repeated id with the same content is written once; with different content it is a ValueError.
        """
        by_id: dict[str, str] = {}
        for r in records:
            line = r.to_json()
            if by_id.setdefault(r.id, line) != line:
                raise ValueError(f"two different records share id {r.id!r}")
        body = "".join(by_id[i] + "\n" for i in sorted(by_id))
        return self.write_bytes(key, body.encode())

    def read_manifest(self, key: str = MANIFEST) -> list[ImageRecord]:
        """The records of a manifest written by :meth:`write_manifest`, in file order."""
        out = []
        for n, line in enumerate(self.read_bytes(key).decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(ImageRecord.from_json(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{key} line {n}: not a record ({e})") from e
        return out
