"""TrackedAdafactor: Adafactor's factored second moment on the whole gradient, with momentum kept only
in a low-rank subspace tracked along Grassmannian geodesics (SubTrack's tracking).

For a matrix W: (m, n) with gradient G, rank r, at step t (the tracking and G~: optim/tracked.py):

    V_row, V_col <- Adafactor's factored E[G*G] (beta2_t = 1 - t^-0.8, torch.optim.Adafactor's rule)
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

from optim.state_layout import Layout, Slot
from optim.tracked import TrackedSubspaceOptimizer, tracked_layout

DEFAULTS = {"lr": 1e-2, "momentum": 0.9, "update_proj_gap": 200, "proj_type": "std", "weight_decay": 0.0,
            "d": 1.0, "eps2": 1e-3, "beta2_decay": -0.8}


def state_layout(shape, dtype: torch.dtype, group: dict) -> Layout:
    """TrackedAdafactor's state of an (m, n) weight in `group` (its `rank` and `proj_type`), float32
    (float64 for float64 weights): the factored second moment, the basis and the subspace momentum."""
    (m, n), f32 = shape, torch.promote_types(dtype, torch.float32)
    return {**tracked_layout(shape, dtype, group), "row_var": Slot((m, 1), f32), "col_var": Slot((1, n), f32)}


class TrackedAdafactor(TrackedSubspaceOptimizer):
    """Adafactor on 2-D weights with tracked-subspace momentum (module docstring). Needs `rank`."""

    DEFAULTS = DEFAULTS
    NAME = "TrackedAdafactor"
    state_layout = staticmethod(state_layout)

    def smoothed_projection(self, state: dict, group: dict, R: torch.Tensor, t: int) -> torch.Tensor:
        return state["exp_avg"] / (1.0 - group["momentum"] ** t)

    def apply(self, p: torch.Tensor, state: dict, group: dict, G: torch.Tensor, smoothed: torch.Tensor,
              t: int) -> None:
        one_minus_beta2 = t ** group["beta2_decay"]
        state["row_var"].lerp_(G.square().mean(dim=1, keepdim=True), one_minus_beta2)
        state["col_var"].lerp_(G.square().mean(dim=0, keepdim=True), one_minus_beta2)
        eps1 = torch.finfo(state["row_var"].dtype).eps
        variance = state["row_var"] @ state["col_var"] / state["row_var"].mean().clamp(min=eps1)
        update = smoothed * variance.clamp(min=eps1 * eps1).rsqrt()
        update /= (update.square().mean().sqrt() / group["d"]).clamp(min=1.0)
        rms_weight = p.detach().float().square().mean().sqrt().clamp(min=group["eps2"])
        step_size = rms_weight * min(group["lr"], t ** -0.5)
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_((update * step_size).to(p.dtype), alpha=-1.0)
