"""RAHFProcessor: the RichHF-18K word rule, keyword sequences, image conversion of every kind, tokenizer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rahf.processor import InvalidImageError, RAHFProcessor, clean_prompt, load_image, prompt_words, to_rgb
from rahf.tokenizer import build_offline_t5_tokenizer


@pytest.fixture(scope="module")
def proc() -> RAHFProcessor:
    return RAHFProcessor(build_offline_t5_tokenizer(), image_size=32, max_text_tokens=16)


def test_word_rule():
    assert prompt_words('A cat, sleeping. "on" a mat?! ;:') == ["A", "cat", "sleeping", "on", "a", "mat"]
    assert clean_prompt("  photo of   a  dog\n4k ") == "photo of a dog 4k"
    assert clean_prompt("...") == ""
    with pytest.raises(TypeError):
        prompt_words(None)  # type: ignore[arg-type]


def test_keyword_target_and_parse(proc):
    target = proc.keyword_target("a yellow cat, sleeping", [1, 0, 1, 0])
    assert target == "a yellow_0 cat sleeping_0"
    assert proc.misaligned_keywords(target) == ["yellow", "sleeping"]
    assert proc.misaligned_keywords("a cat _0 dog") == []
    with pytest.raises(ValueError, match="3 words but 2 labels"):
        proc.keyword_target("a yellow cat", [1, 0])


def test_keyword_sequence_survives_tokenizer_round_trip(proc):
    target = "a yellow_0 cat on a blue_0 mat"
    ids = proc.tokenize_targets([target])
    assert proc.decode_keywords(ids.clamp(min=0)) == [target]
    # Ids beyond the tokenizer (possible from a larger LM head) are dropped, not a crash.
    extra = torch.cat([ids.clamp(min=0), torch.tensor([[10_000]])], dim=1)
    assert proc.decode_keywords(extra) == [target]


def test_target_ids_pad_with_ignore_index(proc):
    ids = proc.tokenize_targets(["a cat", "a red_0 cat on a mat"])
    assert (ids[0] == -100).sum() > 0 and (ids[1] == -100).sum() == 0
    assert ids[0, (ids[0] != -100).sum() - 1] == proc.tokenizer.eos_token_id


def test_image_tensor_shape_and_range(proc):
    white = proc.preprocess_image(Image.new("RGB", (7, 5), (255, 255, 255)))
    black = proc.preprocess_image(Image.new("RGB", (300, 100), (0, 0, 0)))
    assert white.shape == (3, 32, 32) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1", "I;16", "I", "F", "YCbCr", "RGBX"])
def test_every_mode_becomes_rgb(proc, mode):
    base = Image.new("RGB", (9, 6), (200, 40, 10))
    if mode in ("I;16", "I"):
        img = Image.fromarray(np.full((6, 9), 32768, dtype=np.uint16 if mode == "I;16" else np.int32))
        assert img.mode == mode
    elif mode == "F":
        img = Image.fromarray(np.full((6, 9), 0.5, dtype=np.float32))
    else:
        img = base.convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (9, 6)
    if mode in ("I;16", "I", "F"):
        assert np.asarray(rgb)[0, 0].tolist() == [128, 128, 128]
    assert proc.preprocess_image(img).shape == (3, 32, 32)


def test_transparency_composites_over_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    arr = np.asarray(to_rgb(img))
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[1, 1].tolist() == [255, 255, 255]


def test_sixteen_bit_png_round_trip(tmp_path):
    arr = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    rgb = np.asarray(to_rgb(load_image(path)))
    assert rgb[0, 0, 0] == 0 and rgb[3, 3, 0] == 255


def test_one_pixel_image(proc):
    x = proc.preprocess_image(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert torch.allclose(x[0], torch.ones(32, 32)) and torch.allclose(x[1], -torch.ones(32, 32))


def test_corrupt_and_missing_images_raise_clear_errors(tmp_path):
    with pytest.raises(InvalidImageError, match="cannot decode image"):
        load_image(b"\x89PNG\r\n\x1a\n not really")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(InvalidImageError, match=r"cut\.png"):
        load_image(truncated)
    with pytest.raises(InvalidImageError, match="cannot open image"):
        load_image(tmp_path / "absent.png")


def test_tokenizer_is_deterministic_and_maps_unknown_to_unk(tmp_path):
    a, b = build_offline_t5_tokenizer(), build_offline_t5_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    ids = a("a cat 日本")["input_ids"]
    assert ids[-1] == a.eos_token_id and ids.count(a.eos_token_id) == 1
    assert a.unk_token_id in ids
    a.save_pretrained(tmp_path)
    proc = RAHFProcessor(a, image_size=32)
    proc.save_pretrained(tmp_path)
    again = RAHFProcessor.from_pretrained(tmp_path)
    assert again.tokenizer("a red_0 cat")["input_ids"] == a("a red_0 cat")["input_ids"]
    assert again.image_size == 32


def test_tokenize_truncates_long_prompts_and_reports_it(proc):
    batch = proc.tokenize(["a cat", "a red cat " * 40, ""])
    assert batch.input_ids.shape[1] == 16
    assert batch.truncated == [False, True, False]
    assert batch.input_ids[2, 0] == proc.tokenizer.eos_token_id and int(batch.attention_mask[2].sum()) == 1


def test_tokenize_tasks_shape(proc):
    batch = proc.tokenize_tasks(["a cat", "two red dogs"], ["plausibility score:", "misaligned keywords:"])
    assert batch.input_ids.shape[:2] == (2, 2)
    first = proc.tokenize(["a cat"], "plausibility score:")
    n = first.input_ids.shape[1]
    assert torch.equal(batch.input_ids[0, 0, :n], first.input_ids[0])


def test_keyword_budget_covers_every_word_marked(proc):
    """The per-prompt decoding budget fits the longest possible target: every word carrying the suffix."""
    prompts = ["a cat", "a red cat on a mat with two dogs"]
    batch = proc.tokenize(prompts)
    budgets = proc.keyword_budgets(batch, limit=1000)
    for prompt, budget in zip(prompts, budgets):
        worst = proc.keyword_target(prompt, [0] * len(prompt_words(prompt)))
        assert len(proc.tokenizer(worst)["input_ids"]) <= budget
    assert budgets[0] < budgets[1]
    assert proc.keyword_budgets(batch, limit=5) == [5, 5]


def test_swap_word_changes_exactly_one_word_of_its_class():
    from rahf.data.synthetic import SWAP_CLASSES, parse_prompt
    from rahf.words import swap_word

    prompt = "two red circles at the left and a blue square in the middle"
    rng = np.random.default_rng(0)
    edits = [swap_word(prompt, SWAP_CLASSES, rng) for _ in range(200)]
    words = prompt.split()
    changed = set()
    for e in edits:
        diff = [i for i, (a, b) in enumerate(zip(words, e.split(), strict=True)) if a != b]
        assert len(diff) == 1
        i = diff[0]
        changed.add(i)
        cls = next(c for c in SWAP_CLASSES if words[i] in c)
        assert e.split()[i] in cls  # a colour for a colour, a plural shape for a plural shape
        parse_prompt(e)  # still a prompt of the grammar
    assert changed == {0, 1, 2, 8, 9}  # every swappable word is drawn ("a" has no partner)
    # the same generator state gives the same edits (exact resume); no swappable word gives None
    assert swap_word(prompt, SWAP_CLASSES, np.random.default_rng(5)) == swap_word(
        prompt, SWAP_CLASSES, np.random.default_rng(5)
    )
    assert swap_word("A cat, sleeping.", SWAP_CLASSES, rng) is None
    assert swap_word("A Red cat", [["red", "blue"]], rng) == "A blue cat"  # case-insensitive match
