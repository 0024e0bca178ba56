"""`single`: one process. The full optimizer steps after backward, or, with optim.per_layer, each
weight is stepped inside its gradient hook during backward (optim.per_layer; no accumulation,
no clipping: config checks refuse them)."""
from __future__ import annotations

import torch

from pretrain.strategies.base import Strategy


class Single(Strategy):
    name = "single"

    def __init__(self, cfg, dist):
        super().__init__(cfg, dist)
        self.per_layer = bool(getattr(cfg.optim, "per_layer", False))
        self.steps_in_backward = self.per_layer
        self._hooks = None

    def build_optimizer(self, model):
        from optim.factory import build_optimizer

        return build_optimizer(model, self.cfg.optim)

    def wrap(self, model, optimizer):
        if self.per_layer:  # from here on backward steps the weights
            from optim.per_layer import attach_per_layer_updates, check_per_layer_allowed

            tc = self.cfg.train
            check_per_layer_allowed(tc.grad_accum_steps(self.dist.world_size), self.dist.world_size, tc.grad_clip)
            self._hooks = attach_per_layer_updates(model, optimizer)
        return super().wrap(model, optimizer)

    def step(self, max_norm: float) -> torch.Tensor:
        if self._hooks is not None:
            return self._hooks.pop_grad_norm()  # already stepped; unclipped (clipping is refused)
        return super().step(max_norm)

    def describe(self) -> str:
        return "single process" + (", per-layer updates in the gradient hooks" if self.per_layer else "")

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
