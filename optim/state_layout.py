"""Optimizer state of one weight, declared once: {key: Slot(shape, dtype, fill)}.

Our optimizers allocate their state from their declaration (`allocate`): SubTrackAdamW
(optim.subtrack.state_layout, with optim.quant8.moment_layout for 8-bit moments), TrackedAdafactor
(optim.tracked_adafactor.state_layout) and TrackedMuon (optim.tracked.tracked_layout). pretrain/memory.py counts the bytes of the same declarations
(`nbytes`, through optim.factory.state_layout), so the estimate cannot drift from what is allocated.
torch's AdamW, Muon and Adafactor allocate their own state: the declarations below restate what they
allocate, and tests/test_memory.py compares them with their state after a step.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Slot(NamedTuple):
    """One state tensor: its shape, dtype and initial value."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float = 0.0


Layout = dict[str, Slot]
COUNTER = Slot((), torch.int64)  # host-side step counters


def nbytes(layout: Layout) -> int:
    return sum(math.prod(slot.shape) * slot.dtype.itemsize for slot in layout.values())


def allocate(layout: Layout, device) -> dict[str, torch.Tensor]:
    """The tensors of `layout`: int64 counters on the CPU (read on the host every step), the rest on
    `device`; a "basis" column-major, the layout torch.linalg.svd returns (optim.grassmann.column_major)."""
    out = {}
    for key, slot in layout.items():
        where = "cpu" if slot.dtype == torch.int64 else device
        if key == "basis":
            out[key] = torch.full(slot.shape[::-1], slot.fill, dtype=slot.dtype, device=where).t()
        else:
            out[key] = torch.full(slot.shape, slot.fill, dtype=slot.dtype, device=where)
    return out


def _torch_scalar() -> torch.dtype:
    """The dtype of torch's own `step` tensors (torch.optim.optimizer._get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def torch_adamw(shape, dtype: torch.dtype) -> Layout:
    """torch.optim.AdamW: a `step` tensor and zeros_like(p) moments (`shape`: the local part of a DTensor)."""
    shape = tuple(shape)
    return {"step": Slot((), _torch_scalar()), "exp_avg": Slot(shape, dtype), "exp_avg_sq": Slot(shape, dtype)}


def torch_muon(shape, dtype: torch.dtype) -> Layout:
    """torch.optim.Muon: its momentum buffer, zeros_like(grad); no step tensor."""
    return {"momentum_buffer": Slot(tuple(shape), dtype)}


def torch_adafactor(shape, dtype: torch.dtype, momentum: float | None = None) -> Layout:
    """torch.optim.Adafactor on a matrix: factored second moment in the gradient's dtype, plus the
    momentum buffer optim/hybrid.py adds when the group has a momentum."""
    m, n = shape
    out = {"step": Slot((), _torch_scalar()), "row_var": Slot((m, 1), dtype), "col_var": Slot((1, n), dtype)}
    if momentum is not None:
        out["momentum_buffer"] = Slot((m, n), dtype)
    return out


def apollo(shape, rank: int) -> Layout:
    """apollo-torch's APOLLOAdamW on a projected matrix: its random projection (r, short side), Adam moments
    (r, long side) and a float32 scaling factor; its step count and seed are Python ints (no tensor bytes).
    apollo-torch is optional: tests/test_memory.py compares this with its allocation where it is installed."""
    short, long = min(shape), max(shape)
    return {"projector": Slot((rank, short), torch.float32), "exp_avg": Slot((rank, long), torch.float32),
            "exp_avg_sq": Slot((rank, long), torch.float32), "scaled_grad": Slot((), torch.float32)}


def apollo_adamw(shape, dtype: torch.dtype) -> Layout:
    """apollo-torch's AdamW on the weights it does not project: zeros_like(p) moments; step and seed are
    Python ints (no tensor bytes), unlike torch's AdamW."""
    shape = tuple(shape)
    return {"exp_avg": Slot(shape, dtype), "exp_avg_sq": Slot(shape, dtype)}
