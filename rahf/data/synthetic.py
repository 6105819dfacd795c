"""A synthetic rich-feedback world: procedurally rendered scenes with known flaws and exact ground truth.

RichHF-18K's images and pretrained weights cannot be had offline, so this renderer produces examples in the same
schema whose answers are known exactly. It needs numpy and PIL only (no torch), so generator backends can use it.

Prompt grammar: one or two object groups joined by ``and``; a group is ``<count> <colour> <shape>[s] <place>``,
for example ``two red circles at the left and a blue square at the bottom``.

Flaws, sampled from a :class:`FlawModel` (the world's "generator parameters"):

* distortion (implausibility): a spiky, noisy blotch over part of one object; its region is the implausibility
  map;
* wrong colour (misalignment): one group drawn in another colour; its objects are the misalignment map and its
  colour word is misaligned;
* missing object: one object of a group not drawn; the count and shape words are misaligned, the map is empty
  where nothing was drawn (as annotators cannot point at an absent object);
* extra object: one more object than the count says; it is the misalignment map and the count word is
  misaligned.

A missing and an extra object in the same group cancel in the image (the group is drawn with the prompt's count)
but not in the labels: :func:`cancelled_groups` finds them and :func:`visible_scores` gives the scores of what the
image shows, the ceiling of a model that sees only the image (about 2 % of images at the default rates).

Scores (all in [0, 1], higher is better), from the flaws alone:

* plausibility = 1 − min(1, 6 · A_impl), A_impl = implausible fraction of the image;
* alignment = 1 − misaligned words / content words (count, colour and shape words);
* aesthetics = clip(0.9 − 3 · A_impl − 0.1 · max(0, objects − 3), 0, 1);
* overall = 0.4 · plausibility + 0.4 · alignment + 0.2 · aesthetics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rahf.data.richhf import RichHFExample, example_features
from rahf.data.tfrecord import encode_example, write_records

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
PLACES = {  # phrase -> centre of the region objects are scattered in, as fractions of (x, y)
    "at the left": (0.27, 0.5),
    "at the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the middle": (0.5, 0.5),
}
COUNTS = {1: "a", 2: "two", 3: "three"}
#: Interchangeable words of the grammar, for edited-prompt ITM negatives (``rahf.words.swap_word``): a swap
#: keeps the prompt grammatical and changes exactly one thing it asks of the image.
SWAP_CLASSES: tuple[tuple[str, ...], ...] = (
    tuple(COLOURS),
    SHAPES,
    tuple(s + "s" for s in SHAPES),
    ("two", "three"),
)
BACKGROUNDS = ((200, 220, 235), (225, 215, 195), (205, 230, 205), (230, 225, 235))
_SCALE = 2  # scenes are drawn at twice the image size and downsampled, for smooth edges


@dataclass
class FlawModel:
    """Probabilities of each flaw; ``distortion`` is per shape (the concept-level parameter that ``fit`` moves)."""

    distortion: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SHAPES, 0.4))
    wrong_colour: float = 0.2
    missing: float = 0.15
    extra: float = 0.15

    def __post_init__(self) -> None:
        rates = {**{f"distortion[{k}]": v for k, v in self.distortion.items()}, "wrong_colour": self.wrong_colour}
        rates |= {"missing": self.missing, "extra": self.extra}
        if set(self.distortion) != set(SHAPES):
            raise ValueError(f"distortion needs a rate for each of {SHAPES}, got {sorted(self.distortion)}")
        bad = {k: v for k, v in rates.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"flaw rates must lie in [0, 1]: {bad}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlawModel:
        return cls(dict(d["distortion"]), d["wrong_colour"], d["missing"], d["extra"])


@dataclass
class Group:
    count: int
    colour: str
    shape: str
    place: str


@dataclass
class SceneObject:
    """One drawn object, in the renderer's drawing coordinates (twice the image size)."""

    shape: str
    colour: str  # the colour it is drawn in (differs from the prompt's under a wrong-colour flaw)
    x: float
    y: float
    r: float
    group: int
    misaligned: bool = False  # drawn in the misalignment map (wrong colour, or the extra object)
    distortion: int | None = None  # seed of its implausible blotch; None = clean


@dataclass
class Scene:
    """Everything a rendered image is made of; re-rendering it gives the same pixels and ground truth."""

    size: int
    background: tuple[int, int, int]
    groups: list[Group]
    objects: list[SceneObject]
    misaligned_words: list[int]
    flaws: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        d = json.loads(text)
        return cls(
            d["size"],
            tuple(d["background"]),
            [Group(**g) for g in d["groups"]],
            [SceneObject(**o) for o in d["objects"]],
            list(d["misaligned_words"]),
            list(d["flaws"]),
        )


@dataclass
class SyntheticSample:
    """An image, its prompt, and its exact RichHF-style ground truth."""

    image: Image.Image
    prompt: str
    example: RichHFExample
    flaws: list[str]
    scene: Scene | None = None


def sample_groups(rng: np.random.Generator) -> list[Group]:
    n = 1 if rng.random() < 0.5 else 2
    places = rng.permutation(list(PLACES))[:n]
    return [
        Group(int(rng.integers(1, 4)), str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(p)) for p in places
    ]


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of the grammar, the same for the same seed."""
    rng = np.random.default_rng([seed, 7])
    out: list[str] = []
    for _ in range(100 * n):
        p = " ".join(prompt_of(sample_groups(rng))[0])
        if p not in out:
            out.append(p)
        if len(out) == n:
            return out
    raise ValueError(f"could not draw {n} distinct prompts")


def prompt_of(groups: list[Group]) -> tuple[list[str], list[str]]:
    """Words of the prompt and, per word, its role: ``count:i``, ``colour:i``, ``shape:i`` or ``other``."""
    words, roles = [], []
    for i, g in enumerate(groups):
        if i:
            words.append("and")
            roles.append("other")
        shape = g.shape + ("s" if g.count > 1 else "")
        words += [COUNTS[g.count], g.colour, shape, *g.place.split()]
        roles += [f"count:{i}", f"colour:{i}", f"shape:{i}"] + ["other"] * len(g.place.split())
    return words, roles


def parse_prompt(prompt: str) -> list[Group]:
    """The groups of a prompt of the grammar (inverse of :func:`prompt_of`); ValueError names what is off."""
    words = prompt.strip().lower().split()
    groups, i = [], 0
    numbers = {w: n for n, w in COUNTS.items()}
    while i < len(words):
        if groups:
            if words[i] != "and":
                raise ValueError(f"prompt {prompt!r}: expected 'and' at word {i}, got {words[i]!r}")
            i += 1
        if len(words) < i + 3:
            raise ValueError(f"prompt {prompt!r}: a group needs '<count> <colour> <shape> <place>'")
        count, colour, shape = words[i : i + 3]
        if count not in numbers or colour not in COLOURS or shape.removesuffix("s") not in SHAPES:
            raise ValueError(f"prompt {prompt!r}: {count!r} {colour!r} {shape!r} is not '<count> <colour> <shape>'")
        place = next((p for p in PLACES if words[i + 3 : i + 3 + len(p.split())] == p.split()), None)
        if place is None:
            raise ValueError(f"prompt {prompt!r}: no place ({', '.join(PLACES)}) after word {i + 2}")
        groups.append(Group(numbers[count], colour, shape.removesuffix("s"), place))
        i += 3 + len(place.split())
    if not groups:
        raise ValueError("empty prompt")
    return groups


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None  # circle: drawn as an ellipse


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _positions(
    rng: np.random.Generator, place: str, n: int, size: int, r: float, taken: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Centres for ``n`` objects around a place, kept apart from each other and from ``taken`` (updated)."""
    fx, fy = PLACES[place]
    out = []
    for _ in range(n):
        for _attempt in range(50):
            x = float(np.clip((fx + rng.uniform(-0.17, 0.17)) * size, r, size - r))
            y = float(np.clip((fy + rng.uniform(-0.17, 0.17)) * size, r, size - r))
            if all((x - a) ** 2 + (y - b) ** 2 > (2.3 * r) ** 2 for a, b in taken):
                break
        out.append((x, y))
        taken.append((x, y))
    return out


def compose(rng: np.random.Generator, groups: list[Group], size: int = 64, flaws: FlawModel | None = None) -> Scene:
    """Lay out the objects of ``groups`` and draw every flaw from ``flaws``; everything derives from ``rng``."""
    flaws = flaws or FlawModel()
    _, roles = prompt_of(groups)
    misaligned: set[int] = set()
    applied: list[str] = []
    s = size * _SCALE
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    objects: list[SceneObject] = []
    taken: list[tuple[float, float]] = []
    r = s * 0.075
    for gi, g in enumerate(groups):
        colour = g.colour
        wrong = rng.random() < flaws.wrong_colour
        if wrong:
            colour = str(rng.choice([c for c in COLOURS if c != g.colour]))
            misaligned.add(roles.index(f"colour:{gi}"))
            applied.append(f"wrong_colour:{gi}")
        n_draw = g.count
        if g.count > 1 and rng.random() < flaws.missing:
            n_draw -= 1
            misaligned.update({roles.index(f"count:{gi}"), roles.index(f"shape:{gi}")})
            applied.append(f"missing:{gi}")
        extra = rng.random() < flaws.extra
        if extra:
            misaligned.add(roles.index(f"count:{gi}"))
            applied.append(f"extra:{gi}")
        positions = _positions(rng, g.place, n_draw + int(extra), s, r, taken)
        for k, (x, y) in enumerate(positions):
            mis = wrong or (extra and k == len(positions) - 1)
            objects.append(SceneObject(g.shape, colour, x, y, r, gi, mis))
    for obj in objects:
        if rng.random() < flaws.distortion[obj.shape]:
            obj.distortion = int(rng.integers(2**31))
            applied.append(f"distortion:{obj.shape}")
    return Scene(size, background, groups, objects, sorted(misaligned), applied)


def rasterise(scene: Scene) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """The scene's image and its exact implausibility and misalignment maps ((size, size) float in [0, 1])."""
    s = scene.size * _SCALE
    image = Image.new("RGB", (s, s), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    mis_mask = Image.new("L", (s, s), 0)
    mis_draw = ImageDraw.Draw(mis_mask)
    for o in scene.objects:
        _draw(draw, o.shape, o.x, o.y, o.r, COLOURS[o.colour])
        if o.misaligned:
            _draw(mis_draw, o.shape, o.x, o.y, o.r * 1.1, 255)
    impl_mask = Image.new("L", (s, s), 0)
    for o in scene.objects:
        if o.distortion is not None:
            _distort(np.random.default_rng(o.distortion), image, impl_mask, o.x, o.y, o.r, COLOURS[o.colour])
    size = scene.size
    image = image.resize((size, size), Image.LANCZOS)
    impl = np.asarray(impl_mask.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    mis = np.asarray(mis_mask.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return image, impl, mis


def scene_scores(scene: Scene, implausibility: np.ndarray) -> dict[str, float]:
    """The four scores of the module docstring, from the scene's flaws and its implausibility map."""
    _, roles = prompt_of(scene.groups)
    content = sum(1 for ro in roles if ro != "other")
    a_impl = float(implausibility.mean())
    plaus = 1.0 - min(1.0, 6.0 * a_impl)
    align = 1.0 - len(scene.misaligned_words) / content
    aesth = float(np.clip(0.9 - 3.0 * a_impl - 0.1 * max(0, len(scene.objects) - 3), 0.0, 1.0))
    return {"plausibility": plaus, "alignment": align, "aesthetics": aesth, "overall": overall_of(plaus, align, aesth)}


def overall_of(plausibility: float, alignment: float, aesthetics: float) -> float:
    """The world's overall score from the other three (module docstring), each in [0, 1]."""
    return 0.4 * plausibility + 0.4 * alignment + 0.2 * aesthetics


def cancelled_groups(flaws: Sequence[str]) -> list[int]:
    """Groups whose missing object and extra object cancel: the group is drawn with the prompt's count, shape and
    colour, so the image shows nothing of either flaw, while the labels still mark its count and shape words (and
    the misalignment map one of its objects). Indices of :func:`parse_prompt`'s groups, ascending."""
    kinds = set(flaws)
    groups = {int(f.split(":")[1]) for f in flaws if f.startswith("missing:")}
    return sorted(g for g in groups if f"extra:{g}" in kinds)


def visible_scores(prompt: str, flaws: Sequence[str], scores: Mapping[str, float]) -> dict[str, float]:
    """The scores of what an image shows: its labelled ``scores`` with the count and shape words of every
    :func:`cancelled_groups` group counted as aligned (alignment and overall rise; plausibility and aesthetics do
    not depend on them). Scored against the labels, these give the ceiling of a model that sees only the image."""
    _, roles = prompt_of(parse_prompt(prompt))
    content = sum(1 for ro in roles if ro != "other")
    out = {k: float(v) for k, v in scores.items()}
    words = 2 * len(cancelled_groups(flaws))  # each such group's count and shape word
    if words:
        align = 1.0 - (round((1.0 - out["alignment"]) * content) - words) / content  # labels are float32
        overall = overall_of(out["plausibility"], align, out["aesthetics"])
        # stored as the labels are (float32), so an image that equals another in truth ties with it here too
        out["alignment"], out["overall"] = float(np.float32(align)), float(np.float32(overall))
    return out


def sample_of(scene: Scene, uid: str = "sample") -> SyntheticSample:
    """Render a scene into a sample with its RichHF-style example."""
    image, impl, mis = rasterise(scene)
    words, _ = prompt_of(scene.groups)
    labels = [0 if i in scene.misaligned_words else 1 for i in range(len(words))]
    scores = scene_scores(scene, impl)
    example = RichHFExample(f"{uid}.png", scores, {"implausibility": impl, "misalignment": mis}, labels)
    return SyntheticSample(image, " ".join(words), example, list(scene.flaws), scene)


def render(
    rng: np.random.Generator, size: int = 64, flaws: FlawModel | None = None, uid: str = "sample"
) -> SyntheticSample:
    """Render one random scene with flaws drawn from ``flaws``; everything derives from ``rng``."""
    return sample_of(compose(rng, sample_groups(rng), size, flaws), uid)


def _distort(
    rng: np.random.Generator, image: Image.Image, mask: Image.Image, x: float, y: float, r: float, fill: tuple
) -> None:
    """A spiky blotch with pixel noise over part of an object; its region is marked on ``mask``."""
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = x + 0.6 * r * np.cos(angle), y + 0.6 * r * np.sin(angle)
    rr = r * 0.9
    spikes = 9
    pts = []
    for k in range(2 * spikes):
        a = np.pi * k / spikes + rng.uniform(-0.2, 0.2)
        rad = rr * (1.0 if k % 2 == 0 else rng.uniform(0.35, 0.6))
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    draw = ImageDraw.Draw(image)
    shifted = tuple(int(np.clip(c + rng.integers(-90, 91), 0, 255)) for c in fill)
    draw.polygon(pts, fill=shifted)
    box = [int(cx - rr), int(cy - rr), int(cx + rr) + 1, int(cy + rr) + 1]
    box = [max(0, box[0]), max(0, box[1]), min(image.width, box[2]), min(image.height, box[3])]
    region = np.asarray(image.crop(box), np.int16)
    noise = rng.integers(-70, 71, region.shape)
    yy, xx = np.mgrid[box[1] : box[3], box[0] : box[2]]
    inside = ((xx - cx) ** 2 + (yy - cy) ** 2 <= rr**2)[..., None]
    noisy = np.where(inside, np.clip(region + noise, 0, 255), region).astype(np.uint8)
    image.paste(Image.fromarray(noisy), box[:2])
    ImageDraw.Draw(mask).ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)


def object_heat(scene: Scene, heat: np.ndarray) -> list[float]:
    """Mean of an (size, size) map over each object's disc (pixel centres within its radius), in object order;
    0.0 for an object that covers no pixel centre."""
    heat = np.asarray(heat, np.float64)
    if heat.shape != (scene.size, scene.size):
        raise ValueError(f"heat map shape {heat.shape} differs from the scene's ({scene.size}, {scene.size})")
    yy, xx = np.mgrid[0 : scene.size, 0 : scene.size] + 0.5
    out = []
    for o in scene.objects:
        inside = (xx - o.x / _SCALE) ** 2 + (yy - o.y / _SCALE) ** 2 <= (o.r / _SCALE) ** 2
        out.append(float(heat[inside].mean()) if inside.any() else 0.0)
    return out


def flaw_counts(scene: Scene, exclude: Sequence[bool] | None = None) -> dict[str, Any]:
    """The sufficient statistics of a scene for fitting a :class:`FlawModel`: trials and successes per flaw.

    ``exclude`` (one bool per object) leaves those objects out of the per-shape object and distortion counts
    (the heatmap-weighted fit: objects under predicted implausibility are not learnt from); the group-level
    counts are kept."""
    if exclude is not None and len(exclude) != len(scene.objects):
        raise ValueError(f"exclude has {len(exclude)} flags for {len(scene.objects)} objects")
    objects = dict.fromkeys(SHAPES, 0)
    distorted = dict.fromkeys(SHAPES, 0)
    for k, o in enumerate(scene.objects):
        if exclude is not None and exclude[k]:
            continue
        objects[o.shape] += 1
        distorted[o.shape] += o.distortion is not None
    kinds = [f.split(":")[0] for f in scene.flaws]
    return {
        "objects": objects,
        "distorted": distorted,
        "groups": len(scene.groups),
        "multi_groups": sum(g.count > 1 for g in scene.groups),
        "wrong_colour": kinds.count("wrong_colour"),
        "missing": kinds.count("missing"),
        "extra": kinds.count("extra"),
    }


def fit_flaw_model(counts: Iterable[dict[str, Any]], prior: FlawModel, prior_strength: float = 2.0) -> FlawModel:
    """Maximum-likelihood flaw rates from the :func:`flaw_counts` of a set of images (the world's finetuning step).

    Each rate is a Bernoulli MLE, successes / trials, smoothed toward ``prior`` by ``prior_strength`` pseudo-trials
    (0 gives the plain MLE; a rate without trials keeps the prior's value).
    """
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    counts = list(counts)

    def rate(successes: float, trials: float, p0: float) -> float:
        if trials + prior_strength == 0:
            return p0
        return (successes + prior_strength * p0) / (trials + prior_strength)

    def total(key: str, sub: str | None = None) -> float:
        return float(sum(c[key][sub] if sub else c[key] for c in counts))

    return FlawModel(
        distortion={sh: rate(total("distorted", sh), total("objects", sh), prior.distortion[sh]) for sh in SHAPES},
        wrong_colour=rate(total("wrong_colour"), total("groups"), prior.wrong_colour),
        missing=rate(total("missing"), total("multi_groups"), prior.missing),
        extra=rate(total("extra"), total("groups"), prior.extra),
    )


def split_seed(split: str) -> int:
    """A split name's number in the seed sequence of its samples (stable across runs and machines)."""
    return sum(ord(c) * 31**k for k, c in enumerate(split)) % 2**31


def generate(
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    flaws: FlawModel | None = None,
    per_prompt: int = 1,
    start: int = 0,
) -> Iterator[SyntheticSample]:
    """Samples ``start`` .. ``n - 1`` of a split; sample i depends only on (seed, split, i), so any prefix is
    reproducible and any range can be made on its own (see :func:`write_split`'s ``workers``).

    ``per_prompt`` > 1 writes groups of that many consecutive samples sharing one prompt (the last group may be
    shorter), each its own scene: what a generator's candidates for one prompt look like, and what a
    within-prompt ranking loss trains on. ``per_prompt`` = 1 draws a prompt per sample (the original splits).
    """
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    split_id = split_seed(split)
    for i in range(start, n):
        uid = f"{split}/{split}-{seed}-{i:06d}"
        rng = np.random.default_rng([seed, split_id, i])
        if per_prompt == 1:
            yield render(rng, size=size, flaws=flaws, uid=uid)
        else:  # the prompt from the group's own stream, the scene from the sample's
            groups = sample_groups(np.random.default_rng([seed, split_id, i // per_prompt, per_prompt]))
            yield sample_of(compose(rng, groups, size, flaws), uid)


def write_split(
    out_dir: str | Path,
    split: str,
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    flaws: FlawModel | None = None,
    per_prompt: int = 1,
    workers: int = 1,
) -> Path:
    """Write ``<split>.tfrecord`` (RichHF-18K schema), the images, and ``<split>.jsonl`` (uid, image, prompt,
    flaws) under ``out_dir``; returns the TFRecord path. ``per_prompt``: see :func:`generate`. ``workers`` > 1
    renders ranges of samples in that many processes; the files are byte for byte those of one process."""
    make = partial(generate, size=size, seed=seed, split=split, flaws=flaws, per_prompt=per_prompt)
    return write_parallel(out_dir, split, n, make, workers)


def auto_workers(n: int, per_worker: int = 2000) -> int:
    """Processes worth starting for ``n`` samples: one per CPU core, but about ``per_worker`` samples each at
    least (a process costs about a second to start)."""
    return max(1, min(os.cpu_count() or 1, n // per_worker))


def _stored(out: Path, sample: Any) -> tuple[bytes, dict[str, Any]]:
    """Save a sample's image under ``out``; its TFRecord payload and its ``.jsonl`` row."""
    sample.image.save(out / sample.example.filename)
    row = {"uid": sample.example.uid, "image": sample.example.filename, "prompt": sample.prompt, "flaws": sample.flaws}
    return encode_example(example_features(sample.example)), row


def write_samples(out_dir: str | Path, split: str, samples: Iterable[Any]) -> Path:
    """Write samples (anything with ``image``, ``example``, ``prompt`` and ``flaws``, as :class:`SyntheticSample`)
    as ``<split>.tfrecord``, the images and ``<split>.jsonl`` under ``out_dir``; returns the TFRecord path."""
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    rows = []

    def payloads() -> Iterator[bytes]:  # streamed: no sample outlives its record
        for sample in samples:
            payload, row = _stored(out, sample)
            rows.append(row)
            yield payload

    return _finish(out, split, payloads(), rows)


def _finish(out: Path, split: str, payloads: Iterable[bytes], rows: list[dict[str, Any]]) -> Path:
    path = out / f"{split}.tfrecord"
    write_records(path, payloads)  # rows fill while the payloads stream
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _make_range(
    make: Callable[..., Iterable[Any]], out: Path, start: int, stop: int
) -> list[tuple[bytes, dict[str, Any]]]:
    return [_stored(out, sample) for sample in make(stop, start=start)]


def write_parallel(out_dir: str | Path, split: str, n: int, make: Callable[..., Iterable[Any]], workers: int) -> Path:
    """:func:`write_samples` of ``make(n)``; with ``workers`` > 1 rendered by that many processes in ranges
    ``make(stop, start=a)`` (``make`` must be picklable: a module-level function or a ``partial`` of one). Records
    are written in index order, so the output does not depend on ``workers``. The workers are spawned, so they
    import the caller's main module: a script that calls this with ``workers`` > 1 must keep its work under
    ``if __name__ == "__main__":``."""
    if workers <= 1:
        return write_samples(out_dir, split, make(n))
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    chunk = max(1, -(-n // (workers * 8)))
    starts = range(0, n, chunk)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        parts = pool.map(_make_range, repeat(make), repeat(out), starts, [min(a + chunk, n) for a in starts])

        def payloads() -> Iterator[bytes]:
            for part in parts:
                for payload, row in part:
                    rows.append(row)
                    yield payload

        return _finish(out, split, payloads(), rows)
