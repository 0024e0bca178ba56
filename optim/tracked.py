"""Matrix optimizers whose momentum lives only in a low-rank subspace tracked along Grassmannian geodesics
(SubTrack's tracking), the rest of the gradient passing through raw.

For a matrix W: (m, n) with gradient G, rank r, basis S: (m, r) (left; the right case is the same with
P: (r, n)), at step t:

    S  <- SVD of G at t = 1, then a rank-1 geodesic step every update_proj_gap steps (the closed-form
          best angle, optim/grassmann.py); the momentum M rotates with it: M <- (S'^T S) M
    R = S^T G;   M <- beta1 M + (1 - beta1) R                        (momentum of the subspace only)
    G~ = G + S (R~ - R)      R~: the subclass's smoothed R (bias-corrected M, or Nesterov's R + beta1 (M - R))

and the subclass turns G~ into the step: Adafactor's normalization (optim/tracked_adafactor.py) or
Muon's orthogonalization (optim/tracked_muon.py). The state both keep: step, basis (m r or r n),
exp_avg (r n or m r), subspace_updates, angle.
"""
from __future__ import annotations

import torch

from optim import grassmann as gm
from optim.options import check_rank
from optim.state_layout import COUNTER, Layout, Slot, allocate


def tracked_layout(shape, dtype: torch.dtype, group: dict) -> Layout:
    """The state every tracked optimizer keeps for an (m, n) weight in `group` (its `rank` and
    `proj_type`), float32 (float64 for float64 weights): the basis and the subspace momentum."""
    (m, n), r = shape, group["rank"]
    f32 = torch.promote_types(dtype, torch.float32)
    left = gm.projection_side((m, n), group["proj_type"]) == gm.LEFT
    return {"step": COUNTER, "basis": Slot((m, r) if left else (r, n), f32),
            "exp_avg": Slot((r, n) if left else (m, r), f32), "subspace_updates": COUNTER,
            "angle": Slot((), f32)}


class TrackedSubspaceOptimizer(torch.optim.Optimizer):
    """The tracking and the subspace momentum (module docstring); subclasses give DEFAULTS,
    `state_layout`, `smoothed_projection` (R~) and `apply` (the step from G~). Needs `rank`."""

    DEFAULTS: dict = {}
    NAME = "TrackedSubspaceOptimizer"

    def __init__(self, params, **defaults):
        super().__init__(params, {**self.DEFAULTS, **defaults})

    @staticmethod
    def state_layout(shape, dtype: torch.dtype, group: dict) -> Layout:
        raise NotImplementedError

    def smoothed_projection(self, state: dict, group: dict, R: torch.Tensor, t: int) -> torch.Tensor:
        """R~ from the updated momentum state["exp_avg"] and this step's projection R."""
        raise NotImplementedError

    def apply(self, p: torch.Tensor, state: dict, group: dict, G: torch.Tensor, smoothed: torch.Tensor,
              t: int) -> None:
        """Move `p` by the step this optimizer makes of G~ (`smoothed`) and G (both float32)."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("names") or [f"parameter {i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            if p.ndim != 2:
                raise ValueError(f"{name} has shape {tuple(p.shape)}; {self.NAME} steps 2-D weights only")
            check_rank(group["rank"], p.shape, name, "lower optim.rank")
            if not self.state[p]:  # every state tensor up front, so state_dict() is complete before a step
                self.state[p].update(allocate(self.state_layout(p.shape, p.dtype, group), p.device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, self.state[p], group)
        return loss

    def _move_basis(self, state: dict, group: dict, G: torch.Tensor, side: str, t: int) -> None:
        """The first basis (SVD of G), then a geodesic step every update_proj_gap steps; M follows."""
        if t == 1:
            state["basis"] = gm.initial_basis(G, group["rank"], side)
        elif (t - 1) % group["update_proj_gap"] == 0:
            old = state["basis"]
            new, angle = gm.run_local(gm.grassmann_update_steps(old, G, side, "auto"))
            Q = gm.basis_change(old, new, side)
            state["exp_avg"] = Q @ state["exp_avg"] if side == gm.LEFT else state["exp_avg"] @ Q
            state["basis"], state["angle"] = new, angle.detach().to(state["angle"].dtype).reshape(())
        else:
            return
        state["subspace_updates"].add_(1)

    def _step_one(self, p: torch.Tensor, state: dict, group: dict) -> None:
        state["step"].add_(1)
        t = int(state["step"])
        G = p.grad.to(state["exp_avg"].dtype)
        side = gm.projection_side(tuple(p.shape), group["proj_type"])
        self._move_basis(state, group, G, side, t)
        basis = state["basis"]
        R = gm.project(G, basis, side)
        state["exp_avg"].lerp_(R, 1.0 - group["momentum"])
        smoothed = G + gm.project_back(self.smoothed_projection(state, group, R, t) - R, basis, side)
        self.apply(p, state, group, G, smoothed, t)
