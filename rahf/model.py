"""RAHF: the Rich Automatic Human Feedback model (Liang et al., CVPR 2024, §4.1).

Read top to bottom: the channel norm and convolution blocks, the heatmap and score heads, the config
dataclass, then the model.

A ViT turns the image into tokens; a linear layer projects them to the T5 width; they are concatenated with
the T5-embedded prompt tokens and fused by the T5 *encoder* under an attention mask that hides prompt padding.
The encoded image tokens (CLS dropped) form a (B, D, g, g) grid read by the heads:

* heatmap head: two convs, then log2(patch) stride-2 transposed-conv stages with residual conv blocks
  (g -> patch * g = the ViT input size), then conv -> 1 channel -> sigmoid: (B, S, S) in [0, 1].
* score head: six conv3x3 + channel-norm + ReLU blocks narrowing the channels, flatten, MLP -> sigmoid: (B,).
* keyword sequence: the T5 decoder cross-attends to the encoded *text* tokens and emits the cleaned prompt with
  `_0` appended to each misaligned word.

Optional image–text matching (ITM) loss, off by default (the paper has none): a small MLP on the mean-pooled
grid tells the batch's own prompts from another sample's prompt, fused with the same image tokens. It gives the
fusion encoder a dense cross-modal signal from the first step; multi-head variant only.

Two variants: ``multi_head`` (one head per heatmap and per score, one encoder pass) and ``augmented_prompt``
(one heatmap head, one score head; the prompt is prefixed with a task string and the encoder runs once per
task, batched; the ViT runs once per image either way).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel
from transformers.modeling_outputs import BaseModelOutput

from common.config_fields import (
    Count,
    Fields,
    Fraction,
    NonNegative,
    Positive,
    PositiveInt,
    Range,
    check_fields,
    from_mapping,
    load_json_config,
)
from common.names import HEATMAP_NAMES, SCORE_NAMES  # defined in common.names, re-exported here

KEYWORDS_TASK = "keywords"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """T5-style norm over the channel axis of a feature map: no mean subtraction, no bias.

    Works on NCHW and channels-last tensors alike (the reduction is over dim 1 either way).
    """

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        # ||x||_2 over channels avoids materialising x**2; the scale is applied in place on the fresh output.
        ms = torch.linalg.vector_norm(x.float(), ord=2, dim=1, keepdim=True).square() / x.shape[1]
        out = x * torch.rsqrt(ms + self.eps).to(x.dtype)
        return out.mul_(self.scale.to(x.dtype).view(1, -1, 1, 1))


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class UpStage(nn.Module):
    """Stride-2 transposed conv -> norm -> ReLU, then a residual block (conv-norm-ReLU-conv-norm) + ReLU."""

    def __init__(self, c_in: int, c_out: int, eps: float) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=3, stride=2, padding=1, output_padding=1)
        self.up_norm = ChannelRMSNorm(c_out, eps)
        self.conv1 = conv3x3(c_out, c_out)
        self.norm1 = ChannelRMSNorm(c_out, eps)
        self.conv2 = conv3x3(c_out, c_out)
        self.norm2 = ChannelRMSNorm(c_out, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, h, w) -> (B, C_out, 2h, 2w)."""
        # In-place activations act on fresh intermediates only (autograd-safe), saving memory traffic.
        x = F.relu(self.up_norm(self.up(x)), inplace=True)
        y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)), inplace=True)))
        return F.relu(y.add_(x), inplace=True)


class HeatmapHead(nn.Module):
    """Feature grid (B, D, g, g) -> heatmap (B, g * 2**len(up_channels), same) in [0, 1]."""

    def __init__(self, config: RAHFConfig) -> None:
        super().__init__()
        eps = config.head_norm_eps
        stem = []
        c = config.text["d_model"]
        for c_out in config.heatmap_stem_channels:  # conv -> ReLU -> norm, as in the published model
            stem.append(nn.ModuleDict({"conv": conv3x3(c, c_out), "norm": ChannelRMSNorm(c_out, eps)}))
            c = c_out
        self.stem = nn.ModuleList(stem)
        ups = []
        for c_out in config.heatmap_up_channels:
            ups.append(UpStage(c, c_out, eps))
            c = c_out
        self.up = nn.ModuleList(ups)
        self.out_conv1 = conv3x3(c, config.heatmap_out_channels)
        self.out_conv2 = conv3x3(config.heatmap_out_channels, 1)
        # Prior init: start near the (small) typical heatmap value with a gentle slope. Started at sigmoid(0) =
        # 0.5, the sparse-target MSE drives the output into saturation within a few dozen steps, where the
        # sigmoid's gradient vanishes and the head never learns where flaws are.
        prior = config.heatmap_prior
        nn.init.constant_(self.out_conv2.bias, math.log(prior / (1 - prior)))
        with torch.no_grad():
            self.out_conv2.weight.mul_(0.1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid: (B, D, g, g) -> (B, S, S) float in [0, 1], S = g * 2**stages."""
        x = grid
        for block in self.stem:
            x = block["norm"](F.relu(block["conv"](x), inplace=True))
        for stage in self.up:
            x = stage(x)
        x = self.out_conv2(F.relu(self.out_conv1(x), inplace=True))
        return torch.sigmoid(x).squeeze(1)


class PresenceGate(nn.Module):
    """Feature grid (B, D, g, g) -> (B,) logit that the image has any heat of one map.

    The grid is pooled two ways (mean and max over positions, (B, 2D)) and read by a one-hidden-layer MLP. The
    output bias starts at logit(``gate_init``), so at random init the gate passes most of the pixel map through.
    """

    def __init__(self, config: RAHFConfig) -> None:
        super().__init__()
        d = config.text["d_model"]
        self.mlp = nn.Sequential(nn.Linear(2 * d, config.gate_hidden), nn.ReLU(), nn.Linear(config.gate_hidden, 1))
        nn.init.constant_(self.mlp[2].bias, math.log(config.gate_init / (1 - config.gate_init)))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid: (B, D, g, g) -> (B,) float logits."""
        pooled = torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], dim=1)
        return self.mlp(pooled).squeeze(1)


class ScoreHead(nn.Module):
    """Feature grid (B, D, g, g) -> score (B,) in [0, 1]."""

    def __init__(self, config: RAHFConfig) -> None:
        super().__init__()
        eps = config.head_norm_eps
        blocks = []
        c = config.text["d_model"]
        for c_out in config.score_channels:
            blocks.append(nn.ModuleDict({"conv": conv3x3(c, c_out), "norm": ChannelRMSNorm(c_out, eps)}))
            c = c_out
        self.blocks = nn.ModuleList(blocks)
        dims = [c * config.grid_size**2, *config.score_mlp_widths, 1]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        if config.score_reads_prompt:  # only then, so heads without it keep their exact keys
            # Zero at init and drawn from no RNG: the head starts as the image-only head of the same seed.
            self.prompt_weight = nn.Parameter(torch.zeros(dims[1], 2 * config.text["d_model"]))

    def forward(self, grid: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """grid: (B, D, g, g); prompt: (B, 2D) pooled encoded prompt, needed iff ``score_reads_prompt``.
        Returns (B,) float in [0, 1]."""
        if (prompt is not None) != hasattr(self, "prompt_weight"):
            raise ValueError("the pooled prompt is given exactly when the config has score_reads_prompt")
        x = grid
        for block in self.blocks:
            x = F.relu(block["norm"](block["conv"](x)), inplace=True)
        # Flatten in NCHW order whatever the memory format, so weights mean the same everywhere.
        x = x.contiguous().flatten(1)
        for i, linear in enumerate(self.mlp):
            x = linear(x)
            if i == 0 and prompt is not None:
                x = x + F.linear(prompt.to(x.dtype), self.prompt_weight)  # = a linear layer on [grid ; prompt]
            if i < len(self.mlp) - 1:
                x = F.relu(x)
        return torch.sigmoid(x).squeeze(1)


def pool_prompt(text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Encoded prompt tokens (B, T, D) and their mask (B, T) -> (B, 2D): mean and max over the real tokens."""
    real = attention_mask.bool()[..., None]
    mean = (text_states * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
    peak = text_states.masked_fill(~real, torch.finfo(text_states.dtype).min).amax(dim=1)
    return torch.cat([mean, peak], dim=1)


class HeadRunner:
    """Applies a head to feature grids in the requested memory format, at most ``chunk`` grids at a time."""

    def __init__(self, channels_last: bool = False, chunk: int | None = None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"head_chunk must be >= 1, got {chunk}")
        self.channels_last = channels_last
        self.chunk = chunk

    def __call__(self, head: nn.Module, grid: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """grid (N, D, g, g) and per-row extra inputs (N, ...) -> head output (N, ...)."""
        if self.channels_last:
            grid = grid.contiguous(memory_format=torch.channels_last)
        if self.chunk is None or grid.shape[0] <= self.chunk:
            return head(grid, *extra)
        parts = zip(grid.split(self.chunk), *(e.split(self.chunk) for e in extra), strict=True)
        return torch.cat([head(*part) for part in parts])


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


LOSS_WEIGHTS = (
    "heatmap_loss_weight",
    "score_loss_weight",
    "token_loss_weight",
    "empty_heatmap_weight",
    "itm_loss_weight",
    "rank_loss_weight",
    "gate_loss_weight",
    "word_loss_weight",
)
HeatmapLoss = Literal["mse", "bce"]
HEATMAP_LOSSES = get_args(HeatmapLoss)  # per-pixel map losses (see heatmap_loss)
ItmPool = Literal["mean", "mean_max"]
ItmTarget = Literal["match", "alignment"]
# Config fields that only shape the training loss: a training run may override them (rahf.train.TrainConfig).
TRAINING_FIELDS = (
    *LOSS_WEIGHTS,
    "heatmap_loss",
    "heatmap_weights",
    "itm_negatives",
    "itm_swaps",
    "itm_target",
    "rank_temperature",
    "rank_min_gap",
)


@dataclass
class VisionFields:
    """The ViTConfig keyword arguments a RAHF config may hold (``RAHFConfig.vision``), with their types.

    Fields without a default must be given; absent optional ones are left to transformers' defaults (the
    defaults written here only mark them optional and are never filled in).
    """

    image_size: PositiveInt
    patch_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    intermediate_size: PositiveInt
    num_channels: PositiveInt = 3
    hidden_act: str = "gelu"
    hidden_dropout_prob: Fraction = 0.0
    attention_probs_dropout_prob: Fraction = 0.0
    initializer_range: Positive = 0.02
    layer_norm_eps: Positive = 1e-12
    qkv_bias: bool = True
    encoder_stride: PositiveInt = 16


@dataclass
class TextFields:
    """The T5Config keyword arguments a RAHF config may hold (``RAHFConfig.text``); as :class:`VisionFields`."""

    vocab_size: PositiveInt
    d_model: PositiveInt
    d_kv: PositiveInt
    d_ff: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    pad_token_id: Count
    eos_token_id: Count
    decoder_start_token_id: Count
    num_decoder_layers: PositiveInt = 12
    relative_attention_num_buckets: PositiveInt = 32
    relative_attention_max_distance: PositiveInt = 128
    dropout_rate: Fraction = 0.1
    layer_norm_epsilon: Positive = 1e-6
    initializer_factor: Positive = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    is_encoder_decoder: bool = True
    use_cache: bool = True


@dataclass
class RAHFConfig:
    """Every hyperparameter of RAHF. ``vision`` and ``text`` are ViTConfig / T5Config keyword dicts.

    Every field is checked against its annotation on construction (``common.config_fields``): a wrong type, an
    out-of-range number, an unknown or missing key of ``vision`` / ``text`` raises ``ValueError`` naming it.
    """

    # ViTConfig kwargs: image_size, patch_size, hidden_size, layers, heads, ...
    vision: Annotated[dict[str, Any], Fields(VisionFields, "vision")]
    # T5Config kwargs: vocab_size, d_model, d_kv, d_ff, num_layers, num_heads, ...
    text: Annotated[dict[str, Any], Fields(TextFields, "text")]
    variant: Literal["multi_head", "augmented_prompt"] = "multi_head"
    score_names: tuple[str, ...] = SCORE_NAMES
    heatmap_names: tuple[str, ...] = HEATMAP_NAMES
    heatmap_stem_channels: tuple[PositiveInt, ...] = (768, 384)  # convs before upsampling
    heatmap_up_channels: tuple[PositiveInt, ...] = (768, 384, 384, 192)  # one stride-2 stage each: log2(patch)
    heatmap_out_channels: PositiveInt = 192  # width of the last conv before the 1-channel output
    score_channels: tuple[PositiveInt, ...] = (768, 384, 192, 96, 48, 12)  # six narrowing conv blocks
    score_mlp_widths: tuple[PositiveInt, ...] = (512, 128)  # hidden widths of the score MLP
    head_norm_eps: Positive = 1e-8  # eps of the channel RMS norm in the heads
    # initial heatmap value (output bias = logit(prior)); random init only
    heatmap_prior: Annotated[float, Range(0, 1, open_low=True, open_high=True)] = 0.05
    # Task strings prefixed to the prompt in the augmented-prompt variant, one per output.
    task_prefixes: dict[str, str] = field(
        default_factory=lambda: {
            "implausibility": "implausibility heatmap:",
            "misalignment": "misalignment heatmap:",
            "plausibility": "plausibility score:",
            "alignment": "alignment score:",
            "aesthetics": "aesthetics score:",
            "overall": "overall score:",
            KEYWORDS_TASK: "misaligned keywords:",
        }
    )
    max_text_tokens: PositiveInt = 128  # prompt tokens kept (longer prompts are truncated, and reported)
    max_keyword_tokens: PositiveInt = 160  # upper bound on generated keyword-sequence tokens
    misaligned_suffix: str = "_0"  # appended to each misaligned word in the keyword sequence
    heatmap_loss_weight: NonNegative = 1.0  # w_h: per-heatmap pixel loss (see heatmap_loss)
    empty_heatmap_weight: NonNegative = 0.0  # extra map-loss weight on samples whose target map is empty (paper: 0)
    heatmap_loss: HeatmapLoss = "mse"  # per-pixel map loss: "mse" (paper) | "bce" (soft-target cross-entropy)
    # per-map factor on w_h (missing: 1; paper: 1)
    heatmap_weights: dict[str, NonNegative] = field(default_factory=dict)
    score_loss_weight: NonNegative = 1.0  # w_s: per-score MSE
    token_loss_weight: NonNegative = 1.0  # w_t: keyword-sequence token cross-entropy (pads ignored)
    itm_loss_weight: NonNegative = 0.0  # image-text matching BCE (paper: none); > 0 adds the ITM head (multi_head)
    itm_hidden: PositiveInt = 64  # hidden width of the ITM head's MLP
    itm_negatives: Count = 0  # images of a batch that also get a shifted-prompt negative (0: all of them)
    # How the ITM head pools the fused image tokens: "mean" (B, D), or "mean_max" (B, 2D), mean and max over the
    # grid. A prompt that disagrees with one object shows on that object's few tokens; the mean dilutes them by
    # the whole grid (1/256 at a 16x16 grid) and so does the gradient that teaches the fusion to read the prompt.
    itm_pool: ItmPool = "mean"
    # Classes of interchangeable words (colours, say). When given, every image whose prompt has a word of a class
    # also gets an edited-prompt ITM negative: its own prompt with that word swapped for another of the class
    # (rahf.words.swap_word). A shifted prompt differs in everything; an edited one only in what the word binds.
    itm_swaps: tuple[tuple[str, ...], ...] = ()
    # The ITM target of an image with its own prompt (or an identical one): "match", 1 whatever the image shows,
    # or "alignment", the image's labelled alignment score, so a flawed image's own prompt is not taught as a
    # perfect match (needs alignment labels). Another or an edited prompt's target stays 0 either way.
    itm_target: ItmTarget = "match"
    # Within-prompt ranking (paper: none): a pairwise logistic loss on each score over the pairs of a batch's
    # images of the same prompt (RAHFLabels.groups) whose true scores differ by more than rank_min_gap.
    rank_loss_weight: NonNegative = 0.0
    rank_temperature: Positive = 0.05  # score difference that counts as one logit of the pair's order
    rank_min_gap: NonNegative = 0.01  # pairs closer than this in truth are ties and left out
    # Presence gates (paper: none): > 0 adds, per heatmap, a small MLP on the pooled feature grid that predicts
    # whether the image has any of that heat; the map returned is the pixel map times that probability, and the
    # gate is also trained by a BCE against "the target map is not empty" with this weight (multi_head only).
    gate_loss_weight: NonNegative = 0.0
    gate_hidden: PositiveInt = 64  # hidden width of each gate's MLP
    gate_init: Annotated[float, Range(0, 1, open_low=True, open_high=True)] = 0.9  # gate value at random init
    # Score heads that read the prompt (paper: none; multi_head only): the encoded prompt tokens, pooled by mean
    # and max over the real tokens, enter each score head's first MLP layer beside the image grid. Alignment is
    # a property of the words as much as of the pixels; the encoded words have attended to the image.
    score_reads_prompt: bool = False
    # Word head (paper: none; multi_head only): > 0 adds a linear probe on each encoded prompt token that predicts
    # whether its word is misaligned, trained by a BCE against the word labels with this weight. The decoder's
    # keyword loss reaches the same evidence only through copying the whole prompt; this puts it on the tokens.
    word_loss_weight: NonNegative = 0.0

    def __post_init__(self) -> None:
        check_fields(self)  # types and ranges of every field, from the annotations above
        size, patch = self.vision["image_size"], self.vision["patch_size"]
        if size % patch:
            raise ValueError(f"image_size {size} is not a multiple of patch_size {patch}")
        if 2 ** len(self.heatmap_up_channels) != patch:
            raise ValueError(
                f"{len(self.heatmap_up_channels)} upsampling stages give x{2 ** len(self.heatmap_up_channels)}, "
                f"but the heatmap must grow by the patch size {patch} to reach the input resolution"
            )
        for name in self.heatmap_weights:
            if name not in self.heatmap_names:
                raise ValueError(f"heatmap_weights names {name!r}, which is not a heatmap of {self.heatmap_names}")
        if self.itm_loss_weight > 0 and self.variant != "multi_head":
            raise ValueError("itm_loss_weight > 0 needs the multi_head variant")
        if self.gate_loss_weight > 0 and self.variant != "multi_head":
            raise ValueError("gate_loss_weight > 0 needs the multi_head variant")
        if self.score_reads_prompt and self.variant != "multi_head":
            raise ValueError("score_reads_prompt needs the multi_head variant")
        if self.word_loss_weight > 0 and self.variant != "multi_head":
            raise ValueError("word_loss_weight > 0 needs the multi_head variant")
        if self.variant == "augmented_prompt":
            missing = [t for t in (*self.heatmap_names, *self.score_names) if t not in self.task_prefixes]
            if missing:
                raise ValueError(f"augmented_prompt needs a task prefix for {missing}")

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def grid_size(self) -> int:
        return self.image_size // int(self.vision["patch_size"])

    def vit_config(self) -> ViTConfig:
        return ViTConfig(**self.vision)

    def t5_config(self) -> T5Config:
        return T5Config(**self.text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps({"model_type": "rahf", **self.to_dict()}, indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RAHFConfig:
        """Build from a dict of fields (``model_type`` ignored); unknown or missing fields raise."""
        return from_mapping(cls, {k: v for k, v in data.items() if k != "model_type"}, "RAHFConfig")

    @classmethod
    def load(cls, directory: str | Path) -> RAHFConfig:
        """Read ``config.json``; bad JSON or any bad field raises ``ValueError`` naming the file and the field."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        return load_json_config(cls, path, "RAHFConfig", ignore=("model_type",))


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RAHFLabels:
    """Training targets. Maps (B, S, S) and scores (B,) in [0, 1]; keyword_ids (B, L) with -100 on pads."""

    heatmaps: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    keyword_ids: torch.Tensor | None = None
    groups: torch.Tensor | None = None  # (B,) int: images with the same value share a prompt (for rank_loss_weight)
    # (B, T) float over the prompt tokens: 1 = the token's word is misaligned, 0 = aligned, -1 = no word (pads, EOS)
    word_targets: torch.Tensor | None = None
    # edited-prompt ITM negatives (config.itm_swaps): token ids and mask (E, T') of the edited prompts of the
    # images at swap_rows (E,) int64; each is a negative of its image
    swap_ids: torch.Tensor | None = None
    swap_mask: torch.Tensor | None = None
    swap_rows: torch.Tensor | None = None


def ranking_pairs(target: torch.Tensor, groups: torch.Tensor, min_gap: float) -> torch.Tensor:
    """(B, B) bool: pair (i, j) of the same group whose true score i exceeds j's by more than ``min_gap``."""
    return (groups[:, None] == groups[None, :]) & (target[:, None] - target[None, :] > min_gap)


def within_prompt_rank_loss(
    pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, temperature: float, min_gap: float
) -> torch.Tensor:
    """Mean over the ordered pairs of :func:`ranking_pairs` of softplus(−(pred_i − pred_j) / temperature): ln 2
    for a constant prediction, → 0 as the prediction orders each pair with a margin. 0 (with a graph) when the
    batch has no such pair. pred, target, groups: (B,)."""
    pairs = ranking_pairs(target.float(), groups, min_gap)
    logits = (pred.float()[:, None] - pred.float()[None, :]) / temperature
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    return F.softplus(-logits[pairs]).mean()


@dataclass
class RAHFOutput:
    """Forward result. heatmaps name -> (B, S, S) in [0, 1]; scores name -> (B,) in [0, 1]."""

    heatmaps: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    text_states: torch.Tensor | None = None  # (B, T, D) encoded prompt tokens the decoder reads
    text_mask: torch.Tensor | None = None  # (B, T) 1 = real token
    keyword_logits: torch.Tensor | None = None  # (B, L, V) under teacher forcing
    itm_logits: torch.Tensor | None = None  # (B + n,) matched-prompt logits: B own prompts, then n shifted ones
    itm_targets: torch.Tensor | None = None  # (B + n,) 1 (or its alignment, config.itm_target) = the image's own prompt
    gate_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) "has this heat" logits
    word_logits: torch.Tensor | None = None  # (B, T) "this token's word is misaligned" logits (word head only)
    loss: torch.Tensor | None = None
    loss_parts: dict[str, torch.Tensor] = field(default_factory=dict)


def empty_maps(target: torch.Tensor) -> torch.Tensor:
    """(B, H, W) target maps -> (B,) bool, True where a map has no heat at all (a flawless image for that map)."""
    return target.float().flatten(1).amax(dim=1) <= 0


def heatmap_loss(
    pred: torch.Tensor, target: torch.Tensor, empty_weight: float = 0.0, kind: str = "mse"
) -> torch.Tensor:
    """Per-pixel loss of (B, H, W) maps in [0, 1], each sample weighted 1 + ``empty_weight`` if its target is empty.

    ``kind="mse"`` is the paper's pixel MSE. ``kind="bce"`` is binary cross-entropy against the soft target minus
    the target's own entropy (so a perfect map scores 0). Both are minimised by the same map, the per-pixel
    expected target; they differ in the gradient they give the sigmoid's logit, ``2 (p - y) p (1 - p)`` for MSE and
    ``p - y`` for BCE. Under MSE a pixel whose prediction is already near 0 barely moves, so faint heat stays
    unordered; BCE keeps ranking the low end, which is what CC, NSS and AUC-Judd read.

    ``empty_weight``: the paper uses 0. Under it a model unsure whether an image has a flaw paints faint heat on
    flawless images, which the "MSE on GT = 0" metric charges; the extra weight makes false heat on flawless
    images cost more than missed heat elsewhere. The weights are normalised to mean one over the batch, so the
    loss scale does not depend on how many flawless samples a batch happens to hold.
    """
    if not (math.isfinite(empty_weight) and empty_weight >= 0):
        raise ValueError(f"empty_weight must be a finite number >= 0, got {empty_weight}")
    if kind not in HEATMAP_LOSSES:
        raise ValueError(f"heatmap loss must be one of {HEATMAP_LOSSES}, got {kind!r}")
    p, y = pred.float(), target.float()
    if kind == "mse":
        per_pixel = (p - y).square()
    else:
        # Written out rather than F.binary_cross_entropy, which autocast refuses; clamped so log() stays finite
        # (a pixel saturated past the clamp gets no gradient, as a saturated sigmoid gives none under MSE either).
        p = p.clamp(1e-6, 1.0 - 1e-6)
        per_pixel = -(y * p.log() + (1.0 - y) * (1.0 - p).log()) + (torch.xlogy(y, y) + torch.xlogy(1.0 - y, 1.0 - y))
    per_sample = per_pixel.flatten(1).mean(dim=1)
    if empty_weight == 0.0:
        return per_sample.mean()
    empty = empty_maps(y)
    weights = 1.0 + empty_weight * empty.float()
    return (weights * per_sample).sum() / weights.sum()


def word_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the tokens that belong to a word. logits, targets: (B, T); targets 1 / 0, −1 = ignored.
    0 (with a graph) when no token belongs to a word."""
    real = targets >= 0
    if not bool(real.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float()[real], targets.float()[real])


class RAHFModel(nn.Module):
    """RAHF built only from a :class:`RAHFConfig` (random init); weights come from ``from_pretrained``."""

    def __init__(self, config: RAHFConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = ViTModel(config.vit_config(), add_pooling_layer=False)
        self.text = T5ForConditionalGeneration(config.t5_config())
        self.visual_projection = nn.Linear(config.vision["hidden_size"], config.text["d_model"])
        if config.variant == "multi_head":
            self.heatmap_heads = nn.ModuleDict({n: HeatmapHead(config) for n in config.heatmap_names})
            self.score_heads = nn.ModuleDict({n: ScoreHead(config) for n in config.score_names})
        else:
            self.heatmap_heads = nn.ModuleDict({"shared": HeatmapHead(config)})
            self.score_heads = nn.ModuleDict({"shared": ScoreHead(config)})
        if config.itm_loss_weight > 0:  # only then, so checkpoints without ITM keep their exact keys
            d = config.text["d_model"] * (2 if config.itm_pool == "mean_max" else 1)
            self.itm_head = nn.Sequential(nn.Linear(d, config.itm_hidden), nn.ReLU(), nn.Linear(config.itm_hidden, 1))
        if config.gate_loss_weight > 0:  # likewise: a model without gates keeps its exact keys
            self.heatmap_gates = nn.ModuleDict({n: PresenceGate(config) for n in config.heatmap_names})
        if config.word_loss_weight > 0:  # likewise: built last, so the rest of the initialisation is unchanged
            self.word_head = nn.Linear(config.text["d_model"], 1)

    # -- encoders ------------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) normalised to [-1, 1] -> projected image tokens (B, 1 + g*g, D)."""
        tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        return self.visual_projection(tokens)

    def fuse(
        self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the T5 encoder over [image tokens ; prompt tokens] with prompt padding masked out.

        Returns the feature grid (B, D, g, g) of the encoded image tokens (CLS dropped) and the encoded
        prompt tokens (B, T, D).
        """
        n_img = image_tokens.shape[1]
        text_embeds = self.text.get_input_embeddings()(input_ids)
        embeds = torch.cat([image_tokens.to(text_embeds.dtype), text_embeds], dim=1)
        image_mask = attention_mask.new_ones(attention_mask.shape[0], n_img)
        mask = torch.cat([image_mask, attention_mask], dim=1)
        hidden = self.text.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        g = self.config.grid_size
        grid = hidden[:, 1:n_img].transpose(1, 2).reshape(hidden.shape[0], -1, g, g)
        return grid, hidden[:, n_img:]

    # -- heads ---------------------------------------------------------------------------------------------

    def heatmap_head(self, name: str) -> HeatmapHead:
        return self.heatmap_heads[name if self.config.variant == "multi_head" else "shared"]

    def score_head(self, name: str) -> ScoreHead:
        return self.score_heads[name if self.config.variant == "multi_head" else "shared"]

    # -- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        heatmaps: tuple[str, ...] | None = None,
        scores: tuple[str, ...] | None = None,
        keywords: bool = True,
        labels: RAHFLabels | None = None,
        channels_last: bool = False,
        head_chunk: int | None = None,
    ) -> RAHFOutput:
        """Predict the requested heatmaps and scores (default: all) and, with labels, the losses.

        Args:
            pixel_values: (B, 3, S, S) float, normalised with mean = std = 0.5.
            input_ids, attention_mask: (B, T) prompt tokens. In the augmented-prompt variant these are
                (B, K, T): one row per task in ``task_order(heatmaps, scores, keywords)``.
            heatmaps, scores: names to compute; ``()`` skips the heads entirely.
            keywords: keep the encoded prompt for the decoder (and compute the token loss with labels).
            labels: training targets; every target given must be among the computed outputs.
            channels_last: run the convolutional heads in channels-last memory format (faster on CPU/GPU).
            head_chunk: run the heads on at most this many feature maps at a time. Full-resolution heatmap
                activations cost ~0.5 GB per image at richhf-base size, so chunks bound peak memory; the
                convolutions at 384² already fill the hardware at batch 1, so speed does not suffer.
        """
        heatmaps = self.config.heatmap_names if heatmaps is None else tuple(heatmaps)
        scores = self.config.score_names if scores is None else tuple(scores)
        image_tokens = self.encode_image(pixel_values)
        heads = HeadRunner(channels_last, head_chunk)
        if self.config.variant == "multi_head":
            itm = labels is not None and self.config.itm_loss_weight > 0 and input_ids.shape[0] > 1
            out = self._forward_multi_head(
                image_tokens, input_ids, attention_mask, heatmaps, scores, keywords, heads, itm=itm, labels=labels
            )
        else:
            out = self._forward_augmented(image_tokens, input_ids, attention_mask, heatmaps, scores, keywords, heads)
        if labels is not None:
            self._add_losses(out, labels)
        return out

    def task_order(self, heatmaps: tuple[str, ...], scores: tuple[str, ...], keywords: bool) -> list[str]:
        """Tasks run by the augmented-prompt encoder, in batch order."""
        return [*heatmaps, *scores, *([KEYWORDS_TASK] if keywords else [])]

    def _forward_multi_head(
        self, image_tokens, input_ids, attention_mask, heatmaps, scores, keywords, heads, itm, labels=None
    ):
        if input_ids.dim() != 2:
            raise ValueError(f"multi_head expects input_ids (B, T), got {tuple(input_ids.shape)}")
        grid, text_states = self.fuse(image_tokens, input_ids, attention_mask)
        maps = {n: heads(self.heatmap_heads[n], grid) for n in heatmaps}
        gate_logits = {}
        if hasattr(self, "heatmap_gates") and heatmaps:
            gate_logits = {n: self.heatmap_gates[n](grid) for n in heatmaps}
            maps = {n: m * torch.sigmoid(gate_logits[n]).to(m.dtype)[:, None, None] for n, m in maps.items()}
        prompt = (pool_prompt(text_states, attention_mask),) if self.config.score_reads_prompt and scores else ()
        out = RAHFOutput(
            heatmaps=maps,
            gate_logits=gate_logits,
            scores={n: heads(self.score_heads[n], grid, *prompt) for n in scores},
            text_states=text_states if keywords else None,
            text_mask=attention_mask if keywords else None,
        )
        if hasattr(self, "word_head"):
            out.word_logits = self.word_head(text_states).squeeze(-1)
        if itm:
            self._image_text_matching(out, grid, image_tokens, input_ids, attention_mask, labels)
        return out

    def _image_text_matching(self, out, grid, image_tokens, input_ids, attention_mask, labels=None) -> None:
        """ITM logits for each image with its own prompt and, for the first n images, with the previous sample's
        prompt (the batch rolled by one). A rolled pairing is a negative unless both prompts are the same tokens.
        A batch of one image has no other prompt, so it gets no ITM loss. Edited-prompt negatives of ``labels``
        (``swap_ids`` for the images at ``swap_rows``, see ``config.itm_swaps``) follow, each a negative.
        """
        b = input_ids.shape[0]
        n = min(b, self.config.itm_negatives or b)  # the first n images get a negative (fewer: a cheaper step)
        shift = torch.roll(torch.arange(b, device=input_ids.device), 1)[:n]
        neg_grid, _ = self.fuse(image_tokens[:n], input_ids[shift], attention_mask[shift])
        pooled = torch.cat([self._itm_pool(grid), self._itm_pool(neg_grid)])
        out.itm_logits = self.itm_head(pooled).squeeze(1)
        same = (input_ids[shift] == input_ids[:n]).all(dim=1) & (attention_mask[shift] == attention_mask[:n]).all(dim=1)
        own = torch.ones(b, device=same.device)
        if self.config.itm_target == "alignment":
            if labels is None or "alignment" not in labels.scores:
                raise ValueError("itm_target 'alignment' needs alignment score labels")
            own = labels.scores["alignment"].to(own.device, own.dtype)
        out.itm_targets = torch.cat([own, same.float() * own[:n]])
        if labels is not None and labels.swap_rows is not None and len(labels.swap_rows):
            rows = labels.swap_rows
            swap_grid, _ = self.fuse(image_tokens[rows], labels.swap_ids, labels.swap_mask)
            out.itm_logits = torch.cat([out.itm_logits, self.itm_head(self._itm_pool(swap_grid)).squeeze(1)])
            out.itm_targets = torch.cat([out.itm_targets, torch.zeros(len(rows), device=same.device)])

    def _itm_pool(self, grid: torch.Tensor) -> torch.Tensor:
        """Feature grid (B, D, g, g) -> the ITM head's input: (B, D) mean, or (B, 2D) mean and max (config.itm_pool)."""
        mean = grid.mean(dim=(2, 3))
        return torch.cat([mean, grid.amax(dim=(2, 3))], dim=1) if self.config.itm_pool == "mean_max" else mean

    def _forward_augmented(self, image_tokens, input_ids, attention_mask, heatmaps, scores, keywords, heads):
        tasks = self.task_order(heatmaps, scores, keywords)
        b = image_tokens.shape[0]
        if input_ids.dim() != 3 or input_ids.shape[1] != len(tasks):
            raise ValueError(
                f"augmented_prompt expects input_ids (B, {len(tasks)}, T) for tasks {tasks}, "
                f"got {tuple(input_ids.shape)}"
            )
        k, t = input_ids.shape[1], input_ids.shape[2]
        # The ViT ran once per image; every task reuses its tokens. Batch layout: (B * K) rows, image-major.
        tokens = image_tokens.unsqueeze(1).expand(b, k, *image_tokens.shape[1:]).flatten(0, 1)
        grid, text_states = self.fuse(tokens, input_ids.reshape(b * k, t), attention_mask.reshape(b * k, t))
        grid = grid.reshape(b, k, *grid.shape[1:])
        nh, ns = len(heatmaps), len(scores)
        out = RAHFOutput(heatmaps={}, scores={})
        if nh:
            size = self.config.image_size
            maps = heads(self.heatmap_heads["shared"], grid[:, :nh].flatten(0, 1)).reshape(b, nh, size, size)
            out.heatmaps = {n: maps[:, i] for i, n in enumerate(heatmaps)}
        if ns:
            vals = heads(self.score_heads["shared"], grid[:, nh : nh + ns].flatten(0, 1)).reshape(b, ns)
            out.scores = {n: vals[:, i] for i, n in enumerate(scores)}
        if keywords:
            out.text_states = text_states.reshape(b, k, t, -1)[:, -1]
            out.text_mask = attention_mask[:, -1]
        return out

    # -- keyword sequence ----------------------------------------------------------------------------------

    def keyword_logits(
        self, text_states: torch.Tensor, text_mask: torch.Tensor, keyword_ids: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced decoder logits (B, L, V); keyword_ids (B, L) with -100 on pads."""
        decoder_input_ids = self.text._shift_right(
            keyword_ids.masked_fill(keyword_ids < 0, self.config.text["pad_token_id"])
        )
        return self.text(
            encoder_outputs=BaseModelOutput(last_hidden_state=text_states),
            attention_mask=text_mask,
            decoder_input_ids=decoder_input_ids,
        ).logits

    @torch.no_grad()
    def generate_keyword_ids(
        self, text_states: torch.Tensor, text_mask: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """Greedy decoding of the keyword sequence: (B, T, D), (B, T) -> token ids (B, <= max_new_tokens + 1)."""
        return self.text.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=text_states),
            attention_mask=text_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )

    # -- losses --------------------------------------------------------------------------------------------

    def _add_losses(self, out: RAHFOutput, labels: RAHFLabels) -> None:
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        for name, target in labels.heatmaps.items():
            if name not in out.heatmaps:
                raise ValueError(f"heatmap target {name!r} given but the heatmap was not computed")
            parts[f"heatmap/{name}"] = heatmap_loss(
                out.heatmaps[name], target, cfg.empty_heatmap_weight, cfg.heatmap_loss
            )
        for name, logit in out.gate_logits.items():
            if name in labels.heatmaps:
                present = (~empty_maps(labels.heatmaps[name])).float()
                parts[f"gate/{name}"] = F.binary_cross_entropy_with_logits(logit.float(), present)
        for name, target in labels.scores.items():
            if name not in out.scores:
                raise ValueError(f"score target {name!r} given but the score was not computed")
            parts[f"score/{name}"] = F.mse_loss(out.scores[name].float(), target.float())
            if cfg.rank_loss_weight > 0 and labels.groups is not None:
                parts[f"rank/{name}"] = within_prompt_rank_loss(
                    out.scores[name], target, labels.groups, cfg.rank_temperature, cfg.rank_min_gap
                )
        total = sum(
            (
                cfg.heatmap_loss_weight * cfg.heatmap_weights.get(k.removeprefix("heatmap/"), 1.0) * v
                for k, v in parts.items()
                if k.startswith("heatmap/")
            ),
            torch.zeros((), device=next(self.parameters()).device),
        )
        total = total + sum(
            (cfg.score_loss_weight * v for k, v in parts.items() if k.startswith("score/")), torch.zeros_like(total)
        )
        total = total + sum(
            (cfg.rank_loss_weight * v for k, v in parts.items() if k.startswith("rank/")), torch.zeros_like(total)
        )
        total = total + sum(
            (cfg.gate_loss_weight * v for k, v in parts.items() if k.startswith("gate/")), torch.zeros_like(total)
        )
        if labels.keyword_ids is not None:
            if out.text_states is None:
                raise ValueError("keyword targets given but keywords=False")
            logits = self.keyword_logits(out.text_states, out.text_mask, labels.keyword_ids)
            out.keyword_logits = logits
            parts["tokens"] = F.cross_entropy(
                logits.float().flatten(0, 1), labels.keyword_ids.flatten(), ignore_index=-100
            )
            total = total + cfg.token_loss_weight * parts["tokens"]
        if labels.word_targets is not None:
            if out.word_logits is None:
                raise ValueError("word targets given but the model has no word head (word_loss_weight = 0)")
            parts["words"] = word_loss(out.word_logits, labels.word_targets)
            total = total + cfg.word_loss_weight * parts["words"]
        if out.itm_logits is not None:
            parts["itm"] = F.binary_cross_entropy_with_logits(out.itm_logits.float(), out.itm_targets)
            total = total + cfg.itm_loss_weight * parts["itm"]
        out.loss = total
        out.loss_parts = parts

    # -- persistence ---------------------------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tied weights stored once)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in _untied_state_dict(self).items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model_type": "rahf"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> RAHFModel:
        """Build from ``config.json`` and load ``model.safetensors``; every key must match."""
        directory = Path(directory)
        model = cls(RAHFConfig.load(directory))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        model.load_state_dict_strict(load_file(str(weights)), source=str(weights))
        return model.to(device).eval()

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a state dict saved by :meth:`save_pretrained`; missing, unexpected or mis-shaped keys raise, and
        so do NaN or infinite values in any floating tensor (``source`` names where the tensors came from)."""
        own = _untied_state_dict(self)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or bad:
            raise ValueError(
                "state dict does not match the model: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                f"mis-shaped {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad[:8]]}"
            )
        nonfinite = nonfinite_tensors(state)
        if nonfinite:
            raise ValueError(
                f"{source}: non-finite values (NaN or inf) in {len(nonfinite)} tensor(s): "
                f"{nonfinite[:8]}{'...' if len(nonfinite) > 8 else ''}; such weights would make every output NaN"
            )
        self.load_state_dict(state, strict=False)
        self.text.tie_weights()


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of a state dict holding any NaN or infinite value, sorted.

    One min/max pass per tensor (NaN propagates through both; an infinity is an extreme), no mask built: on one
    CPU thread about 10x faster than ``torch.isfinite(v).all()`` (1.6 s for richhf-base's 641.6M values here).
    """
    bad = []
    for name, v in state.items():
        if v.is_floating_point() and v.numel():
            lo, hi = torch.aminmax(v)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                bad.append(name)
    return sorted(bad)


def _untied_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor kept under its first name only (safetensors refuses aliases)."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen[key] = name
        out[name] = tensor
    return out
