"""Model factory: transformers causal LMs built from a config by family and size (no downloads).

Sizes name architectures (layers, width, heads); the vocabulary comes from the data (256 for the byte-level default
corpus), so a "124M" GPT-2 is 124M parameters only with GPT-2's 50257-token vocabulary (85M with bytes).
"""

from __future__ import annotations

import os

import torch
from torch import nn

FAMILIES = ("gpt2", "llama")
SIZES = ("tiny", "124M", "350M", "1B")

# (layers, width, heads, kv_heads, mlp width for llama)
_SHAPES = {
    "tiny": (2, 128, 4, 2, 352),
    "124M": (12, 768, 12, 12, 2048),
    "350M": (24, 1024, 16, 16, 2816),
    "1B": (16, 2048, 32, 8, 8192),  # Llama-3.2-1B's shape; GPT-2 "1B" uses 20 layers of 2048 (below)
}


def gpt2_config(vocab_size: int, block_size: int, *, width: int, layers: int, heads: int, dropout: float = 0.0):
    """The project's GPT-2 config at any shape (tied embeddings, no KV cache, no special tokens): the engine's sizes
    and the benchmarks' custom widths are the same model family."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )


def model_config(family: str, size: str, vocab_size: int, block_size: int, dropout: float = 0.0):
    """A transformers config for ``family`` ("gpt2" | "llama") at ``size`` ("tiny" | "124M" | "350M" | "1B")."""
    if family not in FAMILIES:
        raise ValueError(f"invalid model family={family!r}: expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"invalid model size={size!r}: expected one of {SIZES}")
    if vocab_size < 2 or block_size < 1:
        raise ValueError(f"invalid vocab_size={vocab_size} / block_size={block_size}: expected >= 2 / >= 1")
    layers, width, heads, kv_heads, mlp = _SHAPES[size]
    if family == "gpt2":
        if size == "1B":
            layers, heads = 20, 16
        return gpt2_config(vocab_size, block_size, width=width, layers=layers, heads=heads, dropout=dropout)
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=block_size,
        attention_dropout=dropout,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )


def build_model(
    family: str = "gpt2",
    size: str = "tiny",
    *,
    vocab_size: int = 256,
    block_size: int = 128,
    dropout: float = 0.0,
    init_from: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A fresh causal LM from a config, or the model saved in the local HF directory ``init_from``."""
    from transformers import AutoModelForCausalLM

    if init_from:
        if not os.path.isdir(init_from):
            raise ValueError(f"invalid --init-from={init_from!r}: not a local directory (nothing is downloaded)")
        model = AutoModelForCausalLM.from_pretrained(init_from, local_files_only=True, dtype=dtype)
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"invalid --init-from={init_from!r}: its vocab_size={model.config.vocab_size} is smaller than the "
                f"data's {vocab_size}"
            )
        return model
    config = model_config(family, size, vocab_size, block_size, dropout)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
