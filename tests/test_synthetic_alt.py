"""The second synthetic world (validation only): determinism, exact maps and labels, rates, readability, and that it
differs from the first world."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from rahf.data import synthetic, synthetic_alt
from rahf.data.richhf import read_split
from rahf.data.synthetic_alt import (
    COLOURS,
    COUNTS,
    DEFAULT_RATES,
    KINDS,
    SIZES,
    AltFlawRates,
    compose,
    footprint,
    generate,
    prompt_of,
    rasterise,
    sample_groups,
    sample_of,
    scenes,
    write_split,
)
from rahf.words import prompt_words
from richfeedback.cli import main

NONE = AltFlawRates(melted=0, broken=0, duplicated=0, missing=0, wrong_size=0, colour_swap=0)


def _files(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _scene(i: int, rates: AltFlawRates, size: int = 64):
    rng = np.random.default_rng([i, 99])
    groups, relation, sky = sample_groups(rng)
    return compose(rng, groups, relation, sky, size=size, rates=rates)


def _two_group_scene(rates: AltFlawRates, size: int = 64, start: int = 0, distinct_colours: bool = False):
    for i in range(start, start + 200):
        rng = np.random.default_rng([i, 99])
        groups, relation, sky = sample_groups(rng)
        if len(groups) == 2 and (not distinct_colours or groups[0].colour != groups[1].colour):
            return compose(rng, groups, relation, sky, size=size, rates=rates)
    raise AssertionError("no two-group scene")


def test_same_seed_same_bytes_and_prefix_stable(tmp_path):
    write_split(tmp_path / "a", "dev", 4, size=128, seed=5)
    write_split(tmp_path / "b", "dev", 4, size=128, seed=5)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len(a) == 4 + 2  # 4 images, the tfrecord and the jsonl
    longer = list(generate(6, size=128, seed=5, split="dev"))
    for s, row in zip(longer, (tmp_path / "a" / "dev.jsonl").read_text().splitlines()):
        assert json.loads(row)["prompt"] == s.prompt
    other = list(generate(4, size=128, seed=6, split="dev"))
    assert [s.prompt for s in other] != [s.prompt for s in longer[:4]]
    test_split = list(generate(4, size=128, seed=5, split="test"))
    assert [s.prompt for s in test_split] != [s.prompt for s in longer[:4]]


def test_a_flawless_scene_has_empty_maps_and_full_scores():
    for i in range(6):
        scene = _scene(i, NONE, size=128)
        s = sample_of(scene)
        assert s.flaws == [] and s.example.word_labels == [1] * len(prompt_words(s.prompt))
        assert s.image.size == (128, 128)
        for m in s.example.heatmaps.values():
            assert m.shape == (128, 128) and m.max() == 0.0
        assert s.example.scores["plausibility"] == 1.0 and s.example.scores["alignment"] == 1.0
        assert s.example.scores["aesthetics"] == pytest.approx(
            synthetic_alt.SKIES[scene.sky][2] - 0.06 * max(0, len(scene.objects) - 4)
        )


@pytest.mark.parametrize("kind", ["melted", "broken"])
def test_an_artifact_changes_pixels_only_inside_its_implausibility_map(kind):
    rates = replace(NONE, **{kind: 1.0})
    for i in range(5):
        scene = _scene(i, rates)
        clean = replace(scene, objects=[replace(o, melted=None, broken=None) for o in scene.objects], flaws=[])
        img, impl, mis = rasterise(scene)
        img0, impl0, _ = rasterise(clean)
        diff = np.abs(np.asarray(img, np.int16) - np.asarray(img0, np.int16)).max(axis=2)
        assert impl0.max() == 0 and mis.max() == 0
        assert (diff > 0).any() and not (diff[impl == 0] > 0).any()  # changed somewhere, never outside the map
        assert (diff[impl > 0] > 10).mean() > 0.05  # and visibly so inside it
        assert sorted(f.split(":")[0] for f in scene.flaws) == [kind] * len(scene.objects)
        s = sample_of(scene)
        assert s.example.word_labels == [1] * len(prompt_words(s.prompt))
        a = float(impl.mean())
        n = len(scene.objects)
        expected = 1 - (0.12 if kind == "melted" else 0.08) * n - 2.5 * a
        assert s.example.scores["plausibility"] == pytest.approx(max(0.0, expected), abs=1e-6)


def _misaligned_words(scene):
    words, _ = prompt_of(scene.groups, scene.relation, scene.sky)
    s = sample_of(scene)
    assert len(s.example.word_labels) == len(words) == len(prompt_words(s.prompt))
    return s, sorted(words[k] for k, lab in enumerate(s.example.word_labels) if lab == 0)


def _expected_map(scene):
    """The misalignment map from first principles: the footprints of the objects flagged misaligned."""
    s = scene.size * synthetic_alt.SUPERSAMPLE
    hi = np.zeros((s, s), bool)
    for o in scene.objects:
        if o.misaligned:
            hi |= footprint(o, s)
    k = synthetic_alt.SUPERSAMPLE
    return hi.reshape(scene.size, k, scene.size, k).mean(axis=(1, 3))


def test_wrong_size_marks_the_size_word_and_its_objects():
    for i in range(6):
        scene = _scene(i, replace(NONE, wrong_size=1.0))
        s, marked = _misaligned_words(scene)
        assert marked == sorted(g.size for g in scene.groups)
        for o in scene.objects:
            asked = SIZES[scene.groups[o.group].size]
            assert o.misaligned and o.r != pytest.approx(asked * scene.size * synthetic_alt.SUPERSAMPLE)
        assert np.array_equal(s.example.heatmaps["misalignment"], _expected_map(scene))
        assert s.example.heatmaps["implausibility"].max() == 0 and s.example.heatmaps["misalignment"].max() == 1.0


def test_colour_swap_marks_both_colour_words_and_all_objects():
    scene = _two_group_scene(replace(NONE, colour_swap=1.0), distinct_colours=True)
    s, marked = _misaligned_words(scene)
    assert marked == sorted(g.colour for g in scene.groups) and scene.flaws == ["colour_swap"]
    for o in scene.objects:
        assert o.misaligned and o.colour == scene.groups[1 - o.group].colour
    assert np.array_equal(s.example.heatmaps["misalignment"], _expected_map(scene))
    # the same prompt with one colour for both groups cannot be swapped
    same = replace(scene.groups[1], colour=scene.groups[0].colour)
    rng = np.random.default_rng(0)
    flat = compose(rng, [scene.groups[0], same], scene.relation, scene.sky, size=64, rates=replace(NONE, colour_swap=1))
    assert flat.flaws == [] and flat.misaligned_words == []


def test_duplicated_and_missing_mark_the_count_words():
    for i in range(6):
        scene = _scene(i, replace(NONE, duplicated=1.0))
        s, marked = _misaligned_words(scene)
        assert marked == sorted(COUNTS[g.count] for g in scene.groups)
        per_group = [sum(o.group == gi for o in scene.objects) for gi in range(len(scene.groups))]
        assert per_group == [g.count + 1 for g in scene.groups]
        dup = [o for o in scene.objects if o.misaligned]
        assert len(dup) == len(scene.groups)  # exactly the copy of each group is marked
        for d in dup:
            twin = [o for o in scene.objects if not o.misaligned and o.group == d.group][-1]
            assert (d.kind, d.colour, d.r, d.rot) == (twin.kind, twin.colour, twin.r, twin.rot)
        assert np.array_equal(s.example.heatmaps["misalignment"], _expected_map(scene))

        scene = _scene(i, replace(NONE, missing=1.0))
        s, marked = _misaligned_words(scene)
        expected = []
        for g in scene.groups:
            plural = g.kind + ("s" if g.count > 1 else "")
            expected += [COUNTS[g.count], plural] + ([g.size, g.colour] if g.count == 1 else [])
        assert marked == sorted(expected)
        per_group = [sum(o.group == gi for o in scene.objects) for gi in range(len(scene.groups))]
        assert per_group == [g.count - 1 for g in scene.groups]
        assert s.example.heatmaps["misalignment"].max() == 0  # nothing drawn to point at


def test_scores_follow_the_documented_rules():
    weights = synthetic_alt.WORD_WEIGHTS
    for s in generate(40, size=64, seed=3, split="train"):
        scene = s.scene
        _, roles = prompt_of(scene.groups, scene.relation, scene.sky)
        content = sum(weights.get(r.split(":")[0], 0.0) for r in roles)
        lost = sum(weights[roles[k].split(":")[0]] for k in scene.misaligned_words)
        sc = s.example.scores
        assert sc["alignment"] == pytest.approx(1 - lost / content)
        p, a, e = sc["plausibility"], sc["alignment"], sc["aesthetics"]
        assert sc["overall"] == pytest.approx(max(0.0, 0.3 * p + 0.5 * a + 0.2 * e - 0.1 * (p < 0.75 and a < 0.75)))
        assert all(0.0 <= v <= 1.0 for v in sc.values())


@pytest.mark.parametrize("rates", [DEFAULT_RATES, AltFlawRates(0.3, 0.2, 0.3, 0.2, 0.4, 0.7)], ids=["default", "high"])
def test_flaw_rates_over_500_scenes_match_the_rates(rates):
    trials: dict[str, int] = {}
    hits: dict[str, int] = {}
    two_groups = 0
    for scene in scenes(500, size=128, seed=0, split="train", rates=rates):
        two_groups += len(scene.groups) == 2
        for k, (t, h) in synthetic_alt.flaw_trials(scene).items():
            trials[k] = trials.get(k, 0) + t
            hits[k] = hits.get(k, 0) + h
    expected = rates.to_dict()
    assert set(trials) == set(expected)
    for k, p in expected.items():
        sd = (p * (1 - p) / trials[k]) ** 0.5  # fixed seed: deterministic, so 3 sd is a safe, tight bound
        assert trials[k] > 150 and abs(hits[k] / trials[k] - p) < 3 * sd, (k, hits[k], trials[k], p)
    assert abs(two_groups / 500 - synthetic_alt.TWO_GROUPS) < 3 * (0.24 / 500) ** 0.5
    assert DEFAULT_RATES.to_dict() == {
        "melted": 0.12,
        "broken": 0.1,
        "duplicated": 0.12,
        "missing": 0.1,
        "wrong_size": 0.15,
        "colour_swap": 0.3,
    }  # the rates the docs state


def test_split_reads_back_for_training(tmp_path):
    from rahf.presets import build_rahf
    from rahf.train import load_split

    write_split(tmp_path, "train", 5, seed=1)
    records, skipped = read_split(tmp_path, "train")
    assert skipped == 0 and len(records) == 5
    samples = list(generate(5, seed=1, split="train"))
    for rec, s in zip(records, samples):
        assert rec.prompt == s.prompt and rec.example.word_labels == s.example.word_labels
        assert rec.example.heatmaps["implausibility"].shape == (128, 128)
        np.testing.assert_allclose(
            rec.example.heatmaps["misalignment"], s.example.heatmaps["misalignment"], atol=0.5 / 255
        )
        assert rec.example.scores == pytest.approx(s.example.scores)
    _, processor = build_rahf("rahf-tiny", seed=0)
    data = load_split(tmp_path, "train", processor)
    batch = data.batch([0, 4])
    assert batch.pixels.shape[0] == 2 and batch.heatmaps["implausibility"].shape == (2, 64, 64)
    assert batch.targets[0] == processor.keyword_target(samples[0].prompt, samples[0].example.word_labels)


def test_the_two_worlds_differ():
    alt = list(generate(60, seed=0))
    first = list(synthetic.generate(60, seed=0))
    assert alt[0].image.size == (128, 128) and first[0].image.size == (64, 64)
    alt_words = {w for s in alt for w in prompt_words(s.prompt)}
    first_words = {w for s in first for w in prompt_words(s.prompt)}
    assert not {k for k in KINDS} & {k.removesuffix("s") for k in first_words}
    assert not set(KINDS) & set(synthetic.SHAPES) and set(COLOURS) != set(synthetic.COLOURS)
    assert len(alt_words & first_words) <= 6  # shared function words and colours only
    for s in alt[:10]:
        with pytest.raises(ValueError):
            synthetic.parse_prompt(s.prompt)
    assert {f.split(":")[0] for s in alt for f in s.flaws} <= set(DEFAULT_RATES.to_dict())


def test_prompt_words_are_known_to_the_offline_tokenizer():
    from rahf.tokenizer import build_offline_t5_tokenizer

    tok = build_offline_t5_tokenizer()
    words = {w for s in generate(60, size=64, seed=0) for w in prompt_words(s.prompt)}
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        # whole words are one piece; plurals a word plus "s"
        assert len(ids) == 1 or tok.convert_ids_to_tokens(ids) == ["▁" + w[:-1], "s"], (w, ids)


def test_synth_world_flag_writes_the_alt_world(tmp_path):
    assert main(["synth", "--world", "alt", "--out", str(tmp_path), "--train", "3", "--dev", "0", "--test", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [s.prompt for s in generate(3, seed=0, split="train")]
    records, _ = read_split(tmp_path, "test")
    assert len(records) == 2 and records[0].example.heatmaps["misalignment"].shape == (128, 128)
    assert not (tmp_path / "dev.tfrecord").exists()


def test_writing_a_split_keeps_no_earlier_sample_in_memory(tmp_path):
    """The maps of a 128 px split are 4x the first world's: samples are written as they come, never gathered."""
    import gc
    import weakref

    refs: list = []
    dead_at: list[bool] = []

    def samples():
        for s in generate(6, size=32, seed=0, split="dev"):
            gc.collect()
            dead_at.append(len(refs) < 2 or refs[-2]() is None)
            refs.append(weakref.ref(s.example.heatmaps["implausibility"]))
            yield s

    path = synthetic.write_samples(tmp_path, "dev", samples())
    records, skipped = read_split(tmp_path, "dev")
    assert path == tmp_path / "dev.tfrecord" and len(records) == 6 and skipped == 0
    assert dead_at == [True] * 6
