"""The interface every parallelism strategy implements (one class per mode, one file each).

    strategy = build_strategy(cfg, dist)          # from train.parallelism (pretrain/strategies/__init__.py)
    optimizer = strategy.build_optimizer(model)   # full, or sharded by whole matrices
    forward = strategy.wrap(model, optimizer)     # what the loop calls: the model, DDP or the DeepSpeed engine
    for i in range(accum):
        with strategy.accumulating(last=i == accum - 1):   # DDP: no_sync() on all but the last micro-batch
            loss = lm_loss(forward(x), y) / accum
            strategy.backward(loss)
    strategy.attach_guard(guard)                  # pretrain/guard.py: a bad step's update is held back
    grad_norm = strategy.step(max_norm)           # reduce + clip + optimizer step; the norm as a device tensor
    checkpoints = strategy.checkpoint_manager(root, keep_last, say=say)   # sharded optimizer state or one file
    strategy.close()

`model` stays the plain module: checkpoints save its state_dict (the same key names in every mode),
evaluation runs it. As Lightning's strategies (setup, backward, optimizer step, checkpoint I/O)
and torchtitan's parallelize functions, the loop never asks which mode it is in.
"""
from __future__ import annotations

import contextlib

import torch

from pretrain.checkpoint import CheckpointManager


class NoGuard:
    """Every step goes ahead (a strategy used without pretrain.guard.DivergenceGuard)."""

    @contextlib.contextmanager
    def gated(self, grad_norm, optimizer):
        yield True


class Strategy:
    name = "?"  # the summary's "mode"
    sharded_checkpoint = False  # optimizer state saved one shard per rank (optimizer.save_sharded)
    steps_in_backward = False  # weights move inside backward (per-layer hooks, DeepSpeed's engine.step)

    def __init__(self, cfg, dist):
        self.cfg, self.dist = cfg, dist
        self.model = self.optimizer = None
        self.guard = NoGuard()

    def attach_guard(self, guard) -> None:
        """The divergence guard whose `gated(grad_norm, optimizer)` decides each optimizer step; call after
        wrap(). An optimizer that clips and steps itself (optim.sharded) consults it in its step()."""
        self.guard = guard
        if hasattr(self.optimizer, "step_gate"):
            self.optimizer.step_gate = guard

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def wrap(self, model: torch.nn.Module, optimizer) -> torch.nn.Module:
        """Return the module the loop runs forward on (the plain model unless a wrapper is needed)."""
        self.model, self.optimizer = model, optimizer
        return model

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward; `last`: the step's final micro-batch."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float) -> torch.Tensor:
        """Reduce gradients over ranks, clip to max_norm (inf: measure only), step the optimizer.
        Returns the global gradient norm before clipping, left on the device."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        with self.guard.gated(grad_norm, self.optimizer) as go:  # a non-finite step moves nothing
            if go:
                self.optimizer.step()
        return grad_norm

    def describe(self) -> str:
        """One line for the run's start-up message."""
        raise NotImplementedError

    def checkpoint_manager(self, root, keep_last: int, say=print) -> CheckpointManager:
        return CheckpointManager(root, keep_last, rank=self.dist.rank, world_size=self.dist.world_size,
                                 sharded=self.sharded_checkpoint, mode=self.name, say=say)

    def close(self) -> None:
        """Undo what wrap() attached (hooks)."""
