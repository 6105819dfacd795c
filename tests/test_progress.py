"""The flows' progress artifact is throttled (one Prefect API call per interval and one at the end) and sent from
a background thread: the stage never waits for the API, except for the last update."""

from __future__ import annotations

import threading

import flows.loop as loop


def test_progress_artifact_updates_are_throttled_and_the_last_always_goes(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(loop, "create_progress_artifact", lambda progress, description: "artifact-id")
    monkeypatch.setattr(loop, "update_progress_artifact", lambda artifact, progress: calls.append(progress))

    update = loop._progress("x", every_s=3600.0)
    for done in range(1, 11):
        update(done, 10)
    assert calls == [100.0]  # nine intermediate batches sent nothing; the end was sent


def test_progress_updates_do_not_block_the_stage_and_skip_while_one_is_in_flight(monkeypatch):
    release, sent = threading.Event(), []

    def slow_update(artifact, progress):
        release.wait(timeout=30)  # the API answers only when released
        sent.append(progress)

    monkeypatch.setattr(loop, "create_progress_artifact", lambda progress, description: "artifact-id")
    monkeypatch.setattr(loop, "update_progress_artifact", slow_update)
    update = loop._progress("x", every_s=0.0)
    update(1, 4)  # goes out, and blocks in the background
    update(2, 4)  # due, but one is in flight: skipped
    update(3, 4)
    assert sent == []  # the stage went on while the first update waited for the API
    release.set()
    update(4, 4)  # the last is awaited
    assert sent == [25.0, 100.0]
    update(2, 2)  # a second pass of the same stage (compare: A, then B) reports on the same artifact
    assert sent == [25.0, 100.0, 100.0]


def test_a_failing_progress_update_is_logged_not_raised(monkeypatch, caplog):
    def broken(artifact, progress):
        raise ConnectionError("API down")

    monkeypatch.setattr(loop, "create_progress_artifact", lambda progress, description: "artifact-id")
    monkeypatch.setattr(loop, "update_progress_artifact", broken)
    update = loop._progress("x", every_s=0.0)
    for done in range(1, 4):
        update(done, 3)  # no exception reaches the stage
    assert "API down" in caplog.text and "not updated" in caplog.text
