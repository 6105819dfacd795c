"""The flows' progress artifact: none for a short stage; for a longer one, made when the first update falls due,
then throttled (one Prefect API call per interval and one at the end), sent from a background thread in the
caller's context: the stage never waits for the API, except for the last update."""

from __future__ import annotations

import contextvars
import threading
import time

import flows.loop as loop


def _fake_api(monkeypatch, calls: list[tuple[str, float]]) -> None:
    monkeypatch.setattr(
        loop, "create_progress_artifact", lambda progress, description: calls.append(("create", progress)) or "id"
    )
    monkeypatch.setattr(loop, "update_progress_artifact", lambda artifact, progress: calls.append((artifact, progress)))


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the background call never came"
        time.sleep(0.01)


def test_a_stage_shorter_than_the_interval_makes_no_artifact(monkeypatch):
    calls: list[tuple[str, float]] = []
    _fake_api(monkeypatch, calls)
    update = loop._progress("x", every_s=3600.0)
    for done in range(1, 11):
        update(done, 10)
    assert calls == []  # ten batches and the end: no API call at all


def test_the_artifact_is_made_when_due_then_updated_and_completed(monkeypatch):
    calls: list[tuple[str, float]] = []
    _fake_api(monkeypatch, calls)
    update = loop._progress("x", every_s=0.0)
    update(1, 4)  # due at once: the artifact is made with the progress so far
    _wait_for(lambda: len(calls) == 1)
    update(2, 4)
    _wait_for(lambda: len(calls) == 2)
    update(4, 4)  # the last is awaited
    assert calls == [("create", 25.0), ("id", 50.0), ("id", 100.0)]


def test_progress_calls_do_not_block_the_stage_and_skip_while_one_is_in_flight(monkeypatch):
    release, sent = threading.Event(), []

    def slow_create(progress, description):
        release.wait(timeout=30)  # the API answers only when released
        sent.append(("create", progress))
        return "id"

    monkeypatch.setattr(loop, "create_progress_artifact", slow_create)
    monkeypatch.setattr(loop, "update_progress_artifact", lambda artifact, progress: sent.append((artifact, progress)))
    update = loop._progress("x", every_s=0.0)
    update(1, 4)  # goes out, and blocks in the background
    update(2, 4)  # due, but one is in flight: skipped
    update(3, 4)
    assert sent == []  # the stage went on while the first call waited for the API
    release.set()
    update(4, 4)  # the last is awaited
    assert sent == [("create", 25.0), ("id", 100.0)]
    update(2, 2)  # a second pass of the same stage (compare: A, then B) reports on the same artifact
    assert sent == [("create", 25.0), ("id", 100.0), ("id", 100.0)]


def test_the_calls_run_in_the_callers_context(monkeypatch):
    """Prefect finds the task run and its API client in context variables; the sender thread sees the caller's."""
    run = contextvars.ContextVar("run", default=None)
    seen: list[tuple[str | None, str]] = []
    monkeypatch.setattr(
        loop,
        "create_progress_artifact",
        lambda progress, description: seen.append((run.get(), threading.current_thread().name)) or "id",
    )
    monkeypatch.setattr(loop, "update_progress_artifact", lambda artifact, progress: seen.append((run.get(), "")))
    run.set("task-run-1")
    update = loop._progress("x", every_s=0.0)
    update(1, 2)
    update(2, 2)
    assert seen[0][0] == "task-run-1" and seen[0][1].startswith("progress-artifact")
    assert [r for r, _ in seen] == ["task-run-1", "task-run-1"]


def test_a_failing_progress_call_is_logged_not_raised(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ConnectionError("API down")

    monkeypatch.setattr(loop, "create_progress_artifact", broken)
    monkeypatch.setattr(loop, "update_progress_artifact", broken)
    update = loop._progress("x", every_s=0.0)
    for done in range(1, 4):
        update(done, 3)  # no exception reaches the stage
    assert "API down" in caplog.text and "not updated" in caplog.text
