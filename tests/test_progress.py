"""The flows' progress artifact is throttled: one Prefect API call per interval and one at the end."""

from __future__ import annotations

import flows.loop as loop


def test_progress_artifact_updates_are_throttled_and_the_last_always_goes(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(loop, "create_progress_artifact", lambda progress, description: "artifact-id")
    monkeypatch.setattr(loop, "update_progress_artifact", lambda artifact, progress: calls.append(progress))

    update = loop._progress("x", every_s=3600.0)
    for done in range(1, 11):
        update(done, 10)
    assert calls == [100.0]  # nine intermediate batches sent nothing; the end was sent

    calls.clear()
    update = loop._progress("x", every_s=0.0)
    for done in range(1, 5):
        update(done, 4)
    assert calls == [25.0, 50.0, 75.0, 100.0]
