"""`single`: one process. The full optimizer steps after backward, or, with optim.per_layer, each
weight is stepped inside its gradient hook during backward (optim/per_layer.py; no accumulation,
no clipping: Strategy.validate refuses them)."""
from __future__ import annotations

import torch

from pretrain.config import ConfigError
from pretrain.strategies.base import Strategy


class Single(Strategy):
    name = "single"
    one_process = True

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        if world_size != 1:
            raise ConfigError(f"train.parallelism = single runs one process, but {world_size} were launched; "
                              "choose replicate, zero, fsdp or auto")
        super().validate(cfg, world_size)

    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        self.steps_in_backward = cfg.optim.per_layer  # from bind() on, backward steps the weights
        self._hooks = None

    def build_optimizer(self, model):
        from optim.factory import build_optimizer

        return build_optimizer(model, self.cfg.optim)

    def bind(self, model, optimizer):
        if self.cfg.optim.per_layer:
            from optim.per_layer import attach_per_layer_updates

            self._hooks = attach_per_layer_updates(model, optimizer)
        return super().bind(model, optimizer)

    def step(self, max_norm: float) -> torch.Tensor:
        if self._hooks is not None:
            return self._hooks.pop_grad_norm()  # already stepped; unclipped (clipping is refused)
        return super().step(max_norm)

    def describe(self) -> str:
        return "single process" + (", per-layer updates in the gradient hooks" if self._hooks else "")

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
