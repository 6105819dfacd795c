"""An interrupted batch scoring run resumes: finished chunks are reused, never redone or duplicated, never mixed
with a run of other inputs, another model or other options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from rahf.batch import PARTS_DIR, RUN_FILE, ScoreItem, score_items
from rahf.presets import build_rahf
from rahf.scorer import RAHFScorer
from richfeedback.cli import main

CHUNK = 2  # five items: chunks [0, 1] [2, 3] [4]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def items(tmp_path) -> list[ScoreItem]:
    """Five items; the second names a missing image, so chunk 0 holds an error record."""
    paths = [tmp_path / f"im{i}.png" for i in range(5)]
    for i, p in enumerate(paths):
        if i != 1:
            Image.new("RGB", (30, 20), (40 * i, 50, 60)).save(p)
    return [ScoreItem(p, f"prompt {i}") for i, p in enumerate(paths)]


class Counting:
    """Wraps ``scorer.score``: counts the calls and the images scored; raises at call ``fail_at`` (1-based)."""

    def __init__(self, scorer: RAHFScorer, monkeypatch, fail_at: int | None = None) -> None:
        self.real, self.fail_at, self.calls, self.prompts = scorer.score, fail_at, 0, []
        monkeypatch.setattr(scorer, "score", self)

    def __call__(self, prompts, images, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        self.prompts.extend(prompts)
        return self.real(prompts, images, **kwargs)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def _clean(scorer, items, tmp_path, **options) -> list[dict]:
    out = tmp_path / "clean"
    score_items(scorer, items, out, chunk_size=CHUNK, log=None, **options)
    return _rows(out)


def _interrupted(scorer, items, out: Path, monkeypatch, finished_chunks: int = 1, **options) -> None:
    """A run killed while scoring chunk ``finished_chunks`` (one score call per chunk at batch size 2)."""
    Counting(scorer, monkeypatch, fail_at=finished_chunks + 1)
    with pytest.raises(RuntimeError, match="killed"):
        score_items(scorer, items, out, chunk_size=CHUNK, log=None, **options)
    monkeypatch.undo()


def _part(out: Path, chunk: int) -> Path:
    return out / PARTS_DIR / f"{chunk:06d}.jsonl"


# -- (1) a killed run: only the unfinished chunks are scored, the result equals an uninterrupted run's -----------


def test_a_killed_run_resumes_with_only_the_unfinished_chunks(scorer, items, tmp_path, monkeypatch):
    clean = _clean(scorer, items, tmp_path)
    out = tmp_path / "run"
    _interrupted(scorer, items, out, monkeypatch, finished_chunks=2)
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == ["000000.jsonl", "000001.jsonl", RUN_FILE]
    counting, messages = Counting(scorer, monkeypatch), []
    rows = score_items(scorer, items, out, chunk_size=CHUNK, log=messages.append)
    assert counting.calls == 1 and counting.prompts == ["prompt 4"]  # chunks 0 and 1 are reused
    assert rows == clean and _rows(out) == clean
    assert (out / "scores.csv").read_bytes() == (tmp_path / "clean" / "scores.csv").read_bytes()
    assert "error" in rows[1] and "cannot open" in rows[1]["error"]  # the error record is reused as it was
    assert any("reused 4 of 5 items" in m for m in messages)
    assert not (out / PARTS_DIR).exists()
    drawn = [Path(r["overlay"]).name for r in clean if "overlay" in r]
    assert len(drawn) == 4 and sorted(p.name for p in (out / "overlays").iterdir()) == drawn


def test_a_run_killed_before_any_chunk_finished_scores_everything(scorer, items, tmp_path, monkeypatch):
    clean = _clean(scorer, items, tmp_path)
    out = tmp_path / "run"
    _interrupted(scorer, items, out, monkeypatch, finished_chunks=0)
    assert [p.name for p in (out / PARTS_DIR).iterdir()] == [RUN_FILE]
    counting, messages = Counting(scorer, monkeypatch), []
    assert score_items(scorer, items, out, chunk_size=CHUNK, log=messages.append) == clean
    assert counting.prompts == ["prompt 0", "prompt 2", "prompt 3", "prompt 4"]
    assert any("reused 0 of 5 items" in m for m in messages)


# -- (2) a damaged part file is scored again, and named --------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-25])


def _drop_last_row(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def _other_prompt(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["prompt"] = "something else"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _no_outcome(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[0]["scores"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe" + path.read_bytes())


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate, "not valid JSON"),
        (_drop_last_row, "1 rows, expected 2"),
        (_other_prompt, "row 1 is not item 0"),
        (_no_outcome, "row 1 has neither scores nor an error"),
        (_not_utf8, "not UTF-8"),
    ],
)
def test_a_damaged_part_file_is_scored_again(scorer, items, tmp_path, monkeypatch, damage, reason):
    clean = _clean(scorer, items, tmp_path)
    out = tmp_path / "run"
    _interrupted(scorer, items, out, monkeypatch, finished_chunks=2)
    damage(_part(out, 0))
    counting, messages = Counting(scorer, monkeypatch), []
    assert score_items(scorer, items, out, chunk_size=CHUNK, log=messages.append) == clean
    assert counting.prompts == ["prompt 0", "prompt 4"]  # chunk 0 (item 1 is an error record) and chunk 2
    (note,) = [m for m in messages if "000000.jsonl" in m]
    assert reason in note and "scored again" in note
    assert any("reused 2 of 5 items" in m for m in messages)


def test_a_part_whose_overlay_is_gone_is_scored_again(scorer, items, tmp_path, monkeypatch):
    clean = _clean(scorer, items, tmp_path)
    out = tmp_path / "run"
    _interrupted(scorer, items, out, monkeypatch, finished_chunks=2)
    (out / clean[2]["overlay"]).unlink()
    counting, messages = Counting(scorer, monkeypatch), []
    assert score_items(scorer, items, out, chunk_size=CHUNK, log=messages.append) == clean
    assert counting.prompts == ["prompt 2", "prompt 3", "prompt 4"]
    assert any("000001.jsonl" in m and "overlay" in m for m in messages)
    assert (out / clean[2]["overlay"]).is_file()


# -- (3) other inputs, another model or other options: the old parts are discarded, and the run says so ---------


def _other_model(scorer, items):
    scorer.identity = {"source": "elsewhere/model", "weights_hash": "0123456789abcdef"}
    return scorer, items, {}


def _other_weights(scorer, items):
    model, processor = build_rahf("rahf-tiny", variant="multi_head", seed=1)
    return RAHFScorer(model, processor, batch_size=2), items, {}


def _other_dtype(scorer, items):
    return RAHFScorer(scorer.model, scorer.processor, batch_size=2, dtype="bf16"), items, {}


def _changed_items(scorer, items):
    return scorer, [*items[:4], ScoreItem(items[4].image, "a changed prompt")], {}


def _reordered_items(scorer, items):
    return scorer, [items[2], items[3], items[0], items[1], items[4]], {}


def _other_max_side(scorer, items):
    return scorer, items, {"max_side": 512}


def _scores_only(scorer, items):
    return scorer, items, {"scores_only": True}


@pytest.mark.parametrize(
    "change, what",
    [
        (_other_model, "the model"),
        (_other_weights, "the model"),
        (_other_dtype, "the model"),
        (_changed_items, "the item list"),
        (_reordered_items, "the item list"),
        (_other_max_side, "max_side 1024 -> 512"),
        (_scores_only, "scores_only False -> True"),
    ],
)
def test_other_inputs_model_or_options_discard_the_parts(scorer, items, tmp_path, monkeypatch, change, what):
    out = tmp_path / "run"
    _interrupted(scorer, items, out, monkeypatch, finished_chunks=2)
    new_scorer, new_items, options = change(scorer, items)
    counting, messages = Counting(new_scorer, monkeypatch), []
    rows = score_items(new_scorer, new_items, out, chunk_size=CHUNK, log=messages.append, **options)
    assert counting.calls == 3 and sorted(counting.prompts) == sorted(
        it.prompt for it in new_items if it.image.exists()
    )
    (note,) = [m for m in messages if "discard" in m]
    assert what in note and "2 finished chunks" in note
    assert not any("reused" in m for m in messages)
    monkeypatch.undo()
    assert rows == _clean(new_scorer, new_items, tmp_path, **options)


def test_a_parts_folder_without_its_run_record_is_discarded(scorer, items, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted(scorer, items, out, monkeypatch, finished_chunks=2)
    (out / PARTS_DIR / RUN_FILE).write_text("{not json")
    counting, messages = Counting(scorer, monkeypatch), []
    score_items(scorer, items, out, chunk_size=CHUNK, log=messages.append)
    assert counting.calls == 3
    assert any("discard" in m and "no readable run record" in m for m in messages)
    (out / PARTS_DIR).mkdir()
    (out / PARTS_DIR / "000000.jsonl").write_text("{}\n")  # an older version's parts: no run record at all
    messages.clear()
    score_items(scorer, items, out, chunk_size=CHUNK, log=messages.append)
    assert counting.calls == 6 and any("discard" in m and "no readable run record" in m for m in messages)


# -- (4) a completed folder: the parts are gone, so a rerun scores everything again ---------------------------------


def test_a_completed_folder_is_scored_again_in_full(scorer, items, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = score_items(scorer, items, out, chunk_size=CHUNK, log=None)
    assert not (out / PARTS_DIR).exists()
    counting, messages = Counting(scorer, monkeypatch), []
    assert score_items(scorer, items, out, chunk_size=CHUNK, log=messages.append) == first
    assert counting.calls == 3 and len(counting.prompts) == 4
    assert messages == []


# -- the command: --chunk-size, and the reuse count it prints ---------------------------------------------------


def test_cli_resumes_and_prints_the_reused_count(items, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["score", "--out", str(out), "--chunk-size", "2", "--batch-size", "2", "--scores-only"]
    args += ["--prompt", "a square", "--image", *[str(it.image) for it in items]]
    real, calls = RAHFScorer.score, []

    def score(self, prompts, images, **kwargs):
        calls.append(len(images))
        if len(calls) == 2 and kill:
            raise RuntimeError("killed")
        return real(self, prompts, images, **kwargs)

    monkeypatch.setattr(RAHFScorer, "score", score)
    kill = True
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    kill = False
    assert main(args) == 1  # item 1's image is missing
    assert calls == [1, 2, 2, 1]  # chunk 0 once; chunk 1 killed, then chunks 1 and 2
    text = capsys.readouterr().out
    assert "reused 2 of 5 items" in text
    assert [r["prompt"] for r in _rows(out)] == ["a square"] * 5 and not (out / PARTS_DIR).exists()
    assert main([*args, "--chunk-size", "0"]) == 2
