"""Analytic memory of one training step: weights, gradients, optimizer state by kind, activations.

``estimate("7b", "subtrack++", rank=1024, state_bits=8, per_layer=True, batch=1, seq=256)``
returns a dict of bytes. Shapes come from the real model built on the meta device (no
allocation), and which weights are projected from ``optim.factory.is_projected``, so the
estimate follows the code rather than a copy of the paper's table.

The step it describes (pretrain/train.py's loss; what tests/test_memory.py measures)::

    loss = cross_entropy(model(input_ids).float().flatten(0, 1), labels.flatten())  # logits not kept
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

(pretrain/train.py also holds ``logits`` until its next step: b B T V more bytes, not counted.)

Assumptions, each a line of the breakdown:

- weights: one copy in ``dtype`` (pure bf16 or pure fp32 training; no fp32 master copy).
  ``autocast=True`` (fp32 weights under bf16 autocast, what pretrain/train.py does on CUDA)
  adds autocast's cache of bf16 copies of the Linear weights during forward and backward
  and counts activations in bf16 (the float32 residual stream it keeps is not modelled).
- gradients: one per weight in ``dtype``; with per-layer updates (each weight stepped in its
  post-accumulate-grad hook and its gradient freed) only the largest single gradient is alive.
- optimizer state (see ``state_bytes``): the bytes of the state each optimizer declares for a weight
  (optim.factory.state_layout; ours allocate from that declaration, so the two cannot drift):
  AdamW 32-bit (torch.optim.AdamW): exp_avg + exp_avg_sq in the weights' dtype (zeros_like).
  8-bit (bitsandbytes' blockwise layout, optim/quant8.py): 1 byte per element + one float32
  absmax per 256, for tensors of at least MIN_8BIT_NUMEL elements; smaller ones float32.
  Low-rank (galore, fira, subtrack, subtrack++) for a projected (m, n) weight: a float32 basis
  S (m, r) when m < n, or P (r, n) when m >= n; moments M, V of the projected gradient,
  (r, n) or (m, r), in float32 or 8-bit; a few 0-d counters (step counts, limiter norm,
  last angle); with optim.accumulate the gradient sum (m, n) since the last subspace update.
  Other weights (embeddings, norms, head) use AdamW as above (bitsandbytes' 8-bit AdamW when
  state_bits is 8).
- activations: the tensors autograd saves, counted per block from models/llama.py (and
  measured in tests with saved_tensors_hooks). Per block, with b the activation dtype's bytes,
  N = B*T tokens, d hidden, f intermediate, H heads, K kv heads, D head dim:
    2 RMSNorms:   2 * (4 N d [float32 input] + 2 b N d [normalised, output] + 4 N [rsqrt])
    attention:    b N d [q] + 2 b N K D [k, v] + b N d [output] + 4 N H [logsumexp]
    SwiGLU MLP:   4 b N f [gate, silu(gate), up, product]
  SDPA is assumed to use a fused kernel (flash / memory-efficient, or PyTorch's CPU flash
  kernel): no (T, T) attention matrix is stored. With activation checkpointing each block
  keeps only its input (b N d) and one block's activations are recomputed during backward.
  The head keeps the final norm's tensors and log_softmax's float32 output (4 N V); the
  logits are not kept by the loss. The first backward steps add two float32 (N, V) tensors.
- step temporaries: tensors an optimizer step allocates and frees (see ``step_temporaries``).
- peak: the largest of the first backward steps (weights, state, activations, loss and
  head gradients), the recompute of the last block under checkpointing, and the optimizer
  step (weights, state, all gradients, step temporaries); with per-layer updates each weight
  is stepped inside backward as soon as its gradient is ready, so one weight's gradient and
  step temporaries land on the backward's points instead. Steps that compute an SVD (every
  update interval for GaLore, the first step for SubTrack++) add its workspace for one weight
  at a time; that spike is not modelled.

FSDP2 over N processes (``shards=N``; ``torch.distributed.fsdp.fully_shard`` on every block and
on the root, optim/sharding/fsdp.py), figures per process:

- weights, gradients: each weight keeps ceil(m / N) of its m rows (FSDP2 pads dim 0 to a
  multiple of N, so that is every process's shard, the largest one exactly when N divides m).
- optimizer state: AdamW moments and low-rank moments are rows of the weight, (ceil(m / N), ...)
  and (ceil(m / N), r); 8 bits or not by the whole moment's size, blocks packed within the shard.
  Every projected weight uses the right side (FSDP requires optim.proj_type right): basis
  P (r, n) and the counters whole on every process (replicated, not divided).
- all-gathered: the unsharded weights of the block being computed and of the prefetched next
  one (2 blocks' full weights, ``gathered_weights``) at every forward/backward point, and one
  block's full gradient before its reduce-scatter (``gathered_gradient``) at the backward points.
  Activations (and the logits' tensors) are not sharded. Not modelled: the root group's
  (embedding, final norm, head) unsharded weights, which FSDP2 keeps from forward into backward
  (b (2 V d + d) more at the head's backward); the all-gather / reduce-scatter buffers beyond
  those copies; autocast's cache is counted whole (copies of unsharded weights). Per-layer
  updates are single-process (optim/per_layer.py) and refused with shards > 1.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from models.llama import LlamaConfig
from models.sizes import build_model, get_config
from optim import quant8
from optim.factory import APOLLO, LOW_RANK, MATRIX_PEERS, PRESETS, is_projected, needed_keys, state_layout
from optim.nbytes import tensor_bytes
from optim.options import STATE_BITS, check
from optim.per_layer import check_per_layer_allowed
from optim.state_layout import nbytes as layout_bytes

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
MATRIX_STATE = (*MATRIX_PEERS, *APOLLO)  # methods with their own matrix state (optim/hybrid.py, apollo-torch)
FULL_RANK_ADAMW = ("adamw", "adamw8bit")  # AdamW on every weight, the matrices included


@dataclass(frozen=True)
class Weight:
    """One parameter: its name, shape, and whether the low-rank optimizers project it."""

    name: str
    shape: tuple[int, ...]
    projected: bool

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def shard(self, shards: int) -> "Weight":
        """One process's rows under FSDP2 over `shards` processes: ceil(m / shards) of m (padded shard)."""
        return Weight(self.name, (-(-self.shape[0] // shards), *self.shape[1:]), self.projected)


def dtype_bytes(dtype) -> int:
    """Bytes per element of 'bf16' / 'fp32' / a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)} or a torch.dtype")
    return DTYPE_BYTES[dtype]


def model_weights(cfg: LlamaConfig) -> list[Weight]:
    """The model's parameters (names and shapes of models/llama.py), built on the meta device."""
    return list(_model_weights(tuple(sorted(cfg.to_dict().items()))))


@functools.lru_cache(maxsize=32)
def _model_weights(fields: tuple) -> tuple[Weight, ...]:
    with torch.device("meta"):
        model = build_model(LlamaConfig(**dict(fields)))
    return tuple(Weight(name, tuple(p.shape), is_projected(name, p)) for name, p in model.named_parameters())


# A dtype of each weight size (the state's dtypes depend only on the weight's bytes: fp16 counts as bf16).
WEIGHT_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}
BASIS_DTYPES = {2: "bfloat16", 4: "float32"}


def state_bytes(w: Weight, optim_name: str, rank: int | None, state_bits: int, weight_bytes: int,
                basis_bytes: int = 4, proj_type: str = "std", shards: int = 1, accumulate: bool = False,
                momentum: float | None = None) -> dict[str, int]:
    """Optimizer state of one weight by kind: {"basis", "moments", "scalars", "adamw"}, the bytes of the
    state the optimizer allocates for it (optim.factory.state_layout, the declaration it allocates from).

    Projected (m, n) weight under a low-rank optimizer, r = min(rank, m, n), side by
    optim.grassmann.projection_side(proj_type) (``std``: the shorter side):
        left  (std, m < n):  basis S (m, r), moments 2 x (r, n)
        right (std, m >= n): basis P (r, n), moments 2 x (m, r)
    (basis in float32 unless basis_bytes says otherwise; moments float32 or 8-bit; with accumulate the
    gradient sum (m, n) counts as a moment) e.g. 512 x 1376 at r = 128: 2 * 128 * 1376 + 512 * 128 numbers.
    With `shards` processes (FSDP2) the figures are one process's: row state (moments, AdamW
    moments) over ceil(m / shards) rows; the basis P and the counters whole (module docstring).
    momentum: Adafactor's optional first moment (optim/hybrid.py); 0-d tensors count as scalars, the
    weights that no method projects (or every weight under adamw) as "adamw".
    """
    if shards > 1 and w.projected and optim_name in MATRIX_STATE:
        raise ValueError(f"{optim_name} needs whole matrices; FSDP (shards > 1) refuses it")
    if shards > 1 and w.projected and optim_name in LOW_RANK:
        from optim.sharding.fsdp import check_row_local_projection  # loads DTensor: only for FSDP's estimates

        check_row_local_projection(proj_type, w.shape, w.name)
    # a rank above a weight's shorter side is estimated at that side (the optimizer refuses it)
    group = {"rank": min(rank, *w.shape) if rank else rank, "state_bits": state_bits, "proj_type": proj_type,
             "basis_dtype": BASIS_DTYPES[basis_bytes], "accumulate": accumulate, "momentum": momentum}
    layout = state_layout(optim_name, w.shape, WEIGHT_DTYPES[weight_bytes], w.projected, group,
                          w.shard(shards).shape[0] if shards > 1 else None)
    matrix_method = w.projected and optim_name not in FULL_RANK_ADAMW
    out = {"basis": 0, "moments": 0, "scalars": 0, "adamw": 0}
    for key, slot in layout.items():
        kind = ("basis" if key in ("basis", "projector") else "scalars" if slot.shape == ()
                else "moments" if matrix_method else "adamw")
        out[kind] += layout_bytes({key: slot})
    return out


def activation_bytes(cfg: LlamaConfig, batch: int, seq: int, act_bytes: int, checkpointing: bool) -> dict[str, int]:
    """Saved activations: {"blocks", "recompute", "head", "log_probs", "loss_backward"} (module docstring)."""
    N, d, f = batch * seq, cfg.hidden_size, cfg.intermediate_size
    H, K, D, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    b = act_bytes
    norm = 4 * N * d + 2 * b * N * d + 4 * N
    attention = b * N * d + 2 * b * N * K * D + b * N * d + 4 * N * H
    mlp = 4 * b * N * f
    block = 2 * norm + attention + mlp
    head = norm + 4 * N * V  # the logits themselves are freed once log_softmax has run
    if checkpointing:
        blocks, recompute = cfg.num_layers * b * N * d, block
    else:
        blocks, recompute = cfg.num_layers * block, 0
    return {"blocks": blocks, "recompute": recompute, "head": head, "log_probs": 4 * N * V,
            "loss_backward": 2 * 4 * N * V}


def weight_step_temporaries(w: Weight, optim_name: str, state_bits: int, weight_bytes: int, device: str) -> int:
    """Bytes the step of the single weight `w` allocates and frees again (one tensor at a time).

    Low-rank step of a projected (m, n) weight (optim/subtrack.py): float32 (m, n) tensors,
    four with recovery (back-projected update, back(R) scaled, G - back, its scaled copy),
    two without; plus the float32 copy of G and the update cast back when weights are not
    float32.
    bitsandbytes 8-bit AdamW: fused in place on CUDA; on CPU five float32 tensors of the
    weight's size: both moments dequantized, the scaled gradient, sqrt(V) and the denominator.
    AdamW (torch's single-tensor path, SubTrackAdamW's plain groups): sqrt(V) and the
    normalised update (or its bias-corrected copy), in the state's dtype.
    """
    if optim_name in LOW_RANK and w.projected:
        full = 4 if PRESETS[optim_name]["residual"] == "recover" else 2
        return (4 * full + (4 + weight_bytes if weight_bytes != 4 else 0)) * w.numel
    if optim_name in MATRIX_STATE and w.projected:  # float32 working tensors of the weight's size, about
        return {"muon": 3 * 2 + 4, "adafactor": 3 * 4}.get(optim_name, 4 * 4) * w.numel
    if state_bits == 8 and quant8.use_8bit(w.numel, 8):
        return 0 if device == "cuda" else 5 * 4 * w.numel
    return 2 * (4 if state_bits == 8 else weight_bytes) * w.numel


def step_temporaries(weights: list[Weight], optim_name: str, state_bits: int, weight_bytes: int,
                     per_layer: bool, device: str) -> int:
    """Bytes a whole optimizer step allocates and frees again: the largest single weight's
    (``weight_step_temporaries``), except torch AdamW's multi-tensor (foreach) path, PyTorch's
    default on CUDA, which builds sqrt(V) for all weights at once (a state-sized temporary);
    per-layer updates step one weight at a time."""
    largest = max(weight_step_temporaries(w, optim_name, state_bits, weight_bytes, device) for w in weights)
    if optim_name == "adamw" and state_bits == 32 and device == "cuda" and not per_layer:
        return max(largest, weight_bytes * sum(w.numel for w in weights))
    return largest


def estimate(size_or_cfg: str | LlamaConfig, optim_name: str = "adamw", rank: int | None = None,
             state_bits: int = 32, per_layer: bool = False, checkpointing: bool = False, batch: int = 1,
             seq: int = 256, dtype="bf16", activation_dtype=None, autocast: bool = False,
             basis_dtype="fp32", device: str = "cuda", shards: int = 1, proj_type: str | None = None,
             accumulate: bool = False, momentum: float | None = None, **config_overrides) -> dict[str, int]:
    """Bytes of one training step of `size_or_cfg` (a name of models.SIZES or a LlamaConfig).

    optim_name: adamw | galore | fira | subtrack | subtrack++ (optim.factory.PRESETS);
    rank: required for the low-rank ones; state_bits: 32 or 8 (any optimizer: adamw with
    8 is bitsandbytes' AdamW8bit); dtype: weights' and gradients' dtype; activation_dtype:
    defaults to dtype, or bf16 under autocast; autocast: bf16 autocast over weights in
    `dtype` (adds its cache of bf16 copies of the Linear weights, alive from forward to the
    end of backward); basis_dtype: of the low-rank bases; device: "cuda" or "cpu" (only the
    optimizer's temporaries differ); shards: FSDP2 over that many processes, figures per process
    (module docstring); proj_type: the low-rank side rule (optim.grassmann.projection_side),
    default "std" on one process and "right" with shards > 1, the only one FSDP allows;
    accumulate: optim.accumulate (the low-rank methods keep a gradient sum); momentum: optim.momentum
    (adafactor's first moment, an m x n buffer per matrix; none by default, as torch's);
    config_overrides: LlamaConfig fields (e.g. vocab_size).

    Returns weights, gradients, state_basis, state_moments, state_scalars, state_adamw,
    optimizer_state, autocast_cache, activations (saved by forward, head included),
    activations_recompute, loss_backward, step_temporaries, gathered_weights, gathered_gradient
    (FSDP's unsharded block weights and gradient; 0 on one process), total (weights + gradients + optimizer_state +
    activations, the sum papers tabulate) and peak (the timeline's maximum, module docstring).
    """
    if optim_name not in PRESETS:
        raise ValueError(f"unknown optimizer {optim_name!r}; choose one of {sorted(PRESETS)}")
    if optim_name == "adamw8bit":
        optim_name, state_bits = "adamw", 8  # the same optimizer (optim.factory)
    if "rank" in needed_keys(optim_name) and (rank is None or rank < 1):
        raise ValueError(f"optimizer {optim_name!r} projects gradients and needs a positive rank, got {rank!r}")
    check(STATE_BITS, state_bits)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r} must be 'cuda' or 'cpu'")
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards {shards!r} must be a positive number of processes")
    if per_layer:
        check_per_layer_allowed(grad_accum_steps=1, world_size=shards, grad_clip=0.0)  # one process only
    proj_type = proj_type or ("right" if shards > 1 else "std")
    cfg = get_config(size_or_cfg, **config_overrides)
    wb = dtype_bytes(dtype)
    ab = dtype_bytes(activation_dtype if activation_dtype is not None else ("bf16" if autocast else dtype))
    whole = model_weights(cfg)
    weights = [w.shard(shards) for w in whole]  # this process's rows (all of them on one process)

    out = {"weights": wb * sum(w.numel for w in weights)}
    largest_grad = wb * max(w.numel for w in weights)
    out["gradients"] = largest_grad if per_layer else wb * sum(w.numel for w in weights)
    kinds = {"basis": 0, "moments": 0, "scalars": 0, "adamw": 0}
    out["state_matrices"] = 0  # of the attention and MLP matrices (the projected weights) alone
    for w in whole:
        for kind, size in state_bytes(w, optim_name, rank, state_bits, wb, dtype_bytes(basis_dtype),
                                      proj_type, shards, accumulate, momentum).items():
            kinds[kind] += size
            out["state_matrices"] += size if w.projected else 0
    out.update({f"state_{kind}": nbytes for kind, nbytes in kinds.items()})
    out["optimizer_state"] = sum(kinds.values())

    act = activation_bytes(cfg, batch, seq, ab, checkpointing)
    linear = sum(w.numel for w in whole if len(w.shape) == 2 and w.name != "embed_tokens.weight")
    out["autocast_cache"] = 2 * linear if autocast else 0
    out["activations"] = act["blocks"] + act["head"]
    out["activations_recompute"] = act["recompute"]
    out["loss_backward"] = act["loss_backward"]
    out["step_temporaries"] = step_temporaries(weights, optim_name, state_bits, wb, per_layer, device)
    block = wb * sum(w.numel for w in whole if w.name.startswith("layers.0."))
    out["gathered_weights"] = 2 * block if shards > 1 else 0  # the block computed and the prefetched next one
    out["gathered_gradient"] = block if shards > 1 else 0  # one block's, until its reduce-scatter
    out["total"] = out["weights"] + out["gradients"] + out["optimizer_state"] + out["activations"]

    out["peak"] = peak_bytes(out, act, weights, cfg, batch, seq, ab, wb, per_layer,
                             functools.partial(weight_step_temporaries, optim_name=optim_name, state_bits=state_bits,
                                               weight_bytes=wb, device=device))
    return out


def peak_bytes(out: dict, act: dict, weights: list, cfg: LlamaConfig, batch: int, seq: int, ab: int, wb: int,
               per_layer: bool, temps) -> int:
    """The step timeline's maximum from `estimate`'s parts: `out` (its figures so far), `act`
    (activation_bytes), this process's `weights`; temps(w): one weight's step temporaries."""
    # The timeline's candidate maxima (module docstring): log_softmax's backward (log-probs,
    # their gradient and the logits' gradient alive), lm_head's backward (its weight gradient
    # beside the float32 logits' gradient and, for 2-byte activations, its cast), the
    # recompute of the last block under checkpointing, and the optimizer step.
    static = out["weights"] + out["optimizer_state"]
    in_backward = static + out["autocast_cache"] + out["gathered_weights"]
    by_name = {w.name: w for w in weights}
    lm_head_grad = wb * by_name["lm_head.weight"].numel
    logits_grad = (4 + (ab if ab != 4 else 0)) * batch * seq * cfg.vocab_size
    loss_backward = in_backward + out["activations"] + act["loss_backward"]
    head_backward = (in_backward + out["activations"] + logits_grad - act["log_probs"] + lm_head_grad
                     + out["gathered_gradient"])
    recompute = in_backward + act["blocks"] + act["recompute"] + lm_head_grad + out["gathered_gradient"]
    if per_layer:
        # Each weight is stepped in its gradient hook, once the node that made the gradient
        # has freed its inputs: lm_head first (logits' gradient gone), the embedding last
        # (activations gone); block weights in between, beside at most one recompute.
        blocks_temps = max(temps(w) for w in weights if w.name.startswith("layers."))
        blocks_grad = wb * max(w.numel for w in weights if w.name.startswith("layers."))
        embed = by_name["embed_tokens.weight"]
        return max(loss_backward,
                   head_backward - logits_grad + temps(by_name["lm_head.weight"]),
                   in_backward + act["blocks"] + act["recompute"] + blocks_grad + blocks_temps,
                   static + wb * embed.numel + temps(embed))
    return max(loss_backward, head_backward, recompute, static + out["gradients"] + out["step_temporaries"])


# ---------------------------------------------------------------------------------------------
# Measurements (CPU: PyTorch profiler's allocation events; CUDA: the caching allocator's stats)
# ---------------------------------------------------------------------------------------------

def measure_cpu_peak(fn) -> int:
    """Peak bytes of live CPU tensor storage while fn() runs (not the process RSS).

    Replays the allocation timeline of PyTorch's memory profiler (the data behind
    ``profile.export_memory_timeline``): storages alive when fn starts and used by it, plus
    every allocation, minus every free. Tensors fn never touches are not counted.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, nbytes in sorted(prof._memory_profile().timeline, key=lambda event: event[0]):
        if action in (Action.PREEXISTING, Action.CREATE):
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak


def measure_saved_activations(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs (e.g. forward + loss),
    storages of the tensors in `exclude` (weights, buffers) left out."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def state_tensor_bytes(optimizer: torch.optim.Optimizer, matrices_only: bool = False) -> int:
    """Bytes of every tensor in the optimizer's state (distinct storages); matrices_only: of the
    attention and MLP matrices alone (the weights the low-rank methods project; groups need `names`)."""
    states = list(optimizer.state.values())
    if matrices_only:
        names = {id(p): n for g in optimizer.param_groups for p, n in zip(g["params"], g.get("names", ()))}
        states = [s for p, s in optimizer.state.items() if is_projected(names.get(id(p), ""), p)]
    return tensor_bytes(states, distinct_storages=True)
