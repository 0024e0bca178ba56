"""Matrix optimizers beside AdamW: torch's Muon or Adafactor (or our TrackedAdafactor, TrackedMuon) on the attention
and MLP matrices.

    opt = HybridOptimizer([
        {"params": plain, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0},
        {"params": matrices, "lr": 1e-3, "matrix_method": "muon", "momentum": 0.95, "nesterov": True,
         "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
    ])

A group with a `matrix_method` key is stepped by that torch optimizer (MATRIX_METHODS), every other
group by torch.optim.AdamW: the split the optimizer's papers and the low-rank presets use (Muon is
only defined for 2-D hidden weights; embeddings, norms and head stay on AdamW). It is one ordinary
torch optimizer: the inner optimizers share this object's group dicts and its `state`, so
state_dict() / load_state_dict(), lr schedulers, per-layer updates, the whole-matrix ZeRO wrapper
(optim/sharding) and the checkpoints all see plain torch state (AdamW's exp_avg / exp_avg_sq,
Muon's momentum_buffer, Adafactor's row_var / col_var).

Adafactor takes an optional first moment (`momentum`: a float in [0, 1), None for torch's default,
which has none): an exponential average of the steps torch's Adafactor takes,
buf <- momentum * buf + (1 - momentum) * step, applied in their place, as the Adafactor paper and
Hugging Face's Adafactor do with beta1 (no bias correction). It costs one m x n buffer per matrix.
"""
from __future__ import annotations

import torch

from optim.tracked_adafactor import TrackedAdafactor
from optim.tracked_muon import TrackedMuon

# `subtrack-adafactor` and `subtrack-muon` are ours (optim/tracked_adafactor.py, optim/tracked_muon.py):
# Adafactor and Muon with their momentum kept in a tracked subspace.
MATRIX_METHODS = {"muon": torch.optim.Muon, "adafactor": torch.optim.Adafactor, "subtrack-adafactor": TrackedAdafactor,
                  "subtrack-muon": TrackedMuon}
PLAIN = "adamw"


def _method(group: dict) -> str:
    return group.get("matrix_method") or PLAIN


class HybridOptimizer(torch.optim.Optimizer):
    """AdamW on groups without `matrix_method`, torch.optim.Muon / Adafactor on the others.

    Every group carries its own hyper-parameters (optim.factory builds them); what a group leaves
    out takes its torch optimizer's default."""

    def __init__(self, params):
        super().__init__(params, defaults={})
        for group in self.param_groups:
            method = _method(group)
            if method != PLAIN and method not in MATRIX_METHODS:
                raise ValueError(f"matrix_method {method!r} is unknown; choose one of {sorted(MATRIX_METHODS)}")
            momentum = group.get("momentum")
            if method == "adafactor" and momentum is not None and not 0.0 <= momentum < 1.0:
                raise ValueError(f"Adafactor momentum {momentum} must be in [0, 1) (or None: none)")
        classes = {PLAIN: torch.optim.AdamW, **MATRIX_METHODS}
        # Each inner optimizer fills its defaults into (and checks) the very dicts held here.
        self.by_method = {method: classes[method]([g for g in self.param_groups if _method(g) == method])
                      for method in dict.fromkeys(map(_method, self.param_groups))}
        for inner in self.by_method.values():  # state an inner optimizer created up front (the tracked ones')
            self.state.update(inner.state)
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this object's current groups and state (torch's
        load_state_dict replaces both)."""
        for method, inner in self.by_method.items():
            inner.param_groups = [g for g in self.param_groups if _method(g) == method]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for method, inner in self.by_method.items():
            if method == "adafactor":
                self._adafactor_step(inner)
            else:
                inner.step()
        return loss

    def _adafactor_step(self, inner: torch.optim.Optimizer) -> None:
        """torch's Adafactor step; groups with a momentum then move by the average of its steps."""
        before = {p: p.detach().clone() for g in inner.param_groups if g.get("momentum") is not None
                  for p in g["params"] if p.grad is not None}
        inner.step()
        for group in inner.param_groups:
            momentum = group.get("momentum")
            if momentum is None:
                continue
            for p in group["params"]:
                if p not in before:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p - before[p], alpha=1.0 - momentum)
                p.copy_(before[p]).add_(buf)
