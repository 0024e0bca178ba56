"""The options of a projected param group, declared once: name, default, allowed values, doc.

`optim.factory.OptimConfig` takes its fields' defaults and checks from here, `param_groups` its
defaults, and `optim.subtrack.SubTrackAdamW` the defaults it fills into a projected group and
the checks it runs on it. Keys are param-group keys (galore-torch's `rank`, `update_proj_gap`,
`scale`, `proj_type` where it has one); `config` is the `optim:` field when it differs
(`update_interval`) or None when the run config has no such field.

    check(option("scale"), 0.0, "optim.scale")   # ValueError: optim.scale 0.0 must be positive
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_UNSET = object()


@dataclass(frozen=True)
class Option:
    """One option: `choices` (a fixed set) or `bound` (a predicate) says which values are allowed,
    `must` how an error says it; `nullable`: None is allowed in a group; `config_null`: what
    null means in the run config's `optim:` section (its default there is then None)."""

    key: str
    default: Any
    doc: str
    choices: tuple | None = None
    bound: Callable[[Any], bool] | None = None
    must: str = ""
    nullable: bool = False
    config: str | None | object = _UNSET
    config_null: str | None = None

    @property
    def field(self) -> str | None:
        """The `optim:` field that holds this option (None: the run config does not set it)."""
        return self.key if self.config is _UNSET else self.config

    @property
    def config_default(self) -> Any:
        """The default of the `optim:` field: None when null has a meaning there, else the group's."""
        return None if self.config_null else self.default

    def allows(self, value) -> bool:
        if value is None and self.nullable:
            return True
        if self.choices is not None:
            return value in self.choices
        try:
            return bool(self.bound(value))
        except (TypeError, ValueError):
            return False


def _positive_int(v) -> bool:
    return not isinstance(v, (bool, str)) and int(v) == v and v >= 1


def _positive(v) -> bool:
    return not isinstance(v, (bool, str)) and v > 0


def _is_bool(v) -> bool:
    return isinstance(v, bool)


SUBSPACE_RULES = ("grassmann", "svd")
MOMENT_RULES = ("rotate", "keep", "reset")
RESIDUAL_RULES = ("recover", "drop")
BASIS_DTYPES = ("float32", "bfloat16")
PROJ_TYPES = ("std", "reverse_std", "left", "right")

PROJECTED: tuple[Option, ...] = (
    Option("rank", None, "r: columns of S (m, r) / rows of P (r, n); the key that makes a group projected; "
           "1 <= r <= min(m, n) of every weight (check_rank)",
           bound=_positive_int, must="must be a positive integer", config_null="the paper's value"),
    Option("update_proj_gap", 200, "k: steps between subspace updates",
           bound=_positive_int, must="must be a positive integer", config="update_interval",
           config_null="the paper's value"),
    Option("scale", 0.25, "factor on the back-projected update S N",
           bound=_positive, must="must be positive"),
    Option("proj_type", "std", "galore-torch's side rule: std projects on the shorter side; right (a basis "
           "P (r, n) on every weight) is what train.parallelism fsdp needs (row-sharded weights)",
           choices=PROJ_TYPES, must=f"is not supported; use {', '.join(map(repr, PROJ_TYPES[:-1]))} or {PROJ_TYPES[-1]!r}"),
    Option("subspace", "grassmann", "how S moves: SVD once then geodesic steps, or an SVD every k steps",
           choices=SUBSPACE_RULES, config_null="the preset's"),
    Option("moments", "rotate", "what the Adam moments do when S moves",
           choices=MOMENT_RULES, config_null="the preset's"),
    Option("residual", "recover", "G - S S^T G: added back by recovery scaling, or dropped",
           choices=RESIDUAL_RULES, config_null="the preset's"),
    Option("step_size", "auto", "'auto': the closed-form best angle (times auto_damping); or eta: angle "
           "eta * sigma, capped at the best angle (optim.grassmann.capped_angle)",
           bound=lambda v: v == "auto" or _positive(v), must="must be a positive number or 'auto'"),
    Option("geodesic_rank", 1, "tangent directions moved per subspace update (1: the paper's rank-1 step)",
           bound=_positive_int, must="must be a positive integer"),
    Option("auto_damping", 1.0, "factor on the best angle under step_size 'auto'",
           bound=lambda v: not isinstance(v, (bool, str)) and 0 < v <= 1, must="must be in (0, 1]"),
    Option("max_angle", None, "cap on one update's angle (radians); null: none",
           bound=_positive, must="must be positive (radians) or null", nullable=True),
    Option("accumulate", False, "move S with the mean gradient since the last update instead of the current one",
           bound=_is_bool, must="must be true or false"),
    Option("limiter", 1.01, "gamma: largest growth of the recovery term's norm from one step to the next",
           bound=lambda v: not isinstance(v, (bool, str)) and v >= 1, must="must be >= 1 (1.01 in the papers)"),
    Option("recovery_scaled_back", True, "residual G - scale * back(R) as the published code (False: exact)",
           bound=_is_bool, must="must be true or false"),
    Option("scale_recovery", False, "multiply the recovery term by scale too, like the in-subspace update "
           "(False: at the full lr, as the published Fira / SubTrack++ code)",
           bound=_is_bool, must="must be true or false", config_null="the preset's"),
    Option("rotate_compat", False, "the published SubTrack++ V rotation (abs(), extra (1 - beta2))",
           bound=_is_bool, must="must be true or false"),
    Option("basis_dtype", "float32", "storage dtype of S / P (their math stays float32)",
           choices=BASIS_DTYPES),
)

STATE_BITS = Option("state_bits", 32, "32, or 8 for blockwise 8-bit moments (optim/quant8.py)",
                    choices=(32, 8), must="must be 32 or 8")

_BY_KEY = {o.key: o for o in (*PROJECTED, STATE_BITS)}
# What SubTrackAdamW fills into a projected group that lacks a key (`rank` has no default).
PROJECTED_DEFAULTS = {o.key: o.default for o in PROJECTED if o.key != "rank"}


def option(key: str) -> Option:
    return _BY_KEY[key]


def check(opt: Option, value, name: str | None = None, null: str | None = None) -> None:
    """Raise ValueError naming the option (`name`, default its key), the value and what is allowed.

    null: what None means where it is read (the run config's "(or null for the preset's)").
    """
    if (value is None and null) or opt.allows(value):
        return
    must = opt.must or f"is unknown; choose one of {list(opt.choices)}"
    raise ValueError(f"{name or opt.key} {value!r} {must}" + (f" (or null for {null})" if null else ""))


def rank_fits(rank: int, shape) -> bool:
    """The rank bound of a projected weight: 1 <= rank <= min(m, n)."""
    return 1 <= rank <= min(shape)


def check_rank(rank: int, shape, name: str, fix: str) -> None:
    """ValueError naming the weight and `fix` when `rank` does not fit a weight of `shape`."""
    if not rank_fits(rank, shape):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(shape)} for {name} of shape {tuple(shape)}; {fix}")
