"""SubTrackAdamW: AdamW with low-rank projected weights (SubTrack++, GaLore, Fira, SubTrack).

A param group with a `rank` key is projected (galore-torch's keys `rank`, `update_proj_gap`,
`scale`, `proj_type`, plus the three choices of docs/architecture.md, "The optimizer family"):

    subspace  "grassmann" (SVD once, then a rank-1 geodesic step every update_proj_gap steps)
              | "svd" (SVD of the gradient every update_proj_gap steps)
    moments   "rotate" (projection-aware) | "keep" | "reset"       when the basis moves
    residual  "recover" (recovery scaling + norm-growth limiter) | "drop"

and `step_size` ("auto": the closed-form best angle; or eta, whose angle eta*sigma is capped at the
best angle, see grassmann.capped_angle), `geodesic_rank` (1: the paper's rank-1 geodesic step; k: the
tangent's top k directions at once, each at its own best angle), `auto_damping`, `max_angle`,
`accumulate`, `limiter` (1.01),
`recovery_scaled_back` (True: residual G - scale*back(R) as the published code; False: exact),
`scale_recovery` (True: the recovery term is multiplied by `scale` too, like the in-subspace
update; False: at the full lr, as the published code),
`rotate_compat` (True: the published SubTrack++ V rotation), `basis_dtype` ("float32" or
"bfloat16": how the basis is stored). Other groups are plain AdamW. Each key's default, allowed values
and doc are declared once in optim/options.py, which fills and checks every projected group.

The Adam arithmetic (bias correction folded into the step size, eps added to sqrt(V), weight
decay after the update) follows galore-torch / fira so the presets reproduce them. The math of
the subspace lives in optim/grassmann.py; this file only schedules it and keeps the state.

State per projected weight (tensors only, created when the group is added from `state_layout`, which
pretrain/memory.py counts too):
    step, moment_step (int64, CPU)  steps taken; steps since the moments were (re)started
    basis (float32 | bfloat16)      S: (m, r) or P: (r, n); zeros until the first step. Stored in
                                    the group's basis_dtype; every use upcasts it to float32 and a
                                    new basis is rounded once when stored. In bf16, S^T S = I holds
                                    only to bf16 rounding (~1e-2) and the rounding of successive
                                    stores may add up over many updates; nothing re-orthonormalises
                                    the basis (a QR after each store would).
    exp_avg, exp_avg_sq (float32)   Adam moments of the low-rank gradient
                                    (float32 for any weight dtype but float64, which keeps float64)
    limiter_norm (float32, 0-d)     last limited norm of the recovery term (-1: none yet)
    subspace_updates (int64, CPU)   bases computed so far, the first SVD included
                                    (= 1 + t // update_proj_gap after 0-indexed step t)
    angle (float32, 0-d)            angle of the last subspace update (radians)
    grad_sum, grad_count            only with accumulate: gradients since the last update

state_bits=8 (a group key, default from the constructor) stores each moment of 4096 elements or
more blockwise in 8 bits (optim/quant8.py): exp_avg / exp_avg_sq become uint8 codes of the same
shape plus exp_avg_absmax / exp_avg_sq_absmax (float32, one per 256 elements). Projected moments
are dequantized, updated (and rotated at a subspace move) in float32 and quantized again each
step; plain groups use bitsandbytes' fused 8-bit AdamW (its weight decay comes before the update).
The basis keeps its basis_dtype. Codes and absmax are saved and loaded as they are.

Sharded weights: the math reads weights and gradients through `_local` and sums what crosses shards
with `_all_reduce` (the generators of sums of optim/grassmann.py, run in lockstep by `step()`); here
both are trivial. optim/sharding/fsdp.py overrides them for FSDP2's row shards.

Every subspace update's angle is logged with the weight's name (the group's `names`) at DEBUG
level on this module's logger; `pop_subspace_stats()` sums them up for the training log.
"""
from __future__ import annotations

import logging
import math
from itertools import chain

import torch

from optim import grassmann as gm
from optim import quant8
from optim.options import PROJECTED, PROJECTED_DEFAULTS, STATE_BITS, check, check_rank
from optim.state_layout import COUNTER, Layout, Slot, allocate
from optim.stats import SubspaceStats

logger = logging.getLogger(__name__)


def state_layout(shape, dtype: torch.dtype, group: dict, rows: int | None = None) -> Layout:
    """SubTrackAdamW's state of a weight of `shape` and `dtype` in `group` (the module docstring's list).

    Reads the group's `state_bits` and, when it has a `rank` (projected), `proj_type`, `basis_dtype` and
    `accumulate`. rows: this process's rows of a weight sharded by rows (None: all of them); the basis
    stays whole, and 8 bits or not is decided by a moment's whole size, so every shard decides alike.
    """
    shape = tuple(shape)
    local = shape if rows is None else (rows, *shape[1:])
    if "rank" not in group:  # AdamW: zeros_like(p), or bitsandbytes' blockwise 8-bit state (float32 below 4096)
        return {"step": COUNTER, **_moments(local, shape, group["state_bits"], dtype)}
    (m, n), r = shape, group["rank"]
    rows = m if rows is None else rows
    left = gm.projection_side((m, n), group["proj_type"]) == gm.LEFT
    low, full_low = ((r, n), (r, n)) if left else ((rows, r), (m, r))
    # float32 whatever the weight dtype (float64 weights keep float64 state, for references).
    f32 = torch.promote_types(dtype, torch.float32)
    out = {"step": COUNTER, "moment_step": COUNTER,
           "basis": Slot((m, r) if left else (r, n), torch.bfloat16 if group["basis_dtype"] == "bfloat16" else f32),
           **_moments(low, full_low, group["state_bits"], f32),
           "limiter_norm": Slot((), f32, -1.0), "subspace_updates": COUNTER, "angle": Slot((), f32)}
    if group["accumulate"]:
        out.update(grad_sum=Slot((rows, n), f32), grad_count=COUNTER)
    return out


def _moments(shape, full_shape, state_bits: int, dtype: torch.dtype) -> Layout:
    """exp_avg and exp_avg_sq of `shape`: 8-bit as optim/quant8.py lays them out (by the whole moment's
    size, `full_shape`), else in `dtype`."""
    if state_bits == 8:
        return {**quant8.moment_layout("exp_avg", shape, 8, full_shape),
                **quant8.moment_layout("exp_avg_sq", shape, 8, full_shape)}
    return {"exp_avg": Slot(shape, dtype), "exp_avg_sq": Slot(shape, dtype)}


class SubTrackAdamW(torch.optim.Optimizer, SubspaceStats):
    """AdamW over plain groups and low-rank projected groups (see the module docstring).

    Works on any subset of a model's parameters (a sharded wrapper gives each rank its own).
    `pop_subspace_stats()` returns and clears the subspace movement since the last call.
    """

    _all_reduce = None  # sums partial sums across shards in place (None: every weight is whole here)

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        """The part of a weight or gradient this process holds and updates: all of it here."""
        return t

    def _full(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The whole (m, n) matrix of which `local` is p's part (an SVD needs it): `local` itself here."""
        return local

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, state_bits: int = 32):
        if not lr >= 0:
            raise ValueError(f"lr {lr} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas {betas} must lie in [0, 1)")
        if not eps >= 0:
            raise ValueError(f"eps {eps} must be >= 0")
        check(STATE_BITS, state_bits)
        self._angles: list[torch.Tensor] = []
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "state_bits": state_bits})

    # ----------------------------------------------------------------- groups and state
    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in PROJECTED_DEFAULTS.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            self._check_projected_group(group)
        for p in group["params"]:
            self._init_state(p, group)

    def _check_projected_group(self, group: dict) -> None:
        for opt in PROJECTED:  # the declarations of optim/options.py
            check(opt, group[opt.key])
        names = group.get("names") or [f"parameter {i} of the group" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            if p.ndim != 2:
                raise ValueError(f"{name} has shape {tuple(p.shape)}; only 2-D weights can be projected "
                                 "(put it in a group without 'rank')")
            check_rank(group["rank"], p.shape, name, "lower the rank")

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        """Create every state tensor up front so state_dict() is complete before the first step."""
        state = self.state[p]
        if not state:  # the rows: m, or this process's rows of a sharded weight
            state.update(allocate(state_layout(p.shape, p.dtype, group, self._local(p).shape[0]), p.device))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps each state tensor's saved dtype (bases stay float32, counters int64)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    # host-side counters stay on the CPU; 8-bit codes (uint8) go with the weight
                    device = "cpu" if value.dtype == torch.int64 else p.device
                    self.state[p][key] = value.to(device=device, copy=True)

    # ----------------------------------------------------------------- moments (8-bit swap point)
    def _load_moments(self, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank Adam moments as float32 tensors the caller may update in place."""
        return quant8.read_moment(state, "exp_avg", signed=True), quant8.read_moment(state, "exp_avg_sq", signed=False)

    def _store_moments(self, state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """Write the moments back (a quantized variant packs them here)."""
        quant8.write_moment(state, "exp_avg", exp_avg, signed=True)
        quant8.write_moment(state, "exp_avg_sq", exp_avg_sq, signed=False)

    # ----------------------------------------------------------------- subspace
    @staticmethod
    def _basis(state: dict) -> torch.Tensor:
        """The basis in the math dtype (the moments' float32): the stored tensor itself when it is
        float32, a float32 copy of a bfloat16 one. Same column-major layout either way."""
        return state["basis"].to(state["angle"].dtype)

    @staticmethod
    def _store_basis(state: dict, basis: torch.Tensor) -> None:
        """Keep `basis` (float32) in the stored dtype; .to() keeps the column-major strides."""
        state["basis"] = basis.to(state["basis"].dtype)

    def move_basis(self, state: dict, group: dict, new_basis: torch.Tensor, side: str) -> None:
        """Replace the basis and carry the moments across by the group's `moments` rule."""
        old = self._basis(state)
        if group["moments"] == "rotate":
            exp_avg, exp_avg_sq = self._load_moments(state)
            compat = group["betas"][1] if group["rotate_compat"] else None
            Q = gm.basis_change(old, new_basis, side)
            weight = gm.adam_mean_weight(group["betas"], int(state["moment_step"]))
            self._store_moments(state, *gm.rotate_moments(exp_avg, exp_avg_sq, Q, side, compat, weight))
        elif group["moments"] == "reset":
            zeros = torch.zeros(state["exp_avg"].shape, dtype=state["angle"].dtype, device=state["basis"].device)
            self._store_moments(state, zeros, zeros)
            state["moment_step"].zero_()
        self._store_basis(state, new_basis)

    def _update_subspace(self, p: torch.Tensor, state: dict, group: dict, G: torch.Tensor, side: str, t: int):
        """Compute the first basis (t = 0) or move it (every update_proj_gap steps). A generator of sums
        (optim/grassmann.py): a geodesic step sums over G's unprojected axis; an SVD reads the whole G."""
        if group["accumulate"]:
            state["grad_sum"].add_(G)
            state["grad_count"].add_(1)
        first = int(state["subspace_updates"]) == 0
        if not first and t % group["update_proj_gap"] != 0:
            return
        if first:
            self._store_basis(state, gm.initial_basis(self._full(p, G), group["rank"], side))
        else:
            G_sub = state["grad_sum"] / int(state["grad_count"]) if group["accumulate"] else G
            basis = self._basis(state)
            if group["subspace"] == "svd":
                new_basis = gm.initial_basis(self._full(p, G_sub), group["rank"], side)
                angle = gm.largest_principal_angle(basis, new_basis, side)
            else:
                new_basis, angle = yield from gm.grassmann_update_steps(
                    basis, G_sub, side, group["step_size"], group["auto_damping"], group["max_angle"],
                    int(group["geodesic_rank"]))
            self.move_basis(state, group, new_basis, side)
            state["angle"] = angle.detach().to(state["angle"].dtype).reshape(())
            self._angles.append(state["angle"].abs())
            if logger.isEnabledFor(logging.DEBUG):  # float() syncs the device: only when asked for
                logger.debug("subspace update of %s at step %d: angle %.6g rad", self._name_of(p, group), t,
                             float(state["angle"]))
        if group["accumulate"]:
            state["grad_sum"].zero_()
            state["grad_count"].zero_()
        state["subspace_updates"].add_(1)

    @staticmethod
    def _name_of(p: torch.Tensor, group: dict) -> str:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("names")
        return names[index] if names else f"parameter {index} of a projected group"

    def pop_subspace_stats(self) -> dict[str, float]:
        """Subspace updates since the last call: count, mean and max |angle| (radians); clears them."""
        angles, self._angles = self._angles, []
        if not angles:
            return {"count": 0.0, "angle_mean": 0.0, "angle_max": 0.0}
        stacked = torch.stack([a.cpu() for a in angles])
        return {"count": float(len(angles)), "angle_mean": float(stacked.mean()), "angle_max": float(stacked.max())}

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # One generator per weight, run in lockstep: what crosses shards is summed in one collective
        # per round for all weights (a normal step: the limiter's norms; a subspace update: two more).
        gm.run_summed([self._step_one(p, group) for group in self.param_groups for p in group["params"]
                       if p.grad is not None], self._all_reduce)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Step one parameter with its group's hyper-parameters (current lr included), exactly as
        `step()` would step it; no-op when p.grad is None. For per-layer updates
        (optim/per_layer.py), which call it from p's post-accumulate-grad hook."""
        if p.grad is not None:
            gm.run_local(self._step_one(p, self._group_of(p)))

    def _group_of(self, p: torch.Tensor) -> dict:
        # Index of p's group, rebuilt when the list of groups changes (torch's load_state_dict
        # replaces it; add_param_group appends). The group dict itself is read from the list each
        # time, so a scheduler's lr and any replaced dict are always current.
        groups = self.param_groups
        cached = getattr(self, "_group_index", None)
        if cached is None or cached[0] is not groups or cached[1] != len(groups):
            self._group_index = cached = (groups, len(groups),
                                          {id(q): i for i, g in enumerate(groups) for q in g["params"]})
        index = cached[2].get(id(p))
        if index is None:
            raise KeyError(f"a tensor of shape {tuple(p.shape)} is not in this optimizer's param groups")
        return groups[index]

    def _step_one(self, p: torch.Tensor, group: dict):
        """Step p (its local part) in place: a generator of sums (a projected weight's subspace and limiter)."""
        if p.grad.is_sparse:
            raise RuntimeError("SubTrackAdamW does not support sparse gradients")
        weight, grad = self._local(p), self._local(p.grad)
        if "rank" not in group and group["state_bits"] == 8:
            # bitsandbytes' AdamW8bit update: fused 8-bit, or its 32-bit kernel below 4096
            # elements (its weight decay comes before the update)
            quant8.adamw_step(weight, grad, self.state[p], group["lr"], group["betas"], group["eps"],
                              group["weight_decay"])
            return
        if "rank" in group:
            update, step_size = yield from self._projected_update(p, grad, group)
        else:
            update, step_size = self._plain_update(p, grad, group)
        weight.add_(update, alpha=-step_size)
        # Decoupled weight decay after the update, as galore-torch and fira do.
        if group["weight_decay"] > 0.0:
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _adam_step_size(group: dict, step: int) -> float:
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)

    @staticmethod
    def _adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, g: torch.Tensor, group: dict) -> torch.Tensor:
        """Update the moments in place with gradient g; returns M / (sqrt(V) + eps)."""
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        return exp_avg / exp_avg_sq.sqrt().add_(group["eps"])

    def _plain_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        state = self.state[p]
        state["step"].add_(1)
        update = self._adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, group)
        return update, self._adam_step_size(group, int(state["step"]))

    def _projected_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict):
        """(update, step size) of a projected weight; a generator of sums (optim/grassmann.py)."""
        state = self.state[p]
        side = gm.projection_side(tuple(p.shape), group["proj_type"])
        G = grad.to(state["angle"].dtype)  # the math dtype: float32 (float64 for float64 weights)
        yield from self._update_subspace(p, state, group, G, side, int(state["step"]))
        basis = self._basis(state)
        R = gm.project(G, basis, side)

        exp_avg, exp_avg_sq = self._load_moments(state)
        N = self._adam_direction(exp_avg, exp_avg_sq, R, group)
        self._store_moments(state, exp_avg, exp_avg_sq)
        state["step"].add_(1)
        state["moment_step"].add_(1)

        if group["residual"] == "recover":
            back_scale = group["scale"] if group["recovery_scaled_back"] else 1.0
            weight = group["scale"] if group["scale_recovery"] else 1.0
            update, state["limiter_norm"] = yield from gm.recovered_update_steps(
                G, R, N, basis, side, group["scale"], back_scale, state["limiter_norm"], group["limiter"], weight)
        else:
            update = gm.project_back(N, basis, side) * group["scale"]
        return update.to(p.dtype), self._adam_step_size(group, int(state["moment_step"]))
