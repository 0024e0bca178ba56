"""Low-rank optimizer family: SubTrack++, GaLore, Fira and SubTrack as configurations of one optimizer.

    from optim import OptimConfig, build_optimizer
    optimizer = build_optimizer(model, OptimConfig(name="subtrack++", rank=128))

optim.grassmann holds the pure subspace math, optim.subtrack the optimizer, optim.factory the
presets and param groups.
"""
from optim.factory import PRESETS, OptimConfig, build_optimizer, param_groups
from optim.subtrack import SubTrackAdamW

__all__ = ["PRESETS", "OptimConfig", "SubTrackAdamW", "build_optimizer", "param_groups"]
