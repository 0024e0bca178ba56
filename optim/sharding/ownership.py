"""Which rank owns which whole tensor: size-balanced, deterministic, from names and sizes only."""
from __future__ import annotations

import math

import torch

from optim.nbytes import tensor_bytes


def assign_owners(named_shapes: dict[str, torch.Size], world_size: int,
                  costs: dict[str, int] | None = None) -> dict[str, int]:
    """Owner rank of each named tensor: whole tensors, size-balanced, deterministic.

    Greedy longest-processing-time: tensors by decreasing size (ties broken by name) go to the
    rank with the least size so far (ties: the lowest rank). Size is numel, or `costs[name]`
    when given (e.g. optimizer-state bytes). Depends only on names and sizes, never on dict
    order or tensor identity, so every rank computes the same map.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    size = {n: (costs[n] if costs is not None else math.prod(shape)) for n, shape in named_shapes.items()}
    load = [0] * world_size
    owners = {}
    for name in sorted(size, key=lambda n: (-size[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += size[name]
    return dict(sorted(owners.items()))


def state_costs(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Optimizer-state bytes per parameter name (groups must carry `names`). State created
    lazily at the first step (torch's AdamW) counts as two moments of the parameter's size."""
    costs = {}
    for g in optimizer.param_groups:
        for name, p in zip(g["names"], g["params"]):
            state = optimizer.state.get(p)
            costs[name] = tensor_bytes(state) if state else 2 * tensor_bytes(p)
    return costs
