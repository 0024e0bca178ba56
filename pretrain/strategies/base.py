"""The interface every parallelism strategy implements (one class per mode, one file each).

    cls = strategy_class(cfg, world_size)         # train.parallelism resolved (pretrain/strategies/__init__.py)
    cls.validate(cfg, world_size)                 # its refusals, before any work (load_config calls it too)
    dist = distributed.setup(..., group_alone=cls.needs_group_alone)
    strategy = cls(cfg, dist)
    model = strategy.parallelize(model)           # FSDP2 shards it in place; the others leave it as is
    optimizer = strategy.build_optimizer(model)   # full, sharded by whole matrices, or by rows
    forward = strategy.bind(model, optimizer)     # what the loop calls: the model, DDP or the DeepSpeed engine
    strategy.attach_guard(guard)                  # pretrain/guard.py: a bad step's update is held back
    strategy.begin_step()
    for i in range(accum):
        with strategy.accumulating(last=i == accum - 1):   # DDP: no_sync() on all but the last micro-batch
            loss = lm_loss(forward(x), y) / accum
            strategy.backward(loss)
    grad_norm = strategy.step(max_norm)           # reduce + clip + optimizer step; the norm as a device tensor
    strategy.checkpoint_io()                      # how its checkpoints hold model and optimizer (state_io.py)
    strategy.sum_over_ranks(t), max_over_ranks(t), gather_objects(obj), check_replicas(step)
    strategy.close()

`model` stays the plain module: checkpoints save its state_dict (the same key names in every mode),
evaluation runs it. As Lightning's strategies (setup, backward, optimizer step, checkpoint I/O) and
torchtitan's parallelize functions, the loop never asks which mode it is in.
"""
from __future__ import annotations

import contextlib

import torch

from pretrain import distributed
from pretrain.config import ConfigError


class NoGuard:
    """Every step goes ahead (a strategy used without pretrain.guard.DivergenceGuard)."""

    @contextlib.contextmanager
    def gated(self, grad_norm, optimizer):
        yield True


class Strategy:
    name = "?"  # train.parallelism, and the summary's "mode"
    needs_group_alone = False  # a process group even with one process (FSDP2 needs one)
    alone_runs_single = False  # with one process, `single` runs instead (the same math, no collectives)
    one_process = False  # runs exactly one process (the full optimizer, nothing sharded or wrapped)
    # Why optim.per_layer cannot run here (None: within optim/per_layer.py's own rules, which refuse
    # several ranks, accumulation and clipping)
    per_layer_refusal: str | None = None
    steps_in_backward = False  # the weights move inside backward (DeepSpeed's engine.step, per-layer hooks)

    def __init__(self, cfg, dist):
        self.cfg, self.dist = cfg, dist
        self.model = self.optimizer = None
        self.guard = NoGuard()
        self.moved = False  # the weights moved in the current step

    # ------------------------------------------------------------------ configuration
    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        """Raise ConfigError for what this mode cannot run. The rules every mode shares are here; a mode
        adds its own (calling this one)."""
        from optim.factory import APOLLO
        from optim.per_layer import check_per_layer_allowed

        if cfg.optim.per_layer:
            if cls.per_layer_refusal is not None:
                raise ConfigError(f"optim.per_layer steps each weight in its gradient hook, {cls.per_layer_refusal}; "
                                  "set optim.per_layer: false or choose another train.parallelism")
            try:
                check_per_layer_allowed(cfg.train.grad_accum_steps(world_size), world_size, cfg.train.grad_clip)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if cfg.optim.name in APOLLO and (not cls.one_process or cfg.checkpoint.resume is not None):
            raise ConfigError(f"optim.name {cfg.optim.name!r} (apollo-torch, a benchmark peer) runs in one process "
                              "and cannot resume: its state keeps projector objects that no weights-only checkpoint "
                              "loads; run one process without --resume")

    # ------------------------------------------------------------------ set-up
    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the mode's sharding or wrapping that the optimizer must see (FSDP2); returns the module
        the optimizer is built on (the same object for every mode here)."""
        return model

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def bind(self, model: torch.nn.Module, optimizer) -> torch.nn.Module:
        """From here this strategy steps `model` with `optimizer`; returns the module the loop runs forward
        on (the plain model unless a wrapper is needed)."""
        self.model, self.optimizer = model, optimizer
        return model

    def attach_guard(self, guard) -> None:
        """The divergence guard whose `gated(grad_norm, optimizer)` decides each optimizer step; call after
        bind(). An optimizer that clips and steps itself (optim.sharded) consults it in its step()."""
        from optim.sharded import ShardedOptimizer

        self.guard = guard
        if isinstance(self.optimizer, ShardedOptimizer):
            self.optimizer.step_gate = guard

    # ------------------------------------------------------------------ one step
    def begin_step(self) -> None:
        """A new step starts: nothing has moved yet."""
        self.moved = False

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward; `last`: the step's final micro-batch."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.moved = self.moved or self.steps_in_backward  # before: a failure inside may have moved weights
        loss.backward()

    def step(self, max_norm: float) -> torch.Tensor:
        """Reduce gradients over ranks, clip to max_norm (inf: measure only), step the optimizer.
        Returns the global gradient norm before clipping, left on the device."""
        self.moved = True
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        with self.guard.gated(grad_norm, self.optimizer) as go:  # a non-finite step moves nothing
            if go:
                self.optimizer.step()
        return grad_norm

    @property
    def can_save_after_failure(self) -> bool:
        """A failure in the current step left model and optimizer at the last completed step, and this
        process may save it alone: one process (with several, a collective save could hang on a rank
        that failed alone) whose weights have not moved yet in this step."""
        return self.dist.world_size == 1 and not self.moved

    # ------------------------------------------------------------------ collectives the loop needs
    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(values, self.dist.world_size)

    def max_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_max(values, self.dist.world_size)

    def gather_objects(self, obj) -> list:
        return distributed.all_gather_objects(obj, self.dist.world_size)

    def check_replicas(self, step: int) -> int:
        """The weights' checksum, the same on every rank (raises naming the ranks that differ)."""
        return distributed.check_replicas(self.model, self.dist.world_size, step)

    # ------------------------------------------------------------------ checkpoints and the rest
    def checkpoint_io(self):
        """How this mode's checkpoints hold the model and optimizer state (pretrain/state_io.py)."""
        from pretrain.state_io import PlainState

        return PlainState()

    def describe(self) -> str:
        """One line for the run's start-up message."""
        raise NotImplementedError

    def close(self) -> None:
        """Undo what bind() attached (hooks)."""
