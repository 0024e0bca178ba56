"""Llama, read top to bottom: config, RMSNorm, rotary embeddings, attention, MLP, block, model.

The math and the parameter names follow Hugging Face's ``LlamaForCausalLM`` (without its
``model.`` prefix), so a checkpoint exports to ``transformers`` exactly (see ``models/hf.py``):

    embed_tokens.weight                                   (V, d)
    layers.{i}.input_layernorm.weight                     (d,)
    layers.{i}.self_attn.{q,o}_proj.weight                (d, d)
    layers.{i}.self_attn.{k,v}_proj.weight                (kv_heads * head_dim, d)
    layers.{i}.post_attention_layernorm.weight            (d,)
    layers.{i}.mlp.{gate,up}_proj.weight                  (ffn, d)
    layers.{i}.mlp.down_proj.weight                       (d, ffn)
    norm.weight                                           (d,)
    lm_head.weight                                        (V, d)   (untied from embed_tokens)

Shapes below: B batch, T sequence length, d hidden size, H heads, K key/value heads,
D = d / H head dimension, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    """Everything that fixes the model's shape and initialisation.

    ``num_kv_heads`` None means plain multi-head attention (as many key/value heads as query
    heads); a divisor of ``num_heads`` gives grouped-query attention. ``max_seq_len`` is the
    length of the rotary cache, precomputed at construction and grown if a longer sequence
    arrives; it is exported as ``max_position_embeddings``.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    activation_checkpointing: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _check_positive_int("num_kv_heads", self.num_kv_heads)
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError("LlamaConfig.activation_checkpointing must be true or false, "
                             f"got {self.activation_checkpointing!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                f"choose num_heads among the divisors of {self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}: "
                "each key/value head must serve a whole group of query heads")
        if self.head_dim % 2:
            raise ValueError(
                f"head dimension hidden_size / num_heads = {self.head_dim} is odd; rotary "
                "embeddings rotate pairs of dimensions, so choose an even head dimension")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        """The fields as plain JSON values (what ``model_config.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "LlamaConfig":
        """Inverse of ``to_dict``; unknown keys are an error rather than silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**fields)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device=None):
    """cos, sin: (seq_len, D) in float32, Hugging Face's layout (the D/2 angles repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = torch.arange(seq_len, dtype=torch.float, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D); cos, sin: (T, D). Rotates each pair (i, i + D/2) by its angle."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with rotary positions; grouped-query when num_kv_heads < num_heads."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa lets each group of H / K query heads share one key/value head without a copy.
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), (B, T, d) -> (B, T, d)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only Llama: ``Llama(cfg)(input_ids: (B, T)) -> logits: (B, T, V)``.

    Logits come out in the dtype of the weights (float32 unless the model was cast or runs
    under autocast). The loss is left to the caller, which owns label shifting and masking.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Not saved in checkpoints: a pure function of the config, rebuilt by init_weights().
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GaLore's initialisation: every Linear and Embedding weight ~ N(0, init_std), norms = 1.

        Also (re)computes the rotary cache, so a model built on the meta device and then
        materialised with ``to_empty(device=...)`` becomes usable by calling this.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self._build_rope_cache(self.cfg.max_seq_len)

    def _build_rope_cache(self, seq_len: int):
        # Computed in float32 and then cast, as Hugging Face casts its float32 cos/sin. Outside
        # inference mode, so a cache grown during evaluation can still be used in training.
        with torch.inference_mode(False), torch.no_grad():
            cos, sin = rotary_cos_sin(seq_len, self.cfg.head_dim, self.cfg.rope_theta,
                                      device=self.embed_tokens.weight.device)
        dtype = self.rope_cos.dtype if self.rope_cos.is_floating_point() else torch.float32
        self.rope_cos, self.rope_sin = cos.to(dtype), sin.to(dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) int64 -> logits: (B, T, V)."""
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids of shape (batch, seq_len), got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.rope_cos.shape[0]:
            # Longer than max_seq_len: rotary embeddings extrapolate, so grow the cache.
            self._build_rope_cache(T)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(input_ids)  # (B, T, d)
        for block in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                # Recompute the block in backward instead of keeping its activations.
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.lm_head(self.norm(x))
