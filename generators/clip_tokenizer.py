"""An offline byte-level CLIP tokenizer for the tiny generator presets.

Real checkpoints ship their own tokenizer (49,408 BPE tokens). The tiny presets cannot download one, so they use
a CLIP tokenizer whose vocabulary is the 256 byte symbols, their end-of-word forms, and the two specials, with no
merges: every string encodes (nothing maps to the unknown token), it builds in milliseconds, and it is the same
on every machine. Ids: bytes 0–255, end-of-word bytes 256–511, ``<|startoftext|>`` 512, ``<|endoftext|>`` 513.
"""

from __future__ import annotations

from transformers import CLIPTextConfig, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS_ID, EOS_ID = 512, 513
VOCAB_SIZE = 514


def build_offline_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The byte-level tokenizer above, padding with ``<|endoftext|>`` to ``model_max_length``."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab |= {s + "</w>": 256 + i for i, s in enumerate(symbols)}
    vocab |= {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    """The tiny presets' CLIP text encoder: 2 layers of width 32 over this tokenizer's ids (hidden size 32 is the
    generators' cross-attention width)."""
    extra = {"projection_dim": projection_dim} if projection_dim is not None else {}
    return CLIPTextConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        **extra,
    )
