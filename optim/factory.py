"""Build an optimizer of the SubTrack++ family, or a peer users compare it with, from a config.

`OptimConfig` is the `optim` section of a run config; `PRESETS` names the methods: the low-rank
family (docs/architecture.md: a method is a subspace rule, a moment rule and a residual rule),
AdamW and its 8-bit form, and torch's Muon and Adafactor on the matrices (optim/hybrid.py);
`param_groups(model, ...)` decides which weights are projected; `build_optimizer`
puts the two together.

Every method keeps two lrs: `optim.lr` for the plain group (embeddings, norms, head) and
`optim.lr x optim.matrix_lr_ratio` for the attention and MLP matrices (projected or not), so each
method can be tuned on both knobs alike (a method that tolerates a high lr must not win through its
embeddings alone).
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
    "adamw8bit": None,  # adamw with state_bits 8: bitsandbytes' blockwise 8-bit AdamW on every weight
    "muon": None,  # torch.optim.Muon on the matrices, AdamW elsewhere (optim/hybrid.py)
    "adafactor": None,  # torch.optim.Adafactor on the matrices, AdamW elsewhere (optim/hybrid.py)
    "subtrack-adafactor": None,  # ours: Adafactor with Grassmannian-tracked subspace momentum (optim/tracked_adafactor.py)
    "subtrack-muon": None,  # ours: Muon with Grassmannian-tracked subspace momentum (optim/tracked_muon.py)
    "apollo": None,  # apollo-torch's APOLLOAdamW, when installed: the benchmark's peer (APOLLO below)
    "apollo-mini": None,
    "galore": {"subspace": "svd", "moments": "keep", "residual": "drop", "scale_recovery": False},
    "fira": {"subspace": "svd", "moments": "keep", "residual": "recover", "scale_recovery": False},
    "subtrack": {"subspace": "grassmann", "moments": "keep", "residual": "drop", "scale_recovery": False},
    "subtrack++": {"subspace": "grassmann", "moments": "rotate", "residual": "recover", "scale_recovery": True},
    "subtrack++paper": {"subspace": "grassmann", "moments": "rotate", "residual": "recover",
                        "scale_recovery": False},
}
PRESET_KEYS = ("subspace", "moments", "residual", "scale_recovery")  # null in optim: = the preset's
LOW_RANK = tuple(name for name, preset in PRESETS.items() if preset is not None)
# Torch's own optimizer for the matrices, with the group keys each gets from the config.
# Muon: `match_rms_adamw` scales its orthogonalized update to AdamW's RMS (0.2 sqrt(max(m, n))), so
# one lr serves both groups, as Moonshot's "Muon is scalable" recipe does.
MUON_KEYS = {"nesterov": True, "adjust_lr_fn": "match_rms_adamw"}
MATRIX_PEERS = {"muon": MUON_KEYS, "adafactor": {}, "subtrack-adafactor": {}, "subtrack-muon": MUON_KEYS}
# optim.momentum when null (None: Adafactor's default, no first moment).
DEFAULT_MOMENTUM = {"muon": 0.95, "adafactor": None, "subtrack-adafactor": 0.9, "subtrack-muon": 0.95}
TRACKED = ("subtrack-adafactor", "subtrack-muon")  # matrix optimizers that keep a basis: optim.rank and update_interval
# APOLLO through the apollo-torch package (the `bench` extra), with its README's settings: random
# projection, channel-wise scaling at rank optim.rank (a quarter of hidden, as GaLore) and scale 1, or
# APOLLO-Mini's tensor-wise scaling at rank 1 and scale 128. One process only: its state keeps
# projector objects, which the weights-only checkpoint loader refuses.
APOLLO = {"apollo": {"proj": "random", "scale_type": "channel", "scale": 1.0},
          "apollo-mini": {"rank": 1, "proj": "random", "scale_type": "tensor", "scale": 128.0}}
APOLLO_HINT = 'optim.name {name!r} runs through the apollo-torch package: pip install -c constraints.txt -e ".[bench]"'
# The `optim:` keys a preset cannot build without, and why it needs them (apollo-mini has its own rank,
# subtrack-adafactor and apollo default update_interval to 200).
NEEDS = {**{name: (("rank", "update_interval"), "projects gradients and needs it") for name in LOW_RANK},
         **{name: (("rank",), "tracks a subspace and needs it") for name in TRACKED},
         "apollo": (("rank",), "needs it (a quarter of hidden, as GaLore)")}
EXAMPLES = {"rank": "a quarter of hidden_size", "update_interval": "200, the paper's for 60m-3b"}

# Attention q/k/v/o and MLP gate/up/down weights are projected (names as docs/architecture.md).
PROJECTED_NAME = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


@dataclass
class OptimConfig:
    """The `optim` section of a run config.

    name: adamw | adamw8bit | muon | adafactor | subtrack-adafactor | subtrack-muon | apollo | apollo-mini |
        galore | fira |
        subtrack | subtrack++ | subtrack++paper.
        adamw8bit is adamw with state_bits 8 (it sets state_bits).
    matrix_lr_ratio: the matrices' lr as a multiple of lr (every method; the low-rank presets' update
        is further multiplied by `scale`).
    momentum: muon's momentum (null: 0.95), adafactor's first moment (null: none, torch's default) or
        the subspace momentum of subtrack-adafactor (null: 0.9) and subtrack-muon (null: 0.95).
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
    matrix_lr_ratio: float = 1.0
    momentum: float | None = None
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
        if isinstance(self.matrix_lr_ratio, (bool, str)) or not self.matrix_lr_ratio > 0:
            raise ValueError(f"optim.matrix_lr_ratio {self.matrix_lr_ratio!r} must be a positive number "
                             "(the matrices' lr as a multiple of optim.lr)")
        if self.momentum is not None and (isinstance(self.momentum, (bool, str)) or not 0 <= self.momentum < 1):
            raise ValueError(f"optim.momentum {self.momentum!r} must be in [0, 1) (or null for the method's default)")
        if self.momentum is not None and self.name not in MATRIX_PEERS:
            raise ValueError(f"optim.momentum is an option of {' and '.join(MATRIX_PEERS)}, not of "
                             f"{self.name!r}; drop it (betas set Adam's moments)")
        if self.name == "adamw8bit":
            self.state_bits = 8
        if self.name in MATRIX_PEERS and self.state_bits != 32:
            raise ValueError(f"optim.state_bits {self.state_bits} with optim.name {self.name!r}: torch's "
                             f"{self.name} keeps 32-bit state; use optim.name adamw8bit or a low-rank preset for 8-bit state")
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


def require_rank(name: str, rank: int | None, update_interval: int | None,
                 why: str = "model size has no paper default") -> None:
    """ValueError when preset `name` needs optim.rank or optim.update_interval (NEEDS) and it is None;
    `why`: why it was not filled in (the run config fills the paper's value for the model size)."""
    values = {"rank": rank, "update_interval": update_interval}
    for key in needed_keys(name):
        if values[key] is None:
            raise ValueError(f"optim.{key} is not set and {why}; set optim.{key} (e.g. {EXAMPLES[key]}): "
                             f"optim.name {name!r} {NEEDS[name][1]}")


def needed_keys(name: str) -> tuple[str, ...]:
    """The `optim:` keys preset `name` cannot build without: ("rank", "update_interval"), ("rank",) or ()."""
    return NEEDS[name][0] if name in NEEDS else ()


def is_projected(name: str, param: torch.Tensor) -> bool:
    """True for the attention and MLP weight matrices (the ones GaLore and SubTrack++ project)."""
    return param.ndim == 2 and PROJECTED_NAME.search(name) is not None


def param_groups(model: nn.Module, rank: int | None = None,
                 update_interval: int = option("update_proj_gap").default, scale: float = option("scale").default,
                 matrix_group: dict | None = None, **projected_options) -> list[dict]:
    """Split `model`'s trainable parameters into a plain group and (when `rank` or `matrix_group` is
    given) a group of the attention and MLP matrices.

    Each group carries `names` (parameter names, in the same order as `params`) so a sharded
    wrapper can key state by name. With `rank` the matrices' group is projected: it carries
    galore-torch's keys (`rank`, `update_proj_gap`, `scale`, `proj_type`) plus `projected_options`
    (`step_size`, `subspace`, `moments`, `residual`, `accumulate`, ...). `matrix_group` holds keys
    the matrices' group gets besides (its own `lr`, a `matrix_method` of optim/hybrid.py).
    Raises ValueError when `rank` exceeds min(m, n) of a projected weight.
    """
    plain, matrices = {"params": [], "names": []}, {"params": [], "names": []}
    split = rank is not None or matrix_group is not None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = matrices if split and is_projected(name, param) else plain
        if group is matrices and rank is not None:
            check_rank(rank, param.shape, name, "lower optim.rank")
        group["params"].append(param)
        group["names"].append(name)
    groups = [g for g in (plain,) if g["params"]]
    if matrices["params"]:
        if rank is not None:
            matrices.update(rank=int(rank), update_proj_gap=int(update_interval), scale=float(scale),
                            **{"proj_type": option("proj_type").default, **projected_options})
        matrices.update(matrix_group or {})
        groups.append(matrices)
    return groups


def matrix_group(cfg: OptimConfig) -> dict | None:
    """The matrices' own group keys for `cfg`: their lr (optim.lr x matrix_lr_ratio) and, for muon and
    adafactor, torch's optimizer and its keys; None when they share the plain group (adamw at ratio 1,
    which keeps its one group, as checkpoints of earlier versions hold)."""
    keys = {} if cfg.matrix_lr_ratio == 1 else {"lr": cfg.lr * cfg.matrix_lr_ratio}
    if cfg.name in MATRIX_PEERS:
        momentum = DEFAULT_MOMENTUM[cfg.name] if cfg.momentum is None else cfg.momentum
        keys.update(lr=cfg.lr * cfg.matrix_lr_ratio, matrix_method=cfg.name, weight_decay=cfg.weight_decay,
                    **MATRIX_PEERS[cfg.name])
        if cfg.name != "adafactor" or momentum is not None:
            keys["momentum"] = momentum
        if cfg.name in TRACKED:
            require_rank(cfg.name, cfg.rank, cfg.update_interval)
            keys.update(rank=cfg.rank, update_proj_gap=cfg.update_interval or 200, proj_type=cfg.proj_type)
    return keys or (None if cfg.choices() is None else {})


def state_layout(name: str, shape, dtype: torch.dtype, projected: bool, group: dict, rows: int | None = None):
    """The state (optim.state_layout.Layout) that build_optimizer's optimizer for preset `name` keeps for
    one weight of `shape` and `dtype`; projected: whether it is one of the matrices (is_projected).

    group: the settings a layout reads: rank, state_bits, proj_type, basis_dtype, accumulate, momentum.
    rows: this process's rows of a weight sharded by rows (FSDP2; None: all)."""
    from optim import state_layout as layouts
    from optim import subtrack
    from optim.hybrid import MATRIX_METHODS

    local = tuple(shape) if rows is None else (rows, *tuple(shape)[1:])
    if name in APOLLO:
        return layouts.apollo(shape, APOLLO[name].get("rank", group["rank"])) if projected else \
            layouts.apollo_adamw(local, dtype)
    if projected and name in MATRIX_PEERS:  # optim/hybrid.py: torch's Muon / Adafactor, or ours
        if name in TRACKED:  # ours allocate from the layout they declare
            return MATRIX_METHODS[name].state_layout(shape, dtype, group)
        if name == "muon":
            return layouts.torch_muon(shape, dtype)
        return layouts.torch_adafactor(shape, dtype, group.get("momentum"))
    if name in LOW_RANK or group["state_bits"] == 8:  # SubTrackAdamW (plain AdamW on the other weights)
        keys = group if projected and name in LOW_RANK else {"state_bits": group["state_bits"]}
        return subtrack.state_layout(shape, dtype, keys, rows)
    return layouts.torch_adamw(local, dtype)


def build_optimizer(model: nn.Module, cfg: OptimConfig, optimizer_class=None) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over `model`'s trainable parameters (every group has `names`).

    optimizer_class: SubTrackAdamW or a subclass (optim/sharding/fsdp.py's, for FSDP2's row shards); plain
    32-bit AdamW is torch's own either way, muon and adafactor optim.hybrid.HybridOptimizer."""
    from optim.hybrid import HybridOptimizer
    from optim.subtrack import SubTrackAdamW

    optimizer_class = optimizer_class or SubTrackAdamW
    choices, matrices = cfg.choices(), matrix_group(cfg)
    adam = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name in APOLLO:
        return build_apollo(model, cfg, adam)
    if cfg.name in MATRIX_PEERS:  # the plain group's AdamW keys, set here: the hybrid has no defaults
        groups = param_groups(model, matrix_group=matrices)
        return HybridOptimizer([g if "matrix_method" in g else {**g, **adam} for g in groups])
    if choices is None and cfg.state_bits == 8:  # no projected group: bitsandbytes' 8-bit AdamW on every weight
        return optimizer_class(param_groups(model, matrix_group=matrices), **adam, state_bits=8)
    if choices is None:
        # AdamW keeps extra group keys such as `names` untouched.
        return torch.optim.AdamW(param_groups(model, matrix_group=matrices), **adam)
    require_rank(cfg.name, cfg.rank, cfg.update_interval)
    groups = param_groups(model, rank=cfg.rank, update_interval=cfg.update_interval, scale=cfg.scale,
                          matrix_group=matrices, **cfg.group_options())
    return optimizer_class(groups, **adam, state_bits=cfg.state_bits)


def build_apollo(model: nn.Module, cfg: OptimConfig, adam: dict) -> torch.optim.Optimizer:
    """apollo-torch's APOLLOAdamW with the matrices in its projected group (APOLLO's README settings)."""
    require_rank(cfg.name, cfg.rank, cfg.update_interval)
    try:
        from apollo_torch import APOLLOAdamW
    except ImportError:
        raise ValueError(APOLLO_HINT.format(name=cfg.name)) from None
    settings = {"rank": cfg.rank, "update_proj_gap": cfg.update_interval or 200, "proj_type": "std",
                **APOLLO[cfg.name]}
    groups = param_groups(model, matrix_group={"lr": cfg.lr * cfg.matrix_lr_ratio, **settings})
    return APOLLOAdamW(groups, **adam)
