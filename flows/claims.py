"""Id-keyed claims: several processes (Prefect workers, Dask workers, two ``richfeedback loop`` runs) on one run
root never work on the same image at the same time.

Before a worker generates an image it creates ``claims/<id>.json`` write-once (:meth:`flows.storage.RunStore.
create_once`: a hard link locally, a PUT with ``If-None-Match: *`` on S3); exactly one of concurrent claimants
wins. The winner deletes its claim once the record is written (or the item failed); the others skip the id and
wait for its record. A claim whose owner is gone is taken over: at once when the owner ran on this host and its
process no longer exists, otherwise after ``ttl_s`` seconds (the owner's clock, so hosts need roughly synchronised
clocks). Taking over is delete + create-once, which two takers can race; the worst case then is the same image
computed twice, with equal bytes (ids are content-derived), never a corrupt or lost record.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable
from typing import Any

from common.keys import CLAIMS, claim_key, id_of_claim_key
from flows.storage import RunStore

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Claims:
    """The claims of one process on one run store.

    Args:
        store: the run store.
        ttl_s: age (seconds) after which a claim of another host counts as abandoned; must exceed the time one
            batch takes (generate + score + write).
    """

    def __init__(self, store: RunStore, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.store = store
        self.ttl_s = float(ttl_s)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = f"{self.host}:{self.pid}:{secrets.token_hex(8)}"
        self.taken_over: list[str] = []  # ids whose abandoned claim this process took over

    def _body(self) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "token": self.token, "time": time.time()}).encode()

    def _read(self, id: str) -> dict[str, Any] | None:
        """The claim of ``id``; None when there is none; {} when it does not parse (counts as abandoned)."""
        try:
            data = self.store.read_json(claim_key(id))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def abandoned(self, claim: dict[str, Any], now: float | None = None) -> bool:
        """Whether ``claim`` is abandoned: unreadable, older than ``ttl_s``, or made on this host by a process
        that no longer exists."""
        try:
            age = (now if now is not None else time.time()) - float(claim["time"])
            host, pid = str(claim["host"]), int(claim["pid"])
        except (KeyError, TypeError, ValueError):
            return True
        if age > self.ttl_s:
            return True
        return host == self.host and pid != self.pid and not _pid_alive(pid)

    def acquire(self, ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Claim ``ids``; returns (claimed by this process, held by another live claimant), each in input order."""
        mine: list[str] = []
        busy: list[str] = []
        for id in dict.fromkeys(ids):
            key = claim_key(id)
            if self.store.create_once(key, self._body()):
                mine.append(id)
                continue
            claim = self._read(id)
            if claim is None:  # released meanwhile
                (mine if self.store.create_once(key, self._body()) else busy).append(id)
            elif claim.get("token") == self.token:  # a retried PUT that had landed
                mine.append(id)
            elif self.abandoned(claim):
                log.info("taking over the abandoned claim of %s (owner %s:%s)", id, claim.get("host"), claim.get("pid"))
                self.store.delete(key)
                if self.store.create_once(key, self._body()):
                    mine.append(id)
                    self.taken_over.append(id)
                else:
                    busy.append(id)
            else:
                busy.append(id)
        return mine, busy

    def clear_finished(self, finished: Iterable[str]) -> list[str]:
        """Delete the abandoned claims of images that already have their record: a process killed between writing
        a record and releasing its claim leaves one that no later run would take over, since none redoes that
        image. One listing of ``claims/``; a live process's claim is left alone. Returns the ids cleared."""
        done = set(finished)
        cleared = []
        for key in self.store.list(CLAIMS):
            id = id_of_claim_key(key)
            if id is None or id not in done:
                continue
            claim = self._read(id)
            if claim is not None and claim.get("token") != self.token and self.abandoned(claim):
                self.store.delete(key)
                cleared.append(id)
        return cleared

    def release(self, ids: Iterable[str]) -> None:
        """Delete this process's claims of ``ids`` (a claim another process took over is left alone)."""
        for id in ids:
            claim = self._read(id)
            if claim is not None and claim.get("token") == self.token:
                self.store.delete(claim_key(id))


__all__ = ["CLAIMS", "DEFAULT_TTL_S", "Claims", "claim_key"]
