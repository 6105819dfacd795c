"""The scoring API: rich feedback for (prompt, image) pairs, batched, with explicit device and dtype.

Callers ask only for what they need — every output costs: at ``richhf-base`` size the two heatmap heads are
about three quarters of the compute and keyword decoding most of the rest. ``scores_only=True`` runs the ViT,
the fusion encoder and the four score heads only — and the heatmap heads too when the model has a score read-out
(:mod:`rahf.readout`), which computes the scores from the head scores and the maps.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.records import RichFeedback, ScoringFailure  # defined in common.records, re-exported here
from rahf.model import RAHFModel
from rahf.oom import is_out_of_memory, release_memory, run_in_batches
from rahf.presets import PRESETS, build_rahf
from rahf.processor import DEFAULT_MAX_PIXELS, ImageInput, InvalidImageError, RAHFProcessor, load_image, to_rgb
from rahf.readout import READOUT_FILE, ScoreReadout

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class RAHFScorer:
    """Scores (prompt, image) pairs with a RAHF model under ``torch.inference_mode``.

    Args:
        model, processor: a RAHF model and its processor.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: ``fp32``, ``bf16`` or ``fp16``; lower precisions run under autocast with fp32 weights (T5 is
            unstable with fp16 weights), outputs are returned as float32.
        batch_size: images per forward pass. A batch that runs out of GPU memory is retried at half the size
            (``rahf.oom``); ``batch_size`` then holds the size scoring settled on, for this and later calls, and
            ``requested_batch_size`` the one asked for.
        channels_last: run the convolutional heads channels-last (faster on CPU and GPU; same values).
        head_chunk: feature maps per head call; bounds the memory of full-resolution heatmap activations
            (~0.5 GB per image at richhf-base size) without slowing down.
        score_readout: a fitted :class:`~rahf.readout.ScoreReadout`; the scores returned are then its calibrated
            scores instead of the heads', and the maps are scaled by its presence gates when it has them.
            ``from_pretrained`` loads the folder's own unless ``score_readout=False``.
    """

    def __init__(
        self,
        model: RAHFModel,
        processor: RAHFProcessor,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        batch_size: int = 8,
        channels_last: bool = True,
        head_chunk: int | None = 2,
        score_readout: ScoreReadout | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = batch_size
        self.requested_batch_size = batch_size
        self.channels_last = channels_last
        self.head_chunk = head_chunk
        self.processor = processor
        self.model = model.to(self.device).eval()
        if score_readout is not None:
            score_readout.check_model(model.config.score_names, model.config.heatmap_names, "RAHFScorer")
        self.score_readout = score_readout
        #: what scored an image (recorded beside every score): where the weights came from and their hash
        self.identity: dict[str, str | None] = {"source": "in-memory", "weights_hash": None}
        if channels_last:
            self.model.heatmap_heads.to(memory_format=torch.channels_last)
            self.model.score_heads.to(memory_format=torch.channels_last)

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | Path, *, score_readout: bool = True, **kwargs) -> RAHFScorer:
        """Load a saved RAHF folder, a hub id of one, or build a preset name at random init (seed 0).

        A folder's score read-out (``score_readout.safetensors``) is applied unless ``score_readout=False`` (the
        heads' own scores); the weights hash of the identity then covers the read-out too."""
        if str(source) in PRESETS and not Path(source).exists():
            model, processor = build_rahf(str(source))
            scorer = cls(model, processor, **kwargs)
            scorer.identity = {"source": f"{source} (random init, seed 0)", "weights_hash": None}
            return scorer
        directory = Path(resolve_model_dir(source))
        readout = ScoreReadout.load(directory) if score_readout else None
        model, processor = RAHFModel.from_pretrained(directory), RAHFProcessor.from_pretrained(directory)
        scorer = cls(model, processor, score_readout=readout, **kwargs)
        weights = directory / "model.safetensors"
        digest = _file_hash(weights) if weights.is_file() else None
        if digest is not None and readout is not None:
            digest = f"{digest}+{_file_hash(directory / READOUT_FILE)}"
        scorer.identity = {"source": str(source), "weights_hash": digest}
        return scorer

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the model, its processor and its score read-out as one RAHF folder (``from_pretrained`` reads it
        back)."""
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        if self.score_readout is not None:
            self.score_readout.save(directory)

    # -- scoring -------------------------------------------------------------------------------------------

    def score(
        self,
        prompt: str | Sequence[str],
        images: Sequence[ImageInput],
        *,
        heatmaps: Sequence[str] | None = None,
        keywords: bool = True,
        scores_only: bool = False,
        heatmap_size: str = "model",
        errors: str = "raise",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_side: int | None = None,
    ) -> list[RichFeedback | ScoringFailure]:
        """Predict rich feedback for each image.

        Args:
            prompt: one prompt for all images, or one per image.
            images: PIL images (any mode, any size), paths or encoded bytes.
            heatmaps: heatmap names to predict (default all); ``()`` for none.
            keywords: decode the misaligned-keyword sequence.
            scores_only: only the four scores (no heatmaps, no decoding): the cheapest path (a model with a score
                read-out still runs its heatmap heads, which the read-out reads).
            heatmap_size: ``"model"`` ((S, S), the ViT input size) or ``"image"`` (each image's own (H, W)).
            errors: ``"raise"`` stops at the first bad input with a message naming it; ``"return"`` puts a
                :class:`ScoringFailure` at that position and scores the rest (an image that cannot be opened,
                decoded or converted, one over ``max_pixels``, a prompt that is not a string of valid Unicode).
            max_pixels: images with more pixels are refused (:class:`ImageTooLargeError`) from their header,
                before decoding; None for no limit of ours (Pillow's decompression-bomb limit still applies).
            max_side: reduce images whose long side is longer to that long side (aspect kept) as they are
                decoded, so memory per image is bounded; ``heatmap_size="image"`` heatmaps then come at the
                reduced size. Must be at least the model's input size. None keeps images as they are.
        """
        prompts = _expand_prompts(prompt, len(images), strict=errors != "return")
        if max_side is not None and max_side < self.processor.image_size:
            raise ValueError(f"max_side must be >= the model's input size {self.processor.image_size}, got {max_side}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
        if heatmap_size not in ("model", "image"):
            raise ValueError(f"heatmap_size must be 'model' or 'image', got {heatmap_size!r}")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        names = () if scores_only else tuple(self.model.config.heatmap_names if heatmaps is None else heatmaps)
        unknown = set(names) - set(self.model.config.heatmap_names)
        if unknown:
            raise ValueError(f"unknown heatmaps {sorted(unknown)}; known: {self.model.config.heatmap_names}")
        keywords = keywords and not scores_only
        results: list[RichFeedback | ScoringFailure | None] = [None] * len(images)
        # Decode per batch, so memory stays flat and one bad file is reported, not fatal to the rest. A batch that
        # runs out of memory is retried at half the size (rahf.oom); the images decoded for it are kept, not re-read.
        decoded: dict[int, Image.Image] = {}
        decoded_upto = 0

        def run(start: int, stop: int) -> None:
            nonlocal decoded_upto
            if stop > decoded_upto:
                indices = range(decoded_upto, stop)
                decoded.update(self._decode(images, prompts, indices, results, errors, (max_pixels, max_side)))
                decoded_upto = stop
            chunk = [(i, decoded[i]) for i in range(start, stop) if i in decoded]
            if chunk:
                try:
                    feedback = self._score_batch(
                        [prompts[i] for i, _ in chunk], [im for _, im in chunk], names, keywords, heatmap_size
                    )
                except Exception as err:  # one image alone out of memory: its failure record, when asked for
                    if errors == "raise" or stop - start > 1 or not is_out_of_memory(err):
                        raise
                    feedback = [ScoringFailure(start, prompts[start], f"out of memory at batch 1: {err}")]
                if isinstance(feedback[0], ScoringFailure):
                    release_memory(self.device)  # after the except block: the error's tensors are gone
                for (i, _), fb in zip(chunk, feedback):
                    results[i] = fb
            for i in range(start, stop):
                decoded.pop(i, None)

        run_in_batches(run, len(images), self.batch_size, device=self.device, what="scoring", on_settle=self._settle)
        return results  # type: ignore[return-value]

    def _settle(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def _decode(self, images, prompts, indices, results, errors, limits) -> list[tuple[int, Image.Image]]:
        """Decode the images at ``indices`` to RGB; bad ones become failures in ``results`` (or raise)."""
        max_pixels, max_side = limits
        ok = []
        for i in indices:
            problem = prompt_problem(prompts[i])
            if problem is not None:  # only reached with errors="return": "raise" refused it up front
                results[i] = ScoringFailure(i, prompts[i], problem)
                continue
            name = str(images[i]) if isinstance(images[i], (str, Path)) else f"#{i}"
            try:
                ok.append((i, to_rgb(load_image(images[i], name=name, max_pixels=max_pixels, max_side=max_side))))
            except InvalidImageError as err:
                if errors == "raise":
                    raise InvalidImageError(f"image {i}: {err}") from err
                results[i] = ScoringFailure(i, prompts[i], str(err))
        return ok

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def score_tensor(self, prompts: Sequence[str], pixels: torch.Tensor, score: str) -> torch.Tensor:
        """One predicted score of a batch of image tensors, differentiable (for reward guidance).

        Args:
            prompts: one prompt per image.
            pixels: (B, 3, H, W) float in [0, 1] on the scorer's device; resized (bilinear, antialiased) to the
                model's input size.
            score: a score name (``plausibility``, ``alignment``, ``aesthetics``, ``overall``).
        Returns:
            (B,) float32 in [0, 1], with the autograd graph back to ``pixels``.
        """
        model, proc = self.model, self.processor
        if score not in model.config.score_names:
            raise ValueError(f"unknown score {score!r}; choose from {model.config.score_names}")
        if pixels.ndim != 4 or pixels.shape[1] != 3 or len(prompts) != pixels.shape[0]:
            raise ValueError(f"pixels must be (B, 3, H, W) with B = {len(prompts)} prompts, got {tuple(pixels.shape)}")
        size = proc.image_size
        x = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - proc.image_mean) / proc.image_std
        readout = self.score_readout
        maps = readout.heatmap_names if readout else ()
        scores = tuple(dict.fromkeys((*readout.score_names, score))) if readout else (score,)
        if model.config.variant == "multi_head":
            text = proc.tokenize(list(prompts))
        else:  # one task row per output the forward computes
            tasks = model.task_order(maps, scores, False)
            text = proc.tokenize_tasks(list(prompts), [model.config.task_prefixes[t] for t in tasks])
        with self._autocast():
            out = model(
                x,
                text.input_ids.to(self.device),
                text.attention_mask.to(self.device),
                heatmaps=maps,
                scores=scores,
                keywords=False,
                channels_last=self.channels_last,
                head_chunk=self.head_chunk,
            )
        if readout is not None and score in readout.score_names:
            return readout.apply(out.scores, out.heatmaps)[0][score]
        return out.scores[score].float()

    @torch.inference_mode()
    def _score_batch(self, prompts, images, names, keywords, heatmap_size) -> list[RichFeedback]:
        model, proc, readout = self.model, self.processor, self.score_readout
        pixels = proc.preprocess_images(images).to(self.device)
        scores = model.config.score_names
        computed = names
        if readout is not None:  # the maps the read-out reads, in the model's order
            computed = tuple(n for n in model.config.heatmap_names if n in names or n in readout.heatmap_names)
        if model.config.variant == "multi_head":
            text = proc.tokenize(prompts)
        else:
            tasks = model.task_order(computed, scores, keywords)
            text = proc.tokenize_tasks(prompts, [model.config.task_prefixes[t] for t in tasks])
        with self._autocast():
            out = model(
                pixels,
                text.input_ids.to(self.device),
                text.attention_mask.to(self.device),
                heatmaps=computed,
                scores=scores,
                keywords=keywords,
                channels_last=self.channels_last,
                head_chunk=self.head_chunk,
            )
            if readout is not None:  # calibrated scores, and maps scaled by their presence gates
                scores_cal, maps_cal = readout.apply(out.scores, out.heatmaps)
                out.scores, out.heatmaps = {**out.scores, **scores_cal}, maps_cal
            sequences = None
            if keywords:
                budgets = proc.keyword_budgets(text, model.config.max_keyword_tokens)
                ids = model.generate_keyword_ids(out.text_states, out.text_mask, max(budgets))
                sequences = proc.decode_keywords(ids.cpu(), budgets)
        score_values = {n: out.scores[n].float().cpu().numpy() for n in scores}
        maps = {n: out.heatmaps[n].float() for n in names}
        results = []
        for j, prompt in enumerate(prompts):
            hm = {}
            for n in names:
                m = maps[n][j]
                if heatmap_size == "image" and (images[j].height, images[j].width) != tuple(m.shape):
                    m = F.interpolate(
                        m[None, None], size=(images[j].height, images[j].width), mode="bilinear", align_corners=False
                    )[0, 0].clamp(0, 1)
                hm[n] = m.cpu().numpy().astype(np.float32)
            results.append(
                RichFeedback(
                    prompt=prompt,
                    scores={n: float(score_values[n][j]) for n in scores},
                    heatmaps=hm,
                    misaligned_keywords=proc.misaligned_keywords(sequences[j]) if sequences else [],
                    keyword_sequence=sequences[j] if sequences else None,
                    prompt_truncated=text.truncated[j],
                )
            )
        return results


def resolve_model_dir(source: str | Path) -> Path:
    """A local RAHF folder as is; otherwise a hub id, fetched with ``huggingface_hub`` (needs the hub)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"RAHF model folder not found: {source}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # the hub client raises many types; the message is what matters
        raise FileNotFoundError(
            f"{source!r} is neither a local RAHF folder, a preset ({sorted(PRESETS)}), nor a reachable hub id: {err}"
        ) from err


def prompt_problem(prompt: object) -> str | None:
    """Why ``prompt`` cannot be scored (not a string, or not valid Unicode), or None when it can."""
    if not isinstance(prompt, str):
        kind = "null" if prompt is None else type(prompt).__name__
        return f"prompt must be a string, got {kind}"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"prompt is not valid Unicode (lone surrogate at position {err.start})"
    return None


def _expand_prompts(prompt: str | Sequence[str], n: int, *, strict: bool = True) -> list[str]:
    """One prompt per image; ``strict`` refuses prompts that cannot be scored (else ``_decode`` fails them)."""
    if isinstance(prompt, str):
        prompt = [prompt] * n
    prompts = list(prompt)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images; pass one prompt or one per image")
    if strict:
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be str; positions {bad[:5]} are not")
        bad = [i for i, p in enumerate(prompts) if prompt_problem(p)]
        if bad:
            raise ValueError(f"prompts must be valid Unicode; positions {bad[:5]} are not")
    return prompts
