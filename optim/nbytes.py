"""Bytes held by tensors: the one count the optimizer, the memory model and the benchmarks share."""
from __future__ import annotations

import sys

import torch


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t`: a DTensor's local tensor, else `t` itself. DTensor is looked up, not
    imported: torch.distributed.tensor takes a second to load, and until something (FSDP2) has loaded it
    no tensor is a DTensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if module is not None and isinstance(t, module.DTensor) else t


def tensor_bytes(obj, distinct_storages: bool = False) -> int:
    """Bytes of every tensor in `obj` (a tensor, or dicts / lists / tuples of them, nested).

    distinct_storages=False: numel * element_size of each tensor (what a collective or a
    checkpoint moves; works on meta tensors). True: each distinct storage once, whole (what
    memory holds: views and repeated tensors count once). A DTensor counts the part this
    process holds (its local tensor).
    """
    storages: dict[int, int] = {}
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            item = local_part(item)
            if distinct_storages:
                storage = item.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            else:
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):  # e.g. apollo-torch's projector objects
            stack.extend(vars(item).values())
    return sum(storages.values()) if distinct_storages else total
