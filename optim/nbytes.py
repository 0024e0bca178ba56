"""Bytes held by tensors: the one count the optimizer, the memory model and the benchmarks share."""
from __future__ import annotations

import torch


def tensor_bytes(obj, distinct_storages: bool = False) -> int:
    """Bytes of every tensor in `obj` (a tensor, or dicts / lists / tuples of them, nested).

    distinct_storages=False: numel * element_size of each tensor (what a collective or a
    checkpoint moves; works on meta tensors). True: each distinct storage once, whole (what
    memory holds: views and repeated tensors count once). A DTensor counts its local shard.
    """
    storages: dict[int, int] = {}
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            if hasattr(item, "to_local"):  # a DTensor (FSDP2): this rank's shard is what it holds and moves
                item = item.to_local()
            if distinct_storages:
                storage = item.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            else:
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(storages.values()) if distinct_storages else total
