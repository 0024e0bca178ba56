"""Low-rank optimizer family: SubTrack++, GaLore, Fira and SubTrack as configurations of one optimizer.

    from optim import OptimConfig, build_optimizer
    optimizer = build_optimizer(model, OptimConfig(name="subtrack++", rank=128, update_interval=200))

optim.grassmann holds the pure subspace math, optim.subtrack the optimizer, optim.factory the
presets and param groups, optim.quant8 the 8-bit state, optim.per_layer per-layer updates.
"""
from optim.factory import PRESETS, OptimConfig, build_optimizer, param_groups
from optim.per_layer import attach_per_layer_updates, check_per_layer_allowed
from optim.subtrack import SubTrackAdamW

__all__ = ["PRESETS", "OptimConfig", "SubTrackAdamW", "attach_per_layer_updates", "build_optimizer",
           "check_per_layer_allowed", "param_groups"]
