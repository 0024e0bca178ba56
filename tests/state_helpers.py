"""Helpers only the tests use: whole-state views and torch state-dict hooks the library does not need."""
from __future__ import annotations

import torch
import torch.distributed as dist

from optim.quant8 import init_moment


def init_adamw_state(p: torch.Tensor, state_bits: int = 8) -> dict[str, torch.Tensor]:
    """State for optim.quant8.adamw_step on p: step (float32 scalar), exp_avg and exp_avg_sq (8-bit codes + absmax,
    or float32 when p has fewer than MIN_8BIT_NUMEL elements or state_bits is 32)."""
    state = {"step": torch.tensor(0.0)}
    init_moment(state, "exp_avg", p.shape, p.device, state_bits)
    init_moment(state, "exp_avg_sq", p.shape, p.device, state_bits)
    return state


def keep_state_dtypes_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep the saved dtype of every state tensor.

    torch (2.13) casts every state tensor but "step" to a floating-point parameter's dtype on
    load, whatever the tensor's own dtype: uint8 codes would come back as float32 (or bf16) and
    a float32 absmax or basis would be rounded to bf16 beside bf16 weights. The hooks put the
    saved tensors back (moved to the parameter's device), so a resume continues bit-exactly.
    (bitsandbytes' own optimizers override load_state_dict for the same reason.)
    """
    saved: dict[int, dict] = {}

    def pre_hook(opt, state_dict):
        saved.clear()
        saved.update({int(i): dict(s) for i, s in state_dict["state"].items()})
        saved["__groups__"] = [list(g["params"]) for g in state_dict["param_groups"]]
        return None

    def post_hook(opt):
        saved_ids = [i for ids in saved.pop("__groups__") for i in ids]
        params = [p for g in opt.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in saved.get(int(saved_id), {}).items():
                # "step" is left to torch, which keeps it where its update expects it.
                if key != "step" and torch.is_tensor(value) and key in opt.state[p]:
                    opt.state[p][key] = value.to(p.device)
        saved.clear()

    optimizer.register_load_state_dict_pre_hook(pre_hook)
    optimizer.register_load_state_dict_post_hook(post_hook)


def consolidated_state_dict(opt, dst: int = 0) -> dict | None:
    """Collective: every rank's shard of the ShardedOptimizer `opt` merged on rank `dst` (state
    keyed by name, as `opt.state_dict()`); None on the other ranks. `opt.load_state_dict` takes it
    at any world size. Holds the whole optimizer state on one rank (the library saves shards)."""
    shard = opt.state_dict()
    if opt.world_size == 1:
        return shard
    shards = [None] * opt.world_size if opt.rank == dst else None
    dist.gather_object(shard, shards, dst=dst, group=opt.process_group)
    if opt.rank != dst:
        return None
    merged = dict(shard, rank=None, owned=list(opt.owners), state={})
    for s in shards:
        merged["state"].update(s["state"])
    return merged
