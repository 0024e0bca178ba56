"""Build an optimizer of the SubTrack++ family from a config.

`OptimConfig` is the `optim` section of a run config; `PRESETS` names the methods
(docs/architecture.md: a method is a subspace rule, a moment rule and a residual rule);
`param_groups(model, ...)` decides which weights are projected; `build_optimizer`
puts the two together.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from optim.options import PROJECTED, STATE_BITS, check, check_rank, option

_DEFAULT = {o.field: o.config_default for o in PROJECTED if o.field}

# The choices of each low-rank preset (docs/architecture.md, "The optimizer family"): subspace, moment
# and residual rules, and whether the recovery term moves at lr x scale like the in-subspace update.
# `subtrack++` is our SubTrack++ (recovery scaled: the side-by-side benchmark in docs/benchmarks.md);
# `subtrack++paper` keeps the published method's recovery at the full lr.
PRESETS: dict[str, dict | None] = {
    "adamw": None,  # no projected groups: torch.optim.AdamW itself
    "galore": {"subspace": "svd", "moments": "keep", "residual": "drop", "scale_recovery": False},
    "fira": {"subspace": "svd", "moments": "keep", "residual": "recover", "scale_recovery": False},
    "subtrack": {"subspace": "grassmann", "moments": "keep", "residual": "drop", "scale_recovery": False},
    "subtrack++": {"subspace": "grassmann", "moments": "rotate", "residual": "recover", "scale_recovery": True},
    "subtrack++paper": {"subspace": "grassmann", "moments": "rotate", "residual": "recover",
                        "scale_recovery": False},
}
PRESET_KEYS = ("subspace", "moments", "residual", "scale_recovery")  # null in optim: = the preset's

# Attention q/k/v/o and MLP gate/up/down weights are projected (names as docs/architecture.md).
PROJECTED_NAME = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


@dataclass
class OptimConfig:
    """The `optim` section of a run config.

    name: adamw | galore | fira | subtrack | subtrack++ | subtrack++paper.
    rank / update_interval: None = not set; the run config fills them from the paper's value for
        the model size (models.PAPER_RANK), and a projected preset refuses to build without them.
    subspace / moments / residual: None takes the preset's choice; a value overrides it.
    The other low-rank fields (scale, proj_type, step_size, geodesic_rank, auto_damping, max_angle, accumulate,
        limiter, recovery_scaled_back, scale_recovery, rotate_compat, basis_dtype) and state_bits:
        default, allowed values and meaning in optim/options.py, which __post_init__ checks against.
    per_layer: step each weight in its post-accumulate-grad hook and free its gradient at once
        (optim/per_layer.py; the training loop attaches it: one rank, no accumulation, no clipping).
    """

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    # The low-rank options: defaults, allowed values and docs in optim/options.py.
    rank: int | None = _DEFAULT["rank"]
    update_interval: int | None = _DEFAULT["update_interval"]
    scale: float = _DEFAULT["scale"]
    proj_type: str = _DEFAULT["proj_type"]
    step_size: float | str = _DEFAULT["step_size"]
    geodesic_rank: int = _DEFAULT["geodesic_rank"]
    subspace: str | None = _DEFAULT["subspace"]
    moments: str | None = _DEFAULT["moments"]
    residual: str | None = _DEFAULT["residual"]
    accumulate: bool = _DEFAULT["accumulate"]
    state_bits: int = STATE_BITS.default
    basis_dtype: str = _DEFAULT["basis_dtype"]
    auto_damping: float = _DEFAULT["auto_damping"]
    max_angle: float | None = _DEFAULT["max_angle"]
    limiter: float = _DEFAULT["limiter"]
    recovery_scaled_back: bool = _DEFAULT["recovery_scaled_back"]
    scale_recovery: bool | None = _DEFAULT["scale_recovery"]
    rotate_compat: bool = _DEFAULT["rotate_compat"]
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
        if isinstance(self.step_size, str) and self.step_size != "auto":
            try:  # YAML reads 1e4 (no dot) as a string
                self.step_size = float(self.step_size)
            except ValueError:
                pass  # refused just below, with the allowed values
        for opt in (*PROJECTED, STATE_BITS):
            if opt.field:
                check(opt, getattr(self, opt.field), f"optim.{opt.field}", opt.config_null)
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"optim.per_layer {self.per_layer!r} must be true or false")

    def choices(self) -> dict | None:
        """The preset's choices (PRESET_KEYS) with this config's overrides; None for adamw."""
        preset = PRESETS[self.name]
        if preset is None:
            return None
        out = dict(preset)
        for key in PRESET_KEYS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def group_options(self) -> dict:
        """The projected group's keys this config sets besides rank, update_proj_gap and scale
        (param_groups' own arguments): every option of optim/options.py with an `optim:` field,
        the preset's choices with this config's overrides."""
        out = {o.key: getattr(self, o.field) for o in PROJECTED
               if o.field and o.key not in ("rank", "update_proj_gap", "scale")}
        out.update(self.choices() or {})
        return out


def is_projected(name: str, param: torch.Tensor) -> bool:
    """True for the attention and MLP weight matrices (the ones GaLore and SubTrack++ project)."""
    return param.ndim == 2 and PROJECTED_NAME.search(name) is not None


def param_groups(model: nn.Module, rank: int | None = None,
                 update_interval: int = option("update_proj_gap").default, scale: float = option("scale").default,
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
        if group is projected:
            check_rank(rank, param.shape, name, "lower optim.rank")
        group["params"].append(param)
        group["names"].append(name)
    groups = [g for g in (plain,) if g["params"]]
    if projected["params"]:
        projected.update(rank=int(rank), update_proj_gap=int(update_interval), scale=float(scale),
                         **{"proj_type": option("proj_type").default, **projected_options})
        groups.append(projected)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, optimizer_class=None) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over `model`'s trainable parameters (every group has `names`).

    optimizer_class: SubTrackAdamW or a subclass (optim/sharding/fsdp.py's, for FSDP2's row shards); plain
    32-bit AdamW is torch's own either way."""
    from optim.subtrack import SubTrackAdamW

    optimizer_class = optimizer_class or SubTrackAdamW
    choices = cfg.choices()
    if choices is None and cfg.state_bits == 8:  # no projected group: bitsandbytes' 8-bit AdamW on every weight
        return optimizer_class(param_groups(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                               weight_decay=cfg.weight_decay, state_bits=8)
    if choices is None:
        # AdamW keeps extra group keys such as `names` untouched.
        return torch.optim.AdamW(param_groups(model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    for key in ("rank", "update_interval"):
        if getattr(cfg, key) is None:
            raise ValueError(f"optim.{key} is not set and model size has no paper default; set optim.{key} "
                             f"(optimizer {cfg.name!r} projects gradients and needs it)")
    groups = param_groups(model, rank=cfg.rank, update_interval=cfg.update_interval, scale=cfg.scale,
                          **cfg.group_options())
    return optimizer_class(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           state_bits=cfg.state_bits)
