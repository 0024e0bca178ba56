"""Blockwise 8-bit storage for optimizer moments, through ``bitsandbytes.functional``.

A float32 tensor x is cut into blocks of ``BLOCKSIZE`` = 256 consecutive elements (flattened
order); each block keeps one float32 absmax and each element one uint8 code, the index of
(approximately) the nearest value of x / absmax in bitsandbytes' dynamic quantization map
(signed map for first moments M, unsigned map for second moments V). This is exactly what
``bitsandbytes.optim.AdamW8bit`` stores; we only keep it in plain tensors so it lives in
optimizer state and checkpoints as it is (no re-quantization on save or resume).

Tensors with fewer than ``MIN_8BIT_NUMEL`` elements stay float32, as bitsandbytes does
(``min_8bit_size``): the absmax overhead and the error are not worth it there.

Three layers, from low to high:

- ``pack(x, signed) -> {"codes", "absmax"}`` and ``unpack(packed, signed) -> x``: the codec.
- ``init_moment / read_moment / write_moment(state, key, ...)``: a moment kept in an optimizer
  state dict under flat keys: ``state[key]`` (uint8 codes, same shape as the moment, or the
  float32 moment itself when it stays 32-bit) and ``state[key + "_absmax"]`` (float32, one per
  block; absent in 32-bit). Reading always gives float32; writing re-quantizes in place, so the
  state tensors keep their identity (what a sharded wrapper or a pre-populated state expects).
- ``adamw_step``: bitsandbytes' fused blockwise 8-bit AdamW update of one tensor (CPU and CUDA
  kernels), for weights that are not projected (its state made by ``init_moment``).
"""
from __future__ import annotations

import math

import torch

from optim.nbytes import tensor_bytes
from optim.options import STATE_BITS, check
from optim.state_layout import Layout, Slot, allocate

BLOCKSIZE = 256  # the block size of bitsandbytes' blockwise 8-bit optimizers (CPU supports only this)
MIN_8BIT_NUMEL = 4096  # bitsandbytes' default min_8bit_size: smaller tensors keep float32 state
ABSMAX_SUFFIX = "_absmax"

_MAPS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _bnbf():
    """``bitsandbytes.functional``, imported on first use: only 8-bit state needs it, and its import
    prints warnings about optional kernels that a 32-bit run should not show."""
    import bitsandbytes.functional as bnbf

    return bnbf


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map, (256,) float32 sorted values in [-1, 1] (signed) or [0, 1]."""
    device = torch.device(device)
    key = (bool(signed), device)
    if key not in _MAPS:
        _MAPS[key] = _bnbf().create_dynamic_map(signed=bool(signed)).to(device)
    return _MAPS[key]


def num_blocks(numel: int) -> int:
    """Number of absmax values for a tensor of `numel` elements."""
    return -(-int(numel) // BLOCKSIZE)


def packed_nbytes(numel: int) -> int:
    """Bytes of one packed tensor: one uint8 code per element + one float32 absmax per block."""
    return int(numel) + 4 * num_blocks(numel)


def use_8bit(numel: int, state_bits: int) -> bool:
    """Whether a moment of `numel` elements is stored in 8 bits under `state_bits`."""
    check(STATE_BITS, state_bits)
    return state_bits == 8 and numel >= MIN_8BIT_NUMEL


# ---------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------

def pack(x: torch.Tensor, signed: bool) -> dict[str, torch.Tensor]:
    """x: any shape, float -> {"codes": uint8 (x.shape), "absmax": float32 (num_blocks(x.numel()),)}.

    `signed` picks the map: True for values of either sign (first moments), False for
    non-negative values (second moments; a negative value would be clipped to 0).
    """
    codes, state = _bnbf().quantize_blockwise(x.detach().float().contiguous(),
                                              code=dynamic_map(signed, x.device), blocksize=BLOCKSIZE)
    return {"codes": codes, "absmax": state.absmax}


def unpack(packed: dict[str, torch.Tensor], signed: bool) -> torch.Tensor:
    """Inverse of `pack`: float32 tensor of the codes' shape (x up to the quantization error)."""
    codes, absmax = packed["codes"], packed["absmax"]
    return _bnbf().dequantize_blockwise(codes, absmax=absmax, code=dynamic_map(signed, codes.device),
                                        blocksize=BLOCKSIZE)


def pack_into(packed: dict[str, torch.Tensor], x: torch.Tensor, signed: bool) -> None:
    """Re-quantize x into the existing tensors of `packed` (their identity is kept)."""
    fresh = pack(x, signed)
    if fresh["codes"].shape != packed["codes"].shape:
        raise ValueError(f"cannot pack a tensor of shape {tuple(x.shape)} into codes of shape "
                         f"{tuple(packed['codes'].shape)}")
    packed["codes"].copy_(fresh["codes"])
    packed["absmax"].copy_(fresh["absmax"])


# ---------------------------------------------------------------------------------------------
# Moments in an optimizer state dict (flat keys, tensors only)
# ---------------------------------------------------------------------------------------------

def moment_layout(key: str, shape, state_bits: int, full_shape=None) -> Layout:
    """The state of one zero moment of `shape` at `key`: uint8 codes of `shape` + float32 absmax at
    key + "_absmax" when stored in 8 bits, else a float32 moment.

    full_shape: the whole moment's shape when `shape` is one shard of it (default: `shape`); it decides
    8 bits or 32, so every shard of a moment is stored alike. Zero codes with zero absmax dequantize to
    exactly 0, as bitsandbytes initialises its state.
    """
    shape = tuple(shape)
    if use_8bit(math.prod(shape if full_shape is None else full_shape), state_bits):
        absmax = Slot((num_blocks(math.prod(shape)),), torch.float32)
        return {key: Slot(shape, torch.uint8), key + ABSMAX_SUFFIX: absmax}
    return {key: Slot(shape, torch.float32)}


def init_moment(state: dict, key: str, shape, device, state_bits: int, full_shape=None) -> None:
    """Zero moment at state[key] as `moment_layout` declares it (a stale absmax of a 32-bit one removed)."""
    state.pop(key + ABSMAX_SUFFIX, None)
    state.update(allocate(moment_layout(key, shape, state_bits, full_shape), device))


def is_8bit(state: dict, key: str) -> bool:
    """Whether state[key] holds 8-bit codes (rather than a float32 moment)."""
    return state[key].dtype == torch.uint8


def read_moment(state: dict, key: str, signed: bool) -> torch.Tensor:
    """The moment at state[key] as a float32 tensor (a fresh tensor when 8-bit, the state tensor itself when 32-bit)."""
    if is_8bit(state, key):
        return unpack({"codes": state[key], "absmax": state[key + ABSMAX_SUFFIX]}, signed)
    return state[key]


def write_moment(state: dict, key: str, x: torch.Tensor, signed: bool) -> None:
    """Store x (float32, the moment's shape) at state[key] in the moment's format, in place."""
    if is_8bit(state, key):
        pack_into({"codes": state[key], "absmax": state[key + ABSMAX_SUFFIX]}, x, signed)
    elif x is not state[key]:
        state[key].copy_(x)


def moment_nbytes(state: dict, key: str) -> int:
    """Bytes the moment at state[key] occupies (codes + absmax, or the float32 tensor)."""
    tensors = [state[key]] + ([state[key + ABSMAX_SUFFIX]] if is_8bit(state, key) else [])
    return tensor_bytes(tensors)


# ---------------------------------------------------------------------------------------------
# bitsandbytes' fused 8-bit AdamW on one tensor (non-projected weights)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def adamw_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, betas=(0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One AdamW step of p (in place) with bitsandbytes' fused update, as ``bnb.optim.AdamW8bit`` does:
    decoupled weight decay p *= 1 - lr * wd, bias-corrected m / (sqrt(v / (1 - beta2^t)) + eps).

    8-bit state goes through ``optimizer_update_8bit_blockwise``, 32-bit state (small tensors)
    through ``optimizer_update_32bit``, the same split as AdamW8bit. p and grad: same shape.
    """
    if grad.shape != p.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match parameter shape {tuple(p.shape)}")
    if not p.is_contiguous():
        raise ValueError("adamw_step updates p in place and needs a contiguous parameter; "
                         "call p.data = p.data.contiguous()")
    grad = grad.contiguous()
    state["step"] += 1
    step = int(state["step"].item())
    beta1, beta2 = betas
    bnbf = _bnbf()
    if is_8bit(state, "exp_avg"):
        bnbf.optimizer_update_8bit_blockwise(
            "adam", grad, p, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, 0.0, 0.0, eps, step, lr,
            dynamic_map(True, p.device), dynamic_map(False, p.device),
            state["exp_avg" + ABSMAX_SUFFIX], state["exp_avg_sq" + ABSMAX_SUFFIX], weight_decay)
    else:
        bnbf.optimizer_update_32bit(
            "adam", grad, p, state["exp_avg"], beta1, eps, step, lr, state["exp_avg_sq"], beta2,
            weight_decay=weight_decay)
