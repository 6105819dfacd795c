"""A T5-style tokenizer built without the model hub, for the offline presets.

A SentencePiece-style Unigram model is built with the ``tokenizers`` library from a fixed, embedded vocabulary
of text-to-image prompt words (plus every printable ASCII character and the ``_0`` misalignment suffix), then
wrapped as ``T5TokenizerFast``: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``</s>`` appended, characters never
seen map to ``<unk>`` rather than to the end token. No training step is involved, so the result is identical on every
machine; it is saved with the model, so a trained ``rahf-tiny`` always reloads with the tokenizer it was trained with.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5TokenizerFast

_OBJECTS = [
    "cat",
    "dog",
    "horse",
    "bird",
    "fish",
    "cow",
    "sheep",
    "elephant",
    "giraffe",
    "zebra",
    "bear",
    "lion",
    "tiger",
    "fox",
    "rabbit",
    "owl",
    "duck",
    "frog",
    "man",
    "woman",
    "girl",
    "boy",
    "child",
    "person",
    "people",
    "baby",
    "astronaut",
    "knight",
    "robot",
    "wizard",
    "dragon",
    "monster",
    "car",
    "truck",
    "bus",
    "bicycle",
    "motorcycle",
    "train",
    "boat",
    "ship",
    "plane",
    "airplane",
    "rocket",
    "house",
    "castle",
    "tower",
    "bridge",
    "tree",
    "flower",
    "rose",
    "forest",
    "mountain",
    "river",
    "lake",
    "ocean",
    "beach",
    "desert",
    "sky",
    "cloud",
    "sun",
    "moon",
    "star",
    "city",
    "street",
    "apple",
    "banana",
    "orange",
    "cake",
    "pizza",
    "cup",
    "bottle",
    "chair",
    "table",
    "bed",
    "lamp",
    "clock",
    "book",
    "guitar",
    "piano",
    "umbrella",
    "hat",
    "shoe",
    "dress",
    "shirt",
    "glasses",
    "hand",
    "hands",
    "face",
    "eye",
    "eyes",
    "hair",
    "finger",
    "fingers",
    "leg",
    "legs",
    "circle",
    "square",
    "triangle",
    "ball",
    "box",
    "cube",
    "sphere",
    "ring",
    "key",
    "door",
    "window",
    "garden",
    "road",
    "field",
    "snow",
    "rain",
    "fire",
    "water",
]
_ADJECTIVES = [
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "brown",
    "gray",
    "grey",
    "golden",
    "silver",
    "big",
    "small",
    "large",
    "tiny",
    "tall",
    "short",
    "old",
    "young",
    "happy",
    "sad",
    "beautiful",
    "cute",
    "scary",
    "dark",
    "bright",
    "shiny",
    "wooden",
    "metal",
    "glass",
    "plastic",
    "realistic",
    "detailed",
    "cinematic",
    "photorealistic",
    "painted",
    "digital",
    "fantasy",
    "futuristic",
    "ancient",
    "modern",
    "vintage",
    "colorful",
    "sunny",
    "cloudy",
    "misty",
    "snowy",
    "rainy",
]
_RELATIONS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "under",
    "above",
    "below",
    "beside",
    "near",
    "next",
    "to",
    "with",
    "and",
    "or",
    "at",
    "behind",
    "in",
    "front",
    "holding",
    "wearing",
    "riding",
    "eating",
    "sitting",
    "standing",
    "running",
    "flying",
    "swimming",
    "sleeping",
    "jumping",
    "playing",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "center",
    "two",
    "three",
    "four",
    "five",
    "many",
    "one",
    "several",
]
_STYLE = [
    "photo",
    "photograph",
    "painting",
    "drawing",
    "sketch",
    "illustration",
    "render",
    "portrait",
    "landscape",
    "closeup",
    "macro",
    "art",
    "style",
    "artstation",
    "trending",
    "4k",
    "8k",
    "hd",
    "high",
    "quality",
    "unreal",
    "engine",
    "octane",
    "oil",
    "watercolor",
    "anime",
    "by",
    "nikon",
    "canon",
    "lens",
    "35mm",
    "50mm",
]


def tokenizer_pieces() -> list[tuple[str, float]]:
    """The fixed Unigram vocabulary: specials, whole words, the ``_0`` suffix, and single characters.

    Log-probabilities favour whole words over character spellings, so known words encode as one piece and
    anything else still encodes, character by character.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    add("_0", -2.0)
    for word in sorted(set(_OBJECTS + _ADJECTIVES + _RELATIONS + _STYLE)):
        add("▁" + word, -4.0)
        add(word, -6.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        add("▁" + char, -11.0)
        add(char, -10.0)
    return pieces


def build_offline_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """Build the Unigram tokenizer of :func:`tokenizer_pieces` and wrap it as ``T5TokenizerFast``.

    Accents are stripped (``Ü`` -> ``U``); characters outside printable ASCII become ``<unk>``.

    Args:
        model_max_length: the tokenizer's length limit (the model truncates further, see RAHFConfig).
    """
    tok = Tokenizer(models.Unigram(tokenizer_pieces(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKD(), normalizers.StripAccents(), normalizers.Replace(Regex(r"\s+"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        extra_ids=0,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
