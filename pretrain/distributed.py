"""Distributed set-up: who am I (rank, world size, local rank), process group, small collectives.

Reads the launcher's environment: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), the DeepSpeed
launcher (the same variables plus a `--local_rank=N` argument, which the CLI copies into
LOCAL_RANK) or SLURM srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR must be set
by the batch script). NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from data.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool = False  # setup() joined the process group (so cleanup() leaves it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def env_world_size() -> int:
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched distributed); never raises."""
    try:
        return _env_int("RANK", "SLURM_PROCID", default=0)
    except ValueError:
        return 0


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / DeepSpeed / SLURM variables; (0, 1, 0) otherwise."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = env_world_size()
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world}; check the launcher's RANK/WORLD_SIZE")
    return rank, world, local


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device = {preference!r} but CUDA is not available; use train.device=cpu")
        index = int(preference.split(":")[1]) if ":" in preference else local_rank
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(preference)


def setup(device_preference: str = "auto", timeout_s: float | None = None, group_alone: bool = False) -> DistInfo:
    """Pick the device and, when launched with more than one process, join the process group.

    timeout_s (train.collective_timeout_s): how long any collective of the group waits for a peer
    before it raises, so a dead or hung peer ends the job in bounded time (None: torch's default).
    group_alone: one process gets a group of its own too (a strategy that needs one, FSDP2)."""
    rank, world, local = env_ranks()
    device = pick_device(device_preference, local)
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if world == 1 and group_alone and not dist.is_initialized():  # an in-memory store: nothing to rendezvous with
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, **timeout)
        return DistInfo(rank, world, local, device, created_group=True)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise UserError("MASTER_ADDR is not set; launch with torchrun/deepspeed, or export "
                            "MASTER_ADDR=<first node's hostname> in the SLURM script")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world, **timeout)
        return DistInfo(rank, world, local, device, created_group=True)
    return DistInfo(rank, world, local, device)


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer is gone or hung: torch's DistError, or the plain
    RuntimeError gloo raises for a timeout ("Timed out waiting 3000ms for recv operation") or a
    closed connection."""
    text = str(error)
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in text and any(
        sign in text for sign in ("Timed out", "Connection closed", "Connection reset")))


def cleanup(info: DistInfo | None = None, together: bool = False) -> None:
    """Leave the process group: the one `info`'s setup() created, or (no `info`) whatever group there is.

    A group the caller created before setup() stays, with whatever the caller (or DeepSpeed, which
    caches its groups) built on it, so the caller can run train() again in the same processes.
    `together` (a run that ended normally on every rank): a barrier first, so no rank tears down its
    connections, or rank 0 the rendezvous store it hosts, while a peer is still finishing its last
    collective (a gloo peer can abort then)."""
    if dist.is_initialized() and (info is None or info.created_group):
        if together and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum a small tensor (losses, counts, flags) over ranks, in place; a no-op on one process."""
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Elementwise max of a small tensor over ranks, in place; a no-op on one process."""
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_objects(obj, world_size: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] (e.g. per-rank data loader states for a checkpoint)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def weight_checksum(model: torch.nn.Module) -> int:
    """An integer over the exact bits of every weight (each element's bits read as an integer and
    summed with a position weight), so any bit that differs changes it with near certainty."""
    bit_types = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    total = 0
    for i, param in enumerate(model.parameters(), start=1):
        bits = param.detach().reshape(-1).view(bit_types[param.element_size()]).long()
        total += i * int(bits.sum()) + int((bits[::7] * 3).sum())
    return total % (1 << 62)


def check_replicas(model: torch.nn.Module, world_size: int, step: int) -> int:
    """Collective: every rank's weight checksum must agree; raises naming the ranks that differ."""
    mine = weight_checksum(model)
    sums = all_gather_objects(mine, world_size)
    if len(set(sums)) > 1:
        raise RuntimeError(f"step {step}: the ranks' weights differ (checksums by rank: {sums}); the optimizer "
                           "did not leave every rank with the same weights")
    return mine
