"""The model sizes in one table, the paper's low-rank settings, and the model builder.

The tiny sizes run on a CPU (nano for tests; 9m, 20m, 35m as in GaLore's ``configs/``);
60m ... 7b are the GaLore / SubTrack++ paper sizes (vocabulary 32000, context 256).
"""

from __future__ import annotations

import dataclasses

from models.llama import Llama, LlamaConfig


def _size(hidden: int, intermediate: int, heads: int, layers: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                       num_heads=heads, num_layers=layers)


SIZES: dict[str, LlamaConfig] = {
    #            hidden  ffn  heads layers
    "nano": _size(64,    176,   4,   2),
    "9m":   _size(128,   352,   4,   4),
    "20m":  _size(256,   688,   4,   4),
    "35m":  _size(384,  1024,   8,   6),
    "60m":  _size(512,  1376,   8,   8),
    "130m": _size(768,  2048,  12,  12),
    "350m": _size(1024, 2736,  16,  24),
    "1b":   _size(2048, 5461,  32,  24),
    "3b":   _size(2560, 6848,  32,  32),
    "7b":   _size(4096, 11008, 32,  32),
}

# Low-rank settings of the paper table: size -> (rank r, subspace update interval k).
PAPER_RANK: dict[str, tuple[int, int]] = {
    "60m":  (128,  200),
    "130m": (256,  200),
    "350m": (256,  200),
    "1b":   (512,  200),
    "3b":   (512,  200),
    "7b":   (1024, 500),
}


def count_parameters(cfg: LlamaConfig) -> int:
    """Number of parameters of ``Llama(cfg)``, computed from the shapes without allocating."""
    d, ffn = cfg.hidden_size, cfg.intermediate_size
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    attention = 2 * d * d + 2 * d * kv_dim       # q, o: (d, d); k, v: (kv_dim, d)
    mlp = 3 * d * ffn                            # gate, up: (ffn, d); down: (d, ffn)
    norms = 2 * d                                # input and post-attention RMSNorm
    embeddings = 2 * cfg.vocab_size * d          # embed_tokens and the untied lm_head
    return embeddings + cfg.num_layers * (attention + mlp + norms) + d  # + final norm


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``, for MFU.

    PaLM's count (appendix B): 6 per weight of every matrix multiply (the embedding lookup is
    not one, lm_head is) plus 12 * layers * hidden * seq_len for attention scores and the
    weighted sum over the full T x T square (causal masking is not subtracted, as in PaLM).
    """
    matmul_weights = count_parameters(cfg) - cfg.vocab_size * cfg.hidden_size - (2 * cfg.num_layers + 1) * cfg.hidden_size
    return 6 * matmul_weights + 12 * cfg.num_layers * cfg.hidden_size * seq_len


def get_config(size_or_config: str | LlamaConfig, **overrides) -> LlamaConfig:
    """A fresh LlamaConfig: a name from SIZES or a given config, with fields replaced by overrides."""
    if isinstance(size_or_config, LlamaConfig):
        base = size_or_config
    elif size_or_config in SIZES:
        base = SIZES[size_or_config]
    else:
        raise ValueError(f"unknown model size {size_or_config!r}; known sizes: {', '.join(SIZES)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)})
    if unknown:
        raise ValueError(f"unknown LlamaConfig fields {unknown} in overrides")
    if "num_heads" in overrides and "num_kv_heads" not in overrides and base.num_kv_heads == base.num_heads:
        overrides["num_kv_heads"] = None  # plain multi-head attention stays plain with the new head count
    # replace() copies, so the shared entries of SIZES are never mutated.
    return dataclasses.replace(base, **overrides)


def build_model(size_or_config: str | LlamaConfig, **overrides) -> Llama:
    """``build_model("60m", vocab_size=tokenizer.vocab_size) -> Llama``, initialised.

    Build under ``with torch.device("meta"):`` to get shapes without allocating memory.
    """
    return Llama(get_config(size_or_config, **overrides))
