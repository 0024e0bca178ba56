"""Build an optimizer of the SubTrack++ family from a config.

`OptimConfig` is the `optim` section of a run config; `PRESETS` names the methods
(DESIGN.md: a method is a subspace rule, a moment rule and a residual rule);
`param_groups(model, ...)` decides which weights are projected; `build_optimizer`
puts the two together.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# The three choices of each low-rank preset (DESIGN.md, "The optimizer family").
PRESETS: dict[str, dict | None] = {
    "adamw": None,  # no projected groups: torch.optim.AdamW itself
    "galore": {"subspace": "svd", "moments": "keep", "residual": "drop"},
    "fira": {"subspace": "svd", "moments": "keep", "residual": "recover"},
    "subtrack": {"subspace": "grassmann", "moments": "keep", "residual": "drop"},
    "subtrack++": {"subspace": "grassmann", "moments": "rotate", "residual": "recover"},
}

SUBSPACE_RULES = ("svd", "grassmann")
MOMENT_RULES = ("rotate", "keep", "reset")
RESIDUAL_RULES = ("recover", "drop")
BASIS_DTYPES = ("float32", "bfloat16")

# Attention q/k/v/o and MLP gate/up/down weights are projected (names as docs/architecture.md).
PROJECTED_NAME = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


@dataclass
class OptimConfig:
    """The `optim` section of a run config.

    name: adamw | galore | fira | subtrack | subtrack++.
    rank / update_interval: None = not set; the run config fills them from the paper's value for
        the model size (models.PAPER_RANK), and a projected preset refuses to build without them.
    subspace / moments / residual: None takes the preset's choice; a value overrides it.
    step_size: "auto" (closed-form best angle, times auto_damping) or eta (angle = eta * sigma, capped
        at the best angle so an update never raises the estimation error: optim.grassmann.capped_angle).
    geodesic_rank: directions of the tangent moved per subspace update (1: the paper's rank-1 step).
    recovery_scaled_back: True follows the published Fira / SubTrack++ code (residual
        G - scale * back(R)); False uses the exact residual G - back(R).
    scale_recovery: True multiplies the recovery term by `scale` like the in-subspace update; False
        (the published code) adds it at the full lr.
    rotate_compat: True reproduces the published SubTrack++ moment rotation (abs() and an extra
        (1 - beta2) on V); False follows the derivation (clip at 0).
    state_bits: 32, or 8 for blockwise 8-bit moments (optim/quant8.py; any preset).
    basis_dtype: "float32" or "bfloat16", the storage dtype of the bases S / P (their math stays float32).
    per_layer: step each weight in its post-accumulate-grad hook and free its gradient at once
        (optim/per_layer.py; the training loop attaches it: one rank, no accumulation, no clipping).
    """

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    rank: int | None = None
    update_interval: int | None = None
    scale: float = 0.25
    step_size: float | str = "auto"
    geodesic_rank: int = 1
    subspace: str | None = None
    moments: str | None = None
    residual: str | None = None
    accumulate: bool = False
    state_bits: int = 32
    basis_dtype: str = "float32"
    auto_damping: float = 1.0
    max_angle: float | None = None
    limiter: float = 1.01
    recovery_scaled_back: bool = True
    scale_recovery: bool = False
    rotate_compat: bool = False
    per_layer: bool = False

    def __post_init__(self):
        if self.name not in PRESETS:
            raise ValueError(f"optim.name {self.name!r} is unknown; choose one of {sorted(PRESETS)}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas {self.betas} must be two numbers in [0, 1)")
        if not self.lr > 0:
            raise ValueError(f"optim.lr {self.lr} must be positive")
        if not self.eps > 0:
            raise ValueError(f"optim.eps {self.eps} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay {self.weight_decay} must be >= 0")
        for key in ("rank", "update_interval"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"optim.{key} {value} must be a positive integer (or null for the paper's value)")
        if not self.scale > 0:
            raise ValueError(f"optim.scale {self.scale} must be positive")
        if isinstance(self.step_size, str) and self.step_size != "auto":
            try:  # YAML reads 1e4 (no dot) as a string
                self.step_size = float(self.step_size)
            except ValueError:
                raise ValueError(f"optim.step_size {self.step_size!r} must be a positive number or 'auto'") from None
        if self.step_size != "auto" and not float(self.step_size) > 0:
            raise ValueError(f"optim.step_size {self.step_size} must be a positive number or 'auto'")
        for key, allowed in (("subspace", SUBSPACE_RULES), ("moments", MOMENT_RULES), ("residual", RESIDUAL_RULES)):
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ValueError(f"optim.{key} {value!r} is unknown; choose one of {list(allowed)} "
                                 "(or null for the preset's)")
        if self.state_bits not in (32, 8):
            raise ValueError(f"optim.state_bits {self.state_bits} must be 32 or 8")
        if self.basis_dtype not in BASIS_DTYPES:
            raise ValueError(f"optim.basis_dtype {self.basis_dtype!r} is unknown; choose one of {list(BASIS_DTYPES)}")
        if isinstance(self.geodesic_rank, bool) or not isinstance(self.geodesic_rank, int) or self.geodesic_rank < 1:
            raise ValueError(f"optim.geodesic_rank {self.geodesic_rank!r} must be a positive integer")
        if not 0 < self.auto_damping <= 1:
            raise ValueError(f"optim.auto_damping {self.auto_damping} must be in (0, 1]")
        if self.max_angle is not None and not self.max_angle > 0:
            raise ValueError(f"optim.max_angle {self.max_angle} must be positive (radians) or null")
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"optim.per_layer {self.per_layer!r} must be true or false")
        if not self.limiter >= 1:
            raise ValueError(f"optim.limiter {self.limiter} must be >= 1 (1.01 in the papers)")

    def choices(self) -> dict | None:
        """The preset's (subspace, moments, residual) with this config's overrides; None for adamw."""
        preset = PRESETS[self.name]
        if preset is None:
            return None
        out = dict(preset)
        for key in ("subspace", "moments", "residual"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def is_projected(name: str, param: torch.Tensor) -> bool:
    """True for the attention and MLP weight matrices (the ones GaLore and SubTrack++ project)."""
    return param.ndim == 2 and PROJECTED_NAME.search(name) is not None


def param_groups(model: nn.Module, rank: int | None = None, update_interval: int = 200, scale: float = 0.25,
                 **projected_options) -> list[dict]:
    """Split `model`'s trainable parameters into a plain group and (when `rank` is given) a projected group.

    Each group carries `names` (parameter names, in the same order as `params`) so a sharded
    wrapper can key state by name. The projected group carries galore-torch's keys
    (`rank`, `update_proj_gap`, `scale`, `proj_type`) plus `projected_options`
    (`step_size`, `subspace`, `moments`, `residual`, `accumulate`, ...).
    Raises ValueError when `rank` exceeds min(m, n) of a projected weight.
    """
    plain, projected = {"params": [], "names": []}, {"params": [], "names": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = projected if rank is not None and is_projected(name, param) else plain
        if group is projected and rank > min(param.shape):
            raise ValueError(f"rank {rank} exceeds min(m, n) = {min(param.shape)} for {name} of shape "
                             f"{tuple(param.shape)}; lower optim.rank")
        group["params"].append(param)
        group["names"].append(name)
    groups = [g for g in (plain,) if g["params"]]
    if projected["params"]:
        projected.update(rank=int(rank), update_proj_gap=int(update_interval), scale=float(scale), proj_type="std",
                         **projected_options)
        groups.append(projected)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over `model`'s trainable parameters (every group has `names`)."""
    choices = cfg.choices()
    if choices is None and cfg.state_bits == 8:
        from optim.subtrack import SubTrackAdamW  # no projected group: bitsandbytes' 8-bit AdamW on every weight

        return SubTrackAdamW(param_groups(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, state_bits=8)
    if choices is None:
        # AdamW keeps extra group keys such as `names` untouched.
        return torch.optim.AdamW(param_groups(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    from optim.subtrack import SubTrackAdamW

    for key in ("rank", "update_interval"):
        if getattr(cfg, key) is None:
            raise ValueError(f"optim.{key} is not set and model size has no paper default; set optim.{key} "
                             f"(optimizer {cfg.name!r} projects gradients and needs it)")
    groups = param_groups(model, rank=cfg.rank, update_interval=cfg.update_interval, scale=cfg.scale,
                          step_size=cfg.step_size, geodesic_rank=cfg.geodesic_rank, accumulate=cfg.accumulate, auto_damping=cfg.auto_damping,
                          max_angle=cfg.max_angle, limiter=cfg.limiter, basis_dtype=cfg.basis_dtype,
                          recovery_scaled_back=cfg.recovery_scaled_back, scale_recovery=cfg.scale_recovery, rotate_compat=cfg.rotate_compat, **choices)
    return SubTrackAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                         state_bits=cfg.state_bits)
