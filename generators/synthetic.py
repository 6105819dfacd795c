"""The synthetic world as a generator backend: renders prompts of the scene grammar with flaws drawn
from a per-concept :class:`~rahf.data.synthetic.FlawModel` (the generator's "parameters"), and inpaints by
re-rendering the objects under the mask. Every image carries its exact ground truth, so the loop's effects
(repair, finetuning) are measurable offline.

* ``generate``: the scene of (prompt, seed) is laid out and its flaws drawn from an RNG seeded by
  ``(seed, sha256(prompt))``; the same seed gives the same image whatever the batch.
* ``inpaint``: objects whose footprint (the object and the reach of a blotch, 1.5 radii) meets the mask get their
  distortion drawn anew from the flaw model; the scene is re-rendered and composited through the mask, so pixels
  outside it are the input's exactly. The ground-truth implausibility map is composited the same way; the scores
  follow from it by the renderer's formulas. Objects the mask covers whole are also re-rendered as the prompt
  asks: in their group's prompt colour (a wrong colour at the world's ``wrong_colour`` rate), and an extra object
  is left out at rate 1 − ``extra`` (:func:`realign` then recomputes the alignment truth). A missing object has
  no region to mask, so no inpainting adds it back. The scene travels in the PNG's text chunk ``scene`` (see
  :func:`generators.base.encode_png`); an image without one cannot be inpainted by this backend.
* ``fit``: the finetuning step of this world, a maximum-likelihood update of the flaw rates from selected images'
  ground-truth counts (:func:`~rahf.data.synthetic.fit_flaw_model`). The fitted model is saved as an "adapter"
  folder (``flaws.json``) whose content hash enters the generator's identity.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.names import HEATMAP_NAMES
from common.records import RichFeedback, ScoringFailure
from generators.base import (
    GeneratedImage,
    Generator,
    GeneratorIdentity,
    check_inpaint_inputs,
    content_hash,
    content_hash_image,
    resolve_seeds,
)
from rahf.data.synthetic import (
    _SCALE,
    COLOURS,
    FlawModel,
    Scene,
    compose,
    fit_flaw_model,
    flaw_counts,
    parse_prompt,
    prompt_of,
    rasterise,
    scene_scores,
)

WORLD_VERSION = "1"  # bump when the renderer's output for a (prompt, seed) changes
ADAPTER_FILE = "flaws.json"
_BLOTCH_REACH = 1.5  # a blotch is centred 0.6 r from the object's centre with radius 0.9 r


def _prompt_key(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")


def _truth(scene: Scene, implausibility: np.ndarray, misalignment: np.ndarray) -> dict[str, Any]:
    words, _ = prompt_of(scene.groups)
    return {
        "scores": scene_scores(scene, implausibility),
        "flaws": list(scene.flaws),
        "counts": flaw_counts(scene),
        "words": words,
        "word_labels": [0 if i in scene.misaligned_words else 1 for i in range(len(words))],
        "implausible_area": float(implausibility.mean()),
        "maps": {"implausibility": implausibility, "misalignment": misalignment},
    }


class SyntheticGenerator(Generator):
    """Procedural scenes with known flaws; ``size`` is the image side in pixels."""

    cell_size = 1

    def __init__(self, flaws: FlawModel | None = None, size: int = 64, adapter_hash: str | None = None):
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        self.flaws = flaws or FlawModel()
        self.size = size
        self.identity = GeneratorIdentity("synthetic", "synthetic-world", WORLD_VERSION, adapter_hash)

    @classmethod
    def from_pretrained(cls, adapter: str | Path | None = None, size: int = 64) -> SyntheticGenerator:
        """The default world, or the one fitted and saved in the folder ``adapter`` (``flaws.json``)."""
        if adapter is None:
            return cls(size=size)
        path = Path(adapter) / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a synthetic-world adapter folder holds {ADAPTER_FILE}")
        return cls(FlawModel.from_dict(json.loads(path.read_text())), size, content_hash(path))

    def save_adapter(self, folder: str | Path) -> str:
        """Write ``flaws.json`` into ``folder``; returns its content hash."""
        path = Path(folder) / ADAPTER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.flaws.to_dict(), indent=1, sort_keys=True) + "\n")
        return content_hash(path)

    def params(self, task: str) -> dict[str, Any]:
        return {"size": self.size, "task": task}

    # -- generation ------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], num_images_per_prompt: int = 8, seeds: Sequence[int] | None = None
    ) -> list[GeneratedImage]:
        seeds = resolve_seeds(len(prompts), num_images_per_prompt, seeds)
        groups = [parse_prompt(p) for p in prompts]  # every prompt checked before any work
        out = []
        for i, seed in enumerate(seeds):
            p = i // num_images_per_prompt
            rng = np.random.default_rng([seed, _prompt_key(prompts[p])])
            scene = compose(rng, groups[p], self.size, self.flaws)
            image, impl, mis = rasterise(scene)
            image.info["scene"] = scene.to_json()
            params = self.params("text-to-image")
            out.append(GeneratedImage(image, prompts[p], seed, self.identity, params, _truth(scene, impl, mis)))
        return out

    # -- inpainting ------------------------------------------------------------------------------------------

    def inpaint(
        self, image: Image.Image, mask: Image.Image, prompt: str, n: int, seeds: Sequence[int] | None = None
    ) -> list[GeneratedImage]:
        seeds = check_inpaint_inputs(image, mask, n, seeds)
        if "scene" not in image.info:
            raise ValueError("the synthetic inpainter needs an image made by the synthetic generator (no 'scene')")
        scene = Scene.from_json(image.info["scene"])
        if image.size != (scene.size, scene.size):
            raise ValueError(f"image size {image.size} differs from its scene's ({scene.size}, {scene.size})")
        alpha = np.asarray(mask, np.float32)[..., None] / 255.0
        old = np.asarray(image, np.float32)
        old_impl = rasterise(scene)[1] if "implausibility_map" not in image.info else _map_from_info(image)
        touched = self._touched(scene, alpha[..., 0] > 0)
        params = {
            **self.params("inpaint"),
            "image": content_hash_image(image),
            "mask": content_hash_image(mask),
        }
        covered = self._covered(scene, alpha[..., 0] >= 1.0)
        colours = _prompt_colours(prompt, scene)
        out = []
        for seed in seeds:
            rng = np.random.default_rng([seed, _prompt_key(prompt), 1])
            new_scene = copy.deepcopy(scene)
            for k in touched:
                obj = new_scene.objects[k]
                obj.distortion = int(rng.integers(2**31)) if rng.random() < self.flaws.distortion[obj.shape] else None
            self._redraw_alignment(new_scene, covered, colours, np.random.default_rng([seed, _prompt_key(prompt), 2]))
            new_scene.flaws = [f for f in new_scene.flaws if not f.startswith("distortion")] + [
                f"distortion:{o.shape}" for o in new_scene.objects if o.distortion is not None
            ]
            new_image, new_impl, mis = rasterise(new_scene)
            pixels = np.where(alpha > 0, old * (1 - alpha) + np.asarray(new_image, np.float32) * alpha, old)
            result = Image.fromarray(np.rint(pixels).astype(np.uint8))
            impl = np.where(alpha[..., 0] > 0, old_impl * (1 - alpha[..., 0]) + new_impl * alpha[..., 0], old_impl)
            impl = impl.astype(np.float32)
            result.info["scene"] = new_scene.to_json()
            result.info["implausibility_map"] = _map_to_info(impl)
            out.append(GeneratedImage(result, prompt, seed, self.identity, params, _truth(new_scene, impl, mis)))
        return out

    def _redraw_alignment(
        self, scene: Scene, covered: Sequence[int], colours: Sequence[str], rng: np.random.Generator
    ) -> None:
        """Re-render, in place, the objects the mask covers whole as the prompt asks: each in its group's prompt
        colour (another colour with the world's ``wrong_colour`` rate); a covered extra object (the last of a
        group with more objects than its count) is left out with probability 1 - ``extra``. Then the scene's
        misaligned words, object flags and flaw list are recomputed (:func:`realign`)."""
        if not covered:
            return
        drop = set()
        for k in covered:
            obj = scene.objects[k]
            target = colours[obj.group]
            wrong = rng.random() < self.flaws.wrong_colour
            obj.colour = str(rng.choice([c for c in COLOURS if c != target])) if wrong else target
            if rng.random() >= self.flaws.extra and k == _extra_index(scene, obj.group):
                drop.add(k)
        scene.objects = [o for k, o in enumerate(scene.objects) if k not in drop]
        realign(scene)

    @staticmethod
    def _covered(scene: Scene, full: np.ndarray) -> list[int]:
        """Indices of objects whose drawn footprint (the misalignment map's 1.1 radii and a pixel of
        antialiasing) lies wholly inside the (H, W) bool mask of fully repainted pixels."""
        h, w = full.shape
        yy, xx = np.mgrid[0:h, 0:w]
        out = []
        for k, o in enumerate(scene.objects):
            cx, cy, reach = o.x / _SCALE, o.y / _SCALE, 1.1 * o.r / _SCALE + 1.0
            inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= reach**2
            if inside.any() and bool(full[inside].all()):
                out.append(k)
        return out

    @staticmethod
    def _touched(scene: Scene, mask: np.ndarray) -> list[int]:
        """Indices of objects whose footprint meets the (H, W) bool mask."""
        yy, xx = np.nonzero(mask)
        out = []
        for k, o in enumerate(scene.objects):
            cx, cy, reach = o.x / _SCALE, o.y / _SCALE, _BLOTCH_REACH * o.r / _SCALE
            if len(xx) and np.any((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= reach**2):
                out.append(k)
        return out

    # -- finetuning ------------------------------------------------------------------------------------------

    def fit(self, truths: Sequence[dict[str, Any]], prior_strength: float = 2.0) -> SyntheticGenerator:
        """A new generator whose flaw rates are the MLE from the ground truth (``counts``) of selected images."""
        missing = [i for i, t in enumerate(truths) if "counts" not in t]
        if missing:
            raise ValueError(f"truths {missing[:5]} carry no 'counts' (not made by the synthetic world)")
        flaws = fit_flaw_model([t["counts"] for t in truths], self.flaws, prior_strength)
        return SyntheticGenerator(flaws, self.size)


def _prompt_colours(prompt: str, scene: Scene) -> list[str]:
    """Per group of the scene, the colour the inpainting prompt asks for: the prompt's own groups when it parses
    into as many groups as the scene has, else the scene's prompt colours."""
    try:
        groups = parse_prompt(prompt)
    except ValueError:
        groups = []
    return [g.colour for g in (groups if len(groups) == len(scene.groups) else scene.groups)]


def _extra_index(scene: Scene, group: int) -> int | None:
    """Index of the group's extra object (its last one) when the group has more objects than its count allows
    (count, one less under a missing-object flaw); None otherwise."""
    members = [k for k, o in enumerate(scene.objects) if o.group == group]
    allowed = scene.groups[group].count - int(f"missing:{group}" in scene.flaws)
    return members[-1] if len(members) > allowed else None


def realign(scene: Scene) -> Scene:
    """Recompute, in place, a scene's alignment truth from its objects (the rules of
    :func:`rahf.data.synthetic.compose`): a group's colour word is misaligned when any of its objects has
    another colour; a missing-object flaw (kept from ``flaws``: nothing to point at, so no repair adds one)
    misaligns its count and shape words; more objects than allowed misalign the count word and flag the last
    one. Objects are flagged (drawn in the misalignment map) when wrongly coloured or extra; the
    ``wrong_colour``/``missing``/``extra`` entries of ``flaws`` are rebuilt, distortions kept. On a scene
    ``compose`` made this changes nothing. Returns ``scene``."""
    _, roles = prompt_of(scene.groups)
    misaligned: set[int] = set()
    group_flaws: list[str] = []
    for gi, g in enumerate(scene.groups):
        wrong = any(o.colour != g.colour for o in scene.objects if o.group == gi)
        missing = f"missing:{gi}" in scene.flaws
        extra = _extra_index(scene, gi)
        if wrong:
            misaligned.add(roles.index(f"colour:{gi}"))
            group_flaws.append(f"wrong_colour:{gi}")
        if missing:
            misaligned.update({roles.index(f"count:{gi}"), roles.index(f"shape:{gi}")})
            group_flaws.append(f"missing:{gi}")
        if extra is not None:
            misaligned.add(roles.index(f"count:{gi}"))
            group_flaws.append(f"extra:{gi}")
        for k, o in enumerate(scene.objects):
            if o.group == gi:
                o.misaligned = o.colour != g.colour or k == extra
    scene.misaligned_words = sorted(misaligned)
    scene.flaws = group_flaws + [f for f in scene.flaws if f.startswith("distortion")]
    return scene


def _map_to_info(m: np.ndarray) -> str:
    """An (H, W) map in [0, 1] as a text chunk (uint8, zlib, base64), so a composite's ground truth travels."""
    raw = np.rint(np.clip(m, 0, 1) * 255).astype(np.uint8).tobytes()
    return json.dumps({"shape": list(m.shape), "zlib": base64.b64encode(zlib.compress(raw)).decode()})


def _map_from_info(image: Image.Image) -> np.ndarray:
    d = json.loads(image.info["implausibility_map"])
    raw = np.frombuffer(zlib.decompress(base64.b64decode(d["zlib"])), np.uint8)
    return raw.reshape(d["shape"]).astype(np.float32) / 255.0


class GroundTruthScorer:
    """Scores images of the synthetic world with their exact ground truth, through the same ``score`` call as
    ``RAHFScorer`` (the :class:`common.records.Scorer` protocol): an oracle to test the loop's logic apart from
    RAHF's accuracy, and to measure what a repair or a finetuning really changed."""

    def __init__(self) -> None:
        self.identity: dict[str, str | None] = {"source": "synthetic ground truth", "weights_hash": None}

    def score(
        self,
        prompt: str | Sequence[str],
        images: Sequence[Image.Image],
        *,
        heatmaps: Sequence[str] | None = None,
        keywords: bool = True,
        scores_only: bool = False,
        errors: str = "raise",
        **unused: Any,
    ) -> list[RichFeedback | ScoringFailure]:
        """The truth of each image as :class:`RichFeedback`: its scores, its maps (``heatmaps``, default all;
        none with ``scores_only``) at the image's size, and its misaligned words (with ``keywords`` and not
        ``scores_only``). An image
        the world did not make (no ``scene``) raises ValueError, or becomes a :class:`ScoringFailure` with
        ``errors="return"``. Other options of ``RAHFScorer.score`` (``heatmap_size``, ...) are accepted and
        change nothing."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        names = () if scores_only else tuple(HEATMAP_NAMES if heatmaps is None else heatmaps)
        unknown = set(names) - set(HEATMAP_NAMES)
        if unknown:
            raise ValueError(f"unknown heatmaps {sorted(unknown)}; known: {HEATMAP_NAMES}")
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images; pass one prompt or one per image")
        out: list[RichFeedback | ScoringFailure] = []
        for i, (p, image) in enumerate(zip(prompts, images)):
            try:
                truth = ground_truth(image)
            except ValueError as err:
                if errors == "raise":
                    raise
                out.append(ScoringFailure(i, p, str(err)))
                continue
            words = [w for w, lab in zip(truth["words"], truth["word_labels"]) if lab == 0]
            words = words if keywords and not scores_only else []
            maps = {n: truth["maps"][n] for n in names}
            out.append(RichFeedback(p, dict(truth["scores"]), maps, words))
        return out


def ground_truth(image: Image.Image) -> dict[str, Any]:
    """The exact truth of an image the synthetic world made (after any number of its inpaintings)."""
    if "scene" not in image.info:
        raise ValueError("no 'scene' in the image: not made by the synthetic generator (or saved without PNG text)")
    scene = Scene.from_json(image.info["scene"])
    _, impl, mis = rasterise(scene)
    if "implausibility_map" in image.info:
        impl = _map_from_info(image)
    return _truth(scene, impl, mis)
