"""TrackedAdafactor: Adafactor's factored second moment on the whole gradient, with momentum kept only
in a low-rank subspace tracked along Grassmannian geodesics (SubTrack's tracking).

For a matrix W: (m, n) with gradient G, rank r, basis S: (m, r) (left; the right case is the same with
P: (r, n)), at step t:

    V_row, V_col <- Adafactor's factored E[G*G] (beta2_t = 1 - t^-0.8, torch.optim.Adafactor's rule)
    S            <- SVD of G at t = 1, then a rank-1 geodesic step every update_proj_gap steps (the
                    closed-form best angle, optim/grassmann.py); M rotates with it: M <- (S'^T S) M
    R = S^T G;   M <- beta1 M + (1 - beta1) R                       (momentum of the subspace only)
    G~ = S M^ + (G - S R),   M^ = M / (1 - beta1^t)                 (smoothed inside, raw outside)
    U  = G~ / sqrt(V_row V_col / mean(V_row)),  U <- U / max(1, RMS(U) / d)     (Adafactor's clipping)
    W  <- W (1 - lr wd) - max(eps2, RMS(W)) min(lr, 1/sqrt(t)) U                (Adafactor's step size)

The idea: the gradient's dominant directions carry a consistent signal that momentum averages well,
while the rest is mostly noise, where an average of normalized steps only shrinks the step
(measured: torch's Adafactor with momentum 0.9 on every element trains worse than without on the
9m demo). Adafactor already normalizes every element with m + n numbers; the subspace adds r n + m r.
State per matrix: step, row_var (m), col_var (n), basis (m r or r n), exp_avg (r n or m r),
subspace_updates, angle: r n + m r + m + n numbers, below SubTrack++'s 2 r n + m r.

Group keys (optim/factory.py fills them): lr, rank, update_proj_gap, proj_type, momentum (beta1),
weight_decay; d (1.0), eps2 (1e-3) and beta2_decay (-0.8) take torch.optim.Adafactor's defaults.
"""
from __future__ import annotations

import torch

from optim import grassmann as gm
from optim.options import check_rank
from optim.state_layout import COUNTER, Layout, Slot, allocate

DEFAULTS = {"lr": 1e-2, "momentum": 0.9, "update_proj_gap": 200, "proj_type": "std", "weight_decay": 0.0,
            "d": 1.0, "eps2": 1e-3, "beta2_decay": -0.8}


def state_layout(shape, dtype: torch.dtype, group: dict) -> Layout:
    """TrackedAdafactor's state of an (m, n) weight in `group` (its `rank` and `proj_type`), float32
    (float64 for float64 weights): the factored second moment, the basis and the subspace momentum."""
    (m, n), r = shape, group["rank"]
    f32 = torch.promote_types(dtype, torch.float32)
    left = gm.projection_side((m, n), group["proj_type"]) == gm.LEFT
    return {"step": COUNTER, "row_var": Slot((m, 1), f32), "col_var": Slot((1, n), f32),
            "basis": Slot((m, r) if left else (r, n), f32), "exp_avg": Slot((r, n) if left else (m, r), f32),
            "subspace_updates": COUNTER, "angle": Slot((), f32)}


class TrackedAdafactor(torch.optim.Optimizer):
    """Adafactor on 2-D weights with tracked-subspace momentum (module docstring). Needs `rank`."""

    def __init__(self, params, **defaults):
        super().__init__(params, {**DEFAULTS, **defaults})

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("names") or [f"parameter {i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            if p.ndim != 2:
                raise ValueError(f"{name} has shape {tuple(p.shape)}; TrackedAdafactor steps 2-D weights only")
            check_rank(group["rank"], p.shape, name, "lower optim.rank")
            self._init_state(p, group)

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        """Every state tensor up front, so state_dict() is complete before the first step."""
        if not self.state[p]:
            self.state[p].update(allocate(state_layout(p.shape, p.dtype, group), p.device))

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
        G = p.grad.to(state["row_var"].dtype)
        side = gm.projection_side(tuple(p.shape), group["proj_type"])
        one_minus_beta2 = t ** group["beta2_decay"]
        state["row_var"].lerp_(G.square().mean(dim=1, keepdim=True), one_minus_beta2)
        state["col_var"].lerp_(G.square().mean(dim=0, keepdim=True), one_minus_beta2)

        self._move_basis(state, group, G, side, t)
        basis, beta1 = state["basis"], group["momentum"]
        R = gm.project(G, basis, side)
        state["exp_avg"].lerp_(R, 1.0 - beta1)
        smoothed = G + gm.project_back(state["exp_avg"] / (1.0 - beta1 ** t) - R, basis, side)

        eps1 = torch.finfo(state["row_var"].dtype).eps
        variance = state["row_var"] @ state["col_var"] / state["row_var"].mean().clamp(min=eps1)
        update = smoothed * variance.clamp(min=eps1 * eps1).rsqrt()
        update /= (update.square().mean().sqrt() / group["d"]).clamp(min=1.0)
        rms_weight = p.detach().float().square().mean().sqrt().clamp(min=group["eps2"])
        step_size = rms_weight * min(group["lr"], t ** -0.5)
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_((update * step_size).to(p.dtype), alpha=-1.0)
