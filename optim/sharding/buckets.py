"""Flat buffers laid out owner by owner, and the two collectives over them.

Bucket k holds chunk k of every rank's owned tensors: rank r's segment starts at r * segment and
every segment is padded to the longest, so no tensor crosses a shard boundary and a
reduce-scatter hands each rank exactly the reduced gradients it owns (ZeRO-2 volume:
reduce-scatter + all-gather = 2x model bytes per step). The reduction is SUM followed by our
own division by the world size (gloo's AVG is unreliable, pytorch issue 162338).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from optim.nbytes import tensor_bytes

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only those.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Bucket:
    """One collective: rank r's tensors sit at [r * segment + offset, ... + numel) of a flat buffer."""
    dtype: torch.dtype
    segment: int
    slots: list  # per rank: list of (name, offset, numel)


def plan_buckets(owners: dict[str, int], numels: dict[str, int], dtypes: dict[str, torch.dtype],
                 world_size: int, bucket_numel: int) -> list[Bucket]:
    """Cut each owner's tensors (name order) into chunks of <= bucket_numel elements; bucket k
    holds chunk k of every rank. A tensor larger than the cap is a chunk of its own."""
    buckets = []
    for dtype in sorted({dtypes[n] for n in owners}, key=str):
        chunks_by_rank = []
        for rank in range(world_size):
            chunks, current, size = [], [], 0
            for name in sorted(n for n, r in owners.items() if r == rank and dtypes[n] == dtype):
                if current and size + numels[name] > bucket_numel:
                    chunks.append(current)
                    current, size = [], 0
                current.append((name, size, numels[name]))
                size += numels[name]
            if current:
                chunks.append(current)
            chunks_by_rank.append(chunks)
        for k in range(max(len(c) for c in chunks_by_rank)):
            slots = [c[k] if k < len(c) else [] for c in chunks_by_rank]
            segment = max((off + n for s in slots for _, off, n in s), default=0)
            buckets.append(Bucket(dtype, segment, slots))
    return buckets


def reduce_scatter_grads(buckets: list[Bucket], params: dict[str, torch.Tensor], rank: int, world: int,
                         device: torch.device, group=None) -> int:
    """Set each owned tensor's .grad to the world's average of its gradients (a view of the
    received buffer); a missing gradient counts as zero. Returns the bytes sent."""
    sent = 0
    for b in buckets:
        send = torch.zeros(world * b.segment, dtype=b.dtype, device=device)
        for r, slots in enumerate(b.slots):
            for name, off, numel in slots:
                grad = params[name].grad
                if grad is not None:  # a missing gradient counts as zero
                    send[r * b.segment + off: r * b.segment + off + numel].copy_(grad.reshape(-1))
        if world > 1:
            recv = torch.empty(b.segment, dtype=b.dtype, device=device)
            _reduce_scatter(recv, send, op=dist.ReduceOp.SUM, group=group)
            recv.div_(world)
            sent += tensor_bytes(send)
        else:
            recv = send
        for name, off, numel in b.slots[rank]:
            p = params[name]
            p.grad = recv[off: off + numel].view_as(p)
    return sent


def all_gather_params(buckets: list[Bucket], params: dict[str, torch.Tensor], rank: int, world: int,
                      device: torch.device, group=None) -> int:
    """Copy every owner's weights to all ranks, one flat buffer per bucket (receivers copy the
    owner's bits). Returns the bytes received."""
    received = 0
    if world == 1:
        return received
    for b in buckets:
        send = torch.zeros(b.segment, dtype=b.dtype, device=device)
        for name, off, numel in b.slots[rank]:
            send[off: off + numel].copy_(params[name].detach().reshape(-1))
        recv = torch.empty(world * b.segment, dtype=b.dtype, device=device)
        _all_gather(recv, send, group=group)
        received += tensor_bytes(recv)
        for r, slots in enumerate(b.slots):
            if r == rank:
                continue
            for name, off, numel in slots:
                p = params[name]
                p.detach().copy_(recv[r * b.segment + off: r * b.segment + off + numel].view_as(p))
    return received
