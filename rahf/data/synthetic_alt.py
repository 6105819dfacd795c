"""A second synthetic rich-feedback world, kept apart from the first to VALIDATE training recipes (never to tune them).

It shares only the output schema with :mod:`rahf.data.synthetic`; renderer, vocabulary, grammar, flaws, rates and
score rules are its own. Images are 128 px by default (drawn at twice the size and box-averaged), on textured sky
gradients with film grain, with outlined, shaded objects. numpy and PIL only (no torch).

Prompt grammar: ``<group> [<relation> <group>] in a <sky> sky``; a group is ``<count> <size> <colour> <kind>[s]``,
for example ``two big pink rings above one small golden star in a misty sky``. Counts ``one two three``, sizes
``big small``, colours ``pink brown golden silver green blue``, kinds ``ring star moon flower cube``, relations
``above below beside near``, skies ``sunny misty dark snowy``. 40 % of prompts have one group, 60 % two.

Flaws and their default rates (:class:`AltFlawRates`), each writing its exact ground truth:

* melted (implausibility, 12 % of drawn objects): the lower part of the object and drips below it are smeared
  downward with streaks; the smeared region is the implausibility map;
* broken (implausibility, 10 % of drawn objects, never together with melted): the object is cut along a line and
  one half slides along the cut; a disk of radius 1.4 r + 2 px (drawing pixels) around the object is the map;
* duplicated (misalignment, 12 % of groups): an identical copy of the group's last object next to it; the copy
  is the misalignment map and the count word is misaligned;
* missing (misalignment, 10 % of groups, never together with duplicated): one object of the group is not drawn;
  the count and kind words are misaligned (and the size and colour words when the group had one object, as it
  then vanishes); nothing is drawn, so no map;
* wrong size (misalignment, 15 % of groups): the group is drawn at the other size; its objects are the map, the
  size word is misaligned;
* colour swap (misalignment, 30 % of two-group prompts whose colours differ): the groups trade colours; all their
  objects are the map and both colour words are misaligned.

The misalignment map is the union of the flagged objects' drawn footprints; maps are the fraction of each image
pixel's 2×2 drawing pixels that is marked, so a pixel changed by a flaw always has a non-zero map value.

Scores (all in [0, 1], higher is better), from the flaws alone (A_impl = mean of the implausibility map):

* plausibility = clip(1 − 0.12 · melted − 0.08 · broken − 2.5 · A_impl, 0, 1) (counts of affected objects);
* alignment = 1 − Σ w(misaligned words) / Σ w(content words), weights kind 2, count 1.5, colour 1, size 1,
  relation 1, sky 0.5 (the other words weigh 0);
* aesthetics = clip(b_sky − 1.5 · A_impl − 0.06 · max(0, objects − 4), 0, 1), b_sky = sunny 0.9, snowy 0.8,
  misty 0.7, dark 0.6;
* overall = clip(0.3 · P + 0.5 · A + 0.2 · Ae − 0.1 · [P < 0.75 and A < 0.75], 0, 1).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rahf.data.richhf import RichHFExample
from rahf.data.synthetic import split_seed, write_parallel

SUPERSAMPLE = 2  # drawing pixels per image pixel along each side
KINDS = ("ring", "star", "moon", "flower", "cube")
COLOURS = {
    "pink": (236, 112, 170),
    "brown": (139, 87, 48),
    "golden": (222, 172, 38),
    "silver": (188, 192, 204),
    "green": (64, 160, 90),
    "blue": (62, 110, 205),
}
SIZES = {"big": 0.1, "small": 0.055}  # object radius as a fraction of the image side
COUNTS = {1: "one", 2: "two", 3: "three"}
#: relation -> the region (centre x, centre y, half width, half height as fractions) of the first and second group
RELATIONS = {
    "above": ((0.5, 0.28, 0.36, 0.17), (0.5, 0.72, 0.36, 0.17)),
    "below": ((0.5, 0.72, 0.36, 0.17), (0.5, 0.28, 0.36, 0.17)),
    "beside": ((0.28, 0.5, 0.17, 0.36), (0.72, 0.5, 0.17, 0.36)),
    "near": ((0.5, 0.5, 0.3, 0.3), (0.5, 0.5, 0.3, 0.3)),
}
_ALONE = (0.5, 0.5, 0.3, 0.3)
#: sky -> (gradient start colour, gradient end colour, aesthetics base)
SKIES = {
    "sunny": ((250, 226, 150), (120, 180, 235), 0.9),
    "misty": ((196, 202, 210), (236, 238, 241), 0.7),
    "dark": ((25, 30, 62), (72, 46, 92), 0.6),
    "snowy": ((236, 241, 248), (168, 188, 214), 0.8),
}
WORD_WEIGHTS = {"kind": 2.0, "count": 1.5, "colour": 1.0, "size": 1.0, "relation": 1.0, "sky": 0.5}
TWO_GROUPS = 0.6
_WORLD = 2  # folded into every seed, so this world's streams never coincide with the first world's


@dataclass
class AltFlawRates:
    """Probabilities of each flaw (module docstring): per drawn object (melted, broken), per group (duplicated,
    missing, wrong_size), per two-group prompt with two colours (colour_swap)."""

    melted: float = 0.12
    broken: float = 0.10
    duplicated: float = 0.12
    missing: float = 0.10
    wrong_size: float = 0.15
    colour_swap: float = 0.30

    def __post_init__(self) -> None:
        bad = {k: v for k, v in asdict(self).items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"flaw rates must lie in [0, 1]: {bad}")
        if self.melted + self.broken > 1 or self.duplicated + self.missing > 1:
            raise ValueError("melted + broken and duplicated + missing must each be <= 1 (they exclude each other)")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


DEFAULT_RATES = AltFlawRates()


@dataclass
class AltGroup:
    count: int
    size: str
    colour: str
    kind: str


@dataclass
class AltObject:
    """One drawn object, in drawing coordinates (``SUPERSAMPLE`` × the image size)."""

    kind: str
    colour: str  # as drawn (the other group's under a colour swap)
    x: float
    y: float
    r: float
    rot: float
    group: int
    misaligned: bool = False  # part of the misalignment map
    melted: int | None = None  # seed of its smear; None = not melted
    broken: int | None = None  # seed of its cut; None = whole


@dataclass
class AltScene:
    """Everything an image is made of; rasterising it again gives the same pixels and ground truth."""

    size: int
    sky: str
    relation: str | None
    groups: list[AltGroup]
    objects: list[AltObject]
    texture: int  # seed of the background's texture and grain
    angle: float  # direction of the sky gradient, radians
    misaligned_words: list[int] = field(default_factory=list)
    flaws: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AltScene:
        d = json.loads(text)
        d["groups"] = [AltGroup(**g) for g in d["groups"]]
        d["objects"] = [AltObject(**o) for o in d["objects"]]
        return cls(**d)


@dataclass
class AltSample:
    """An image, its prompt, its exact RichHF-style ground truth, the flaws applied and the scene."""

    image: Image.Image
    prompt: str
    example: RichHFExample
    flaws: list[str]
    scene: AltScene


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


def sample_groups(rng: np.random.Generator) -> tuple[list[AltGroup], str | None, str]:
    """Random groups, the relation between them (None for one group) and the sky."""
    n = 2 if rng.random() < TWO_GROUPS else 1
    groups = [
        AltGroup(
            int(rng.integers(1, 4)),
            str(rng.choice(list(SIZES))),
            str(rng.choice(list(COLOURS))),
            str(rng.choice(KINDS)),
        )
        for _ in range(n)
    ]
    relation = str(rng.choice(list(RELATIONS))) if n == 2 else None
    return groups, relation, str(rng.choice(list(SKIES)))


def prompt_of(groups: list[AltGroup], relation: str | None, sky: str) -> tuple[list[str], list[str]]:
    """Words of the prompt and per word its role: ``count:i``, ``size:i``, ``colour:i``, ``kind:i``,
    ``relation``, ``sky`` or ``other``."""
    if (len(groups) == 2) != (relation is not None) or not 1 <= len(groups) <= 2:
        raise ValueError(f"one group without a relation or two with one, got {len(groups)} and {relation!r}")
    words: list[str] = []
    roles: list[str] = []
    for i, g in enumerate(groups):
        if i:
            words.append(str(relation))
            roles.append("relation")
        words += [COUNTS[g.count], g.size, g.colour, g.kind + ("s" if g.count > 1 else "")]
        roles += [f"count:{i}", f"size:{i}", f"colour:{i}", f"kind:{i}"]
    words += ["in", "a", sky, "sky"]
    roles += ["other", "other", "sky", "other"]
    return words, roles


# ---------------------------------------------------------------------------------------------------------
# Scene composition (all randomness of a sample, drawn from one rng)
# ---------------------------------------------------------------------------------------------------------


def _free(x: float, y: float, r: float, taken: list[tuple[float, float, float]]) -> bool:
    return all((x - a) ** 2 + (y - b) ** 2 > ((r + rb) * 1.12 + 3) ** 2 for a, b, rb in taken)


def _place(
    rng: np.random.Generator, region: tuple[float, float, float, float], r: float, s: int, taken: list
) -> tuple[float, float]:
    cx, cy, hx, hy = region
    for _ in range(60):
        x = float(np.clip((cx + rng.uniform(-hx, hx)) * s, r + 3, s - r - 3))
        y = float(np.clip((cy + rng.uniform(-hy, hy)) * s, r + 3, s - r - 3))
        if _free(x, y, r, taken):
            break
    taken.append((x, y, r))
    return x, y


def _place_near(rng: np.random.Generator, twin: AltObject, s: int, taken: list) -> tuple[float, float]:
    r = twin.r
    for _ in range(40):
        a = rng.uniform(0, 2 * np.pi)
        d = 2.24 * r + 3 + rng.uniform(0, 0.5 * r)
        x = float(np.clip(twin.x + d * np.cos(a), r + 3, s - r - 3))
        y = float(np.clip(twin.y + d * np.sin(a), r + 3, s - r - 3))
        if _free(x, y, r, taken):
            taken.append((x, y, r))
            return x, y
    return _place(rng, (0.5, 0.5, 0.5, 0.5), r, s, taken)


def compose(
    rng: np.random.Generator,
    groups: list[AltGroup],
    relation: str | None,
    sky: str,
    size: int = 128,
    rates: AltFlawRates | None = None,
) -> AltScene:
    """Lay out the groups and draw every flaw from ``rates`` (default :data:`DEFAULT_RATES`)."""
    rates = rates or DEFAULT_RATES
    _, roles = prompt_of(groups, relation, sky)
    s = size * SUPERSAMPLE
    misaligned: set[int] = set()
    applied: list[str] = []
    colours = [g.colour for g in groups]
    swap = False
    if len(groups) == 2 and groups[0].colour != groups[1].colour and rng.random() < rates.colour_swap:
        swap = True
        colours = colours[::-1]
        misaligned.update({roles.index("colour:0"), roles.index("colour:1")})
        applied.append("colour_swap")
    regions = RELATIONS[relation] if relation else (_ALONE,)
    objects: list[AltObject] = []
    taken: list[tuple[float, float, float]] = []
    for gi, g in enumerate(groups):
        size_word = g.size
        wrong = rng.random() < rates.wrong_size
        if wrong:
            size_word = next(w for w in SIZES if w != g.size)
            misaligned.add(roles.index(f"size:{gi}"))
            applied.append(f"wrong_size:{gi}")
        u = rng.random()
        n_draw, dup = g.count, False
        if u < rates.missing:
            n_draw -= 1
            lost = ["count", "kind"] + (["size", "colour"] if g.count == 1 else [])
            misaligned.update(roles.index(f"{w}:{gi}") for w in lost)
            applied.append(f"missing:{gi}")
        elif u < rates.missing + rates.duplicated:
            dup = True
            misaligned.add(roles.index(f"count:{gi}"))
            applied.append(f"duplicated:{gi}")
        r = SIZES[size_word] * s
        for _ in range(n_draw):
            x, y = _place(rng, regions[gi], r, s, taken)
            objects.append(AltObject(g.kind, colours[gi], x, y, r, float(rng.uniform(0, 2 * np.pi)), gi, wrong or swap))
        if dup:
            x, y = _place_near(rng, objects[-1], s, taken)
            objects.append(replace(objects[-1], x=x, y=y, misaligned=True))
    for o in objects:
        u = rng.random()
        if u < rates.melted:
            o.melted = int(rng.integers(2**31))
            applied.append(f"melted:{o.kind}")
        elif u < rates.melted + rates.broken:
            o.broken = int(rng.integers(2**31))
            applied.append(f"broken:{o.kind}")
    texture, angle = int(rng.integers(2**31)), float(rng.uniform(0, 2 * np.pi))
    return AltScene(size, sky, relation, groups, objects, texture, angle, sorted(misaligned), applied)


def flaw_trials(scene: AltScene) -> dict[str, tuple[int, int]]:
    """Per flaw kind, (trials, occurrences) in the scene, the units of :class:`AltFlawRates`."""
    kinds = [f.split(":")[0] for f in scene.flaws]
    n_obj, n_groups = len(scene.objects), len(scene.groups)
    eligible = int(n_groups == 2 and scene.groups[0].colour != scene.groups[1].colour)
    return {
        "melted": (n_obj, kinds.count("melted")),
        "broken": (n_obj, kinds.count("broken")),
        "duplicated": (n_groups, kinds.count("duplicated")),
        "missing": (n_groups, kinds.count("missing")),
        "wrong_size": (n_groups, kinds.count("wrong_size")),
        "colour_swap": (eligible, kinds.count("colour_swap")),
    }


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _drawn(s: int, paint) -> np.ndarray:
    """(s, s) bool of what ``paint(ImageDraw)`` fills with 255 on a blank canvas."""
    img = Image.new("L", (s, s), 0)
    paint(ImageDraw.Draw(img))
    return np.asarray(img) > 0


def _disk(d: ImageDraw.ImageDraw, x: float, y: float, r: float, fill: int = 255) -> None:
    d.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _cube_vertices(x: float, y: float, r: float) -> list[tuple[float, float]]:
    return [(x + r * np.cos(a), y + r * np.sin(a)) for a in -np.pi / 2 + np.arange(6) * np.pi / 3]


def _shape(o: AltObject, s: int) -> np.ndarray:
    """(s, s) bool: the object's silhouette."""
    x, y, r, rot = o.x, o.y, o.r, o.rot

    def paint(d: ImageDraw.ImageDraw) -> None:
        if o.kind == "ring":
            _disk(d, x, y, r)
            _disk(d, x, y, 0.56 * r, 0)
        elif o.kind == "star":
            a = rot - np.pi / 2 + np.arange(10) * np.pi / 5
            rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
            d.polygon(list(zip(x + rad * np.cos(a), y + rad * np.sin(a))), fill=255)
        elif o.kind == "moon":
            _disk(d, x, y, r)
            _disk(d, x + 0.5 * r * np.cos(rot), y + 0.5 * r * np.sin(rot), 0.8 * r, 0)
        elif o.kind == "flower":
            for k in range(6):
                a = rot + k * np.pi / 3
                _disk(d, x + 0.62 * r * np.cos(a), y + 0.62 * r * np.sin(a), 0.36 * r)
            _disk(d, x, y, 0.36 * r)
        elif o.kind == "cube":
            d.polygon(_cube_vertices(x, y, r), fill=255)
        else:
            raise ValueError(f"unknown kind {o.kind!r}; expected one of {KINDS}")

    return _drawn(s, paint)


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``a`` moved by (dx, dy) pixels along (x, y), filled with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _paint(o: AltObject, mask: np.ndarray, s: int) -> np.ndarray:
    """(s, s, 3) float colours of the object: lit from the top left, a dark outline, kind-specific detail."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    t = (-(xx - o.x) * 0.6 - (yy - o.y) * 0.8) / o.r  # +1 towards the light
    shade = 1.0 + 0.22 * t
    base = np.asarray(COLOURS[o.colour], np.float32)
    if o.kind == "cube":  # three faces, lit top, mid left, dark right
        v = _cube_vertices(o.x, o.y, o.r)
        c = (o.x, o.y)
        right = _drawn(s, lambda d: d.polygon([v[1], v[2], v[3], c], fill=255))
        left = _drawn(s, lambda d: d.polygon([v[5], c, v[3], v[4]], fill=255))
        shade = np.where(right, 0.68, np.where(left, 0.92, 1.18)).astype(np.float32)
    if o.kind == "flower":
        shade = np.where(_drawn(s, lambda d: _disk(d, o.x, o.y, 0.3 * o.r)), 0.55, shade)
    rgb = np.clip(base * shade[..., None], 0, 255)
    w = max(1, round(s / 128))
    inner = mask.copy()
    for dx, dy in ((w, 0), (-w, 0), (0, w), (0, -w)):
        inner &= _shift(mask, dx, dy)
    edge = mask & ~inner
    if o.kind == "cube":
        v = _cube_vertices(o.x, o.y, o.r)
        edge |= mask & _drawn(s, lambda d: [d.line([(o.x, o.y), v[k]], fill=255, width=w) for k in (1, 3, 5)])
    rgb[edge] = base * 0.35
    return rgb


def _object(o: AltObject, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The object's final footprint (s, s) bool, its colours (s, s, 3) and, if broken, its artifact region."""
    mask = _shape(o, s)
    rgb = _paint(o, mask, s)
    if o.broken is None:
        return mask, rgb, None
    rng = np.random.default_rng(o.broken)
    phi = rng.uniform(0, np.pi)
    px, py = o.x + 0.15 * o.r * rng.uniform(-1, 1), o.y + 0.15 * o.r * rng.uniform(-1, 1)
    nx, ny = -np.sin(phi), np.cos(phi)
    slide, gap = rng.uniform(0.2, 0.35) * o.r, 0.1 * o.r
    yy, xx = np.mgrid[0:s, 0:s]
    side = (xx - px) * nx + (yy - py) * ny > 0
    ax, ay = round(slide * np.cos(phi) + gap * nx), round(slide * np.sin(phi) + gap * ny)
    bx, by = round(-gap * nx), round(-gap * ny)
    ma, mb = _shift(mask & side, ax, ay), _shift(mask & ~side, bx, by)
    rgb = np.where(ma[..., None], _shift(rgb, ax, ay), _shift(rgb, bx, by))
    region = _drawn(s, lambda d: _disk(d, o.x, o.y, 1.4 * o.r + 2))
    return ma | mb, rgb, region


def footprint(o: AltObject, s: int) -> np.ndarray:
    """(s, s) bool: where the object is drawn on an ``s``-pixel drawing canvas (after a break)."""
    return _object(o, s)[0]


def _background(scene: AltScene, rng: np.random.Generator, s: int) -> np.ndarray:
    c0, c1, _ = SKIES[scene.sky]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    t = np.clip((xx * np.cos(scene.angle) + yy * np.sin(scene.angle)) / 0.71 + 0.5, 0, 1)[..., None]
    img = np.asarray(c0, np.float32) * (1 - t) + np.asarray(c1, np.float32) * t
    coarse = Image.fromarray(rng.normal(0, 1, (6, 6)).astype(np.float32), mode="F")
    img += 9.0 * np.asarray(coarse.resize((s, s), Image.BICUBIC), np.float32)[..., None]
    if scene.sky == "sunny":
        gx, gy = rng.choice([-0.5, 0.5], 2)
        img += np.array([40, 30, 0], np.float32) * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / 0.08)[..., None]
    elif scene.sky == "misty":
        img += 10.0 * np.sin(2 * np.pi * (yy * rng.uniform(3, 6) + rng.uniform(0, 1)))[..., None]
    else:  # snowflakes on snowy skies, faint specks on dark ones
        n, r, tone = (140, 1.6, 255.0) if scene.sky == "snowy" else (70, 0.8, 150.0)
        pts = rng.uniform(0, s, (n, 2))
        dots = _drawn(s, lambda d: [_disk(d, a, b, r * s / 256) for a, b in pts])
        img[dots] = 0.4 * img[dots] + 0.6 * tone
    return img


def _melt(canvas: np.ndarray, o: AltObject, s: int) -> np.ndarray:
    """Smear the lower part of ``o`` and drips below it downward, in place; returns the smeared region."""
    rng = np.random.default_rng(o.melted)
    r = o.r
    cx, cy = o.x + rng.uniform(-0.1, 0.1) * r, o.y + 0.35 * r
    drips = [
        (
            o.x + rng.uniform(-0.6, 0.6) * r,
            o.y + rng.uniform(0.9, 1.3) * r,
            rng.uniform(0.12, 0.22) * r,
            rng.uniform(0.35, 0.6) * r,
        )
        for _ in range(int(rng.integers(2, 4)))
    ]

    def paint(d: ImageDraw.ImageDraw) -> None:
        d.ellipse([cx - 0.95 * r, cy - 0.85 * r, cx + 0.95 * r, cy + 0.85 * r], fill=255)
        for x, y, rx, ry in drips:
            d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)

    region = _drawn(s, paint)
    k = max(2, int(0.9 * r))
    padded = np.concatenate([np.repeat(canvas[:1], k, axis=0), canvas], axis=0)
    c = np.cumsum(padded, axis=0, dtype=np.float64)
    c = np.concatenate([np.zeros_like(c[:1]), c], axis=0)
    smear = (c[k + 1 :] - c[1 : s + 1]) / k  # mean of the k pixels above and including each pixel
    streaks = 1.0 + 0.1 * rng.normal(0, 1, (1, s, 1))
    canvas[region] = np.clip(smear * streaks, 0, 255)[region]
    return region


def rasterise(scene: AltScene) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """The scene's image and its exact implausibility and misalignment maps ((size, size) float32 in [0, 1])."""
    k = SUPERSAMPLE
    s = scene.size * k
    rng = np.random.default_rng(scene.texture)
    canvas = _background(scene, rng, s)
    impl = np.zeros((s, s), bool)
    mis = np.zeros((s, s), bool)
    for o in scene.objects:
        mask, rgb, region = _object(o, s)
        canvas[mask] = rgb[mask]
        if o.misaligned:
            mis |= mask
        if region is not None:
            impl |= region
    for o in scene.objects:
        if o.melted is not None:
            impl |= _melt(canvas, o, s)
    canvas = np.clip(canvas + rng.normal(0, 3.0, canvas.shape), 0, 255)
    n = scene.size

    def down(a: np.ndarray) -> np.ndarray:
        return a.reshape(n, k, n, k, *a.shape[2:]).mean(axis=(1, 3))

    image = Image.fromarray(np.round(down(canvas)).astype(np.uint8))
    return image, down(impl.astype(np.float32)), down(mis.astype(np.float32))


def scene_scores(scene: AltScene, implausibility: np.ndarray) -> dict[str, float]:
    """The four scores of the module docstring, from the scene's flaws and its implausibility map."""
    _, roles = prompt_of(scene.groups, scene.relation, scene.sky)
    weight = [WORD_WEIGHTS.get(ro.split(":")[0], 0.0) for ro in roles]
    a_impl = float(implausibility.mean())
    kinds = [f.split(":")[0] for f in scene.flaws]
    plaus = float(np.clip(1.0 - 0.12 * kinds.count("melted") - 0.08 * kinds.count("broken") - 2.5 * a_impl, 0, 1))
    align = 1.0 - sum(weight[i] for i in scene.misaligned_words) / sum(weight)
    crowd = max(0, len(scene.objects) - 4)
    aesth = float(np.clip(SKIES[scene.sky][2] - 1.5 * a_impl - 0.06 * crowd, 0, 1))
    overall = 0.3 * plaus + 0.5 * align + 0.2 * aesth - 0.1 * (plaus < 0.75 and align < 0.75)
    return {"plausibility": plaus, "alignment": align, "aesthetics": aesth, "overall": float(np.clip(overall, 0, 1))}


def sample_of(scene: AltScene, uid: str = "sample") -> AltSample:
    """Render a scene into a sample with its RichHF-style example (filename ``<uid>.png``)."""
    image, impl, mis = rasterise(scene)
    words, _ = prompt_of(scene.groups, scene.relation, scene.sky)
    labels = [0 if i in scene.misaligned_words else 1 for i in range(len(words))]
    example = RichHFExample(
        f"{uid}.png", scene_scores(scene, impl), {"implausibility": impl, "misalignment": mis}, labels
    )
    return AltSample(image, " ".join(words), example, list(scene.flaws), scene)


# ---------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------


def _uid(split: str, seed: int, i: int) -> str:
    return f"{split}/alt-{split}-{seed}-{i:06d}"


def scenes(
    n: int,
    *,
    size: int = 128,
    seed: int = 0,
    split: str = "train",
    rates: AltFlawRates | None = None,
    per_prompt: int = 1,
    start: int = 0,
) -> Iterator[AltScene]:
    """Scenes ``start`` .. ``n - 1`` of :func:`generate` without rendering them (cheap: for statistics)."""
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    sid = split_seed(split)
    for i in range(start, n):
        rng = np.random.default_rng([seed, sid, i, _WORLD])
        prompt_rng = rng if per_prompt == 1 else np.random.default_rng([seed, sid, i // per_prompt, per_prompt, _WORLD])
        groups, relation, sky = sample_groups(prompt_rng)
        yield compose(rng, groups, relation, sky, size, rates)


def generate(
    n: int,
    *,
    size: int = 128,
    seed: int = 0,
    split: str = "train",
    rates: AltFlawRates | None = None,
    per_prompt: int = 1,
    start: int = 0,
) -> Iterator[AltSample]:
    """Samples ``start`` .. ``n - 1`` of a split; sample i depends only on (seed, split, i), so any prefix is
    reproducible and any range can be made on its own.

    ``per_prompt`` > 1: consecutive groups of that many samples share one prompt, each its own scene.
    """
    made = scenes(n, size=size, seed=seed, split=split, rates=rates, per_prompt=per_prompt, start=start)
    for i, scene in enumerate(made, start):
        yield sample_of(scene, _uid(split, seed, i))


def write_split(
    out_dir: str | Path,
    split: str,
    n: int,
    *,
    size: int = 128,
    seed: int = 0,
    rates: AltFlawRates | None = None,
    per_prompt: int = 1,
    workers: int = 1,
) -> Path:
    """Write ``<split>.tfrecord`` (RichHF-18K schema), the images under ``<split>/`` and ``<split>.jsonl`` (uid,
    image, prompt, flaws) under ``out_dir``, as :func:`rahf.data.synthetic.write_split` does (``workers`` too);
    returns the TFRecord path."""
    make = partial(generate, size=size, seed=seed, split=split, rates=rates, per_prompt=per_prompt)
    return write_parallel(out_dir, split, n, make, workers)
