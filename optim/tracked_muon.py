"""TrackedMuon: Muon's orthogonalized step with its momentum kept only in a low-rank subspace tracked
along Grassmannian geodesics (optim/tracked.py), so no m x n buffer is kept.

For a matrix W: (m, n) with gradient G, rank r, basis S, R = S^T G and the subspace momentum
M <- beta M + (1 - beta) R (torch.optim.Muon's lerp, no bias correction), at step t:

    G~ = G + S (R~ - R),   R~ = R + beta (M - R)     (Nesterov, as torch's Muon; R~ = M without)
    U  = NewtonSchulz5(G~)                            (torch.optim.Muon's quintic iteration)
    W  <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) U    (`match_rms_adamw`: AdamW's update RMS)

At rank min(m, n) the subspace is the whole space, G~ is Muon's Nesterov momentum and the step is
torch.optim.Muon's (tests/test_peers.py). At rank r the state is r n + m r numbers (basis and
momentum), below SubTrack++'s 2 r n + m r and Muon's m n; the orthogonalization still costs Muon's
O(m n min(m, n)) per step.

Group keys (optim/factory.py fills them): lr, rank, update_proj_gap, proj_type, momentum, nesterov,
weight_decay; ns_steps (5) and eps (1e-7) take torch.optim.Muon's defaults.
"""
from __future__ import annotations

import torch
from torch.optim import _muon  # torch's Newton-Schulz iteration and lr rule, reused rather than restated

from optim.tracked import TrackedSubspaceOptimizer, tracked_layout

DEFAULTS = {"lr": 1e-3, "momentum": 0.95, "nesterov": True, "update_proj_gap": 200, "proj_type": "std",
            "weight_decay": 0.0, "adjust_lr_fn": "match_rms_adamw", "ns_steps": _muon.DEFAULT_NS_STEPS,
            "eps": 1e-7}
NS_COEFFICIENTS = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C)


class TrackedMuon(TrackedSubspaceOptimizer):
    """Muon on 2-D weights with tracked-subspace momentum (module docstring). Needs `rank`."""

    DEFAULTS = DEFAULTS
    NAME = "TrackedMuon"
    state_layout = staticmethod(tracked_layout)  # the basis and the subspace momentum, nothing more

    def smoothed_projection(self, state: dict, group: dict, R: torch.Tensor, t: int) -> torch.Tensor:
        return R.lerp(state["exp_avg"], group["momentum"]) if group["nesterov"] else state["exp_avg"]

    def apply(self, p: torch.Tensor, state: dict, group: dict, G: torch.Tensor, smoothed: torch.Tensor,
              t: int) -> None:
        update = _muon._zeropower_via_newtonschulz(smoothed, NS_COEFFICIENTS, group["ns_steps"], group["eps"])
        lr = _muon._adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape)
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr)
