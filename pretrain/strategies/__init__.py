"""Parallelism strategies, one class per `train.parallelism` mode (pretrain/strategies/base.py has the
interface):

    single      one process; optim.per_layer steps each weight in its gradient hook
    replicate   torch DDP: gradients all-reduced in buckets during backward, the full optimizer per rank
    zero        optim.sharded.ShardedOptimizer: optimizer state sharded by whole matrices
    deepspeed   the DeepSpeed engine at ZeRO stage 0 around the sharded optimizer (train.deepspeed JSON)
    fsdp        torch FSDP2: weights, gradients and optimizer state sharded by rows; DCP checkpoints

Adding a mode is one file with its Strategy subclass plus one entry in STRATEGIES
(docs/architecture.md, "Adding a parallelism mode").
"""
from pretrain.config import ConfigError
from pretrain.strategies.base import Strategy
from pretrain.strategies.deepspeed_engine import DeepSpeed
from pretrain.strategies.fsdp import FSDP
from pretrain.strategies.replicate import Replicate
from pretrain.strategies.single import Single
from pretrain.strategies.zero import Zero

STRATEGIES = {cls.name: cls for cls in (Single, Replicate, Zero, DeepSpeed, FSDP)}
AUTO_ONE, AUTO_MANY = Single, Zero  # what `auto` runs with one process, and with several
SHARDED_OPTIMIZER = {True: Zero, False: Replicate, None: None}  # train.sharded_optimizer, the old spelling


def strategy_class(cfg, world_size: int) -> type[Strategy]:
    """The strategy train.parallelism names for `world_size` processes, with `auto` and the old keys
    (train.sharded_optimizer true/false = zero/replicate, train.deepspeed = deepspeed) resolved.
    With one process a mode whose `alone_runs_single` is set runs `single` (the same math)."""
    t = cfg.train
    chosen = t.parallelism
    if chosen != "auto" and chosen not in STRATEGIES:
        raise ConfigError(f"train.parallelism: {chosen!r} is not one of {['auto', *STRATEGIES]}")
    old, old_key = SHARDED_OPTIMIZER[t.sharded_optimizer], "train.sharded_optimizer"
    if t.deepspeed is not None:
        old, old_key = DeepSpeed, "train.deepspeed"
    if old is not None and chosen not in ("auto", old.name):
        raise ConfigError(f"train.parallelism = {chosen} contradicts the old key {old_key} (= {old.name}); drop the "
                          "old key and set train.parallelism alone")
    cls = old if chosen == "auto" and old is not None else STRATEGIES.get(chosen)
    if cls is None:
        return AUTO_ONE if world_size == 1 else AUTO_MANY
    if world_size == 1 and cls.alone_runs_single:
        return Single
    return cls


def validate(cfg, world_size: int) -> type[Strategy]:
    """The strategy class for `cfg`, after its refusals (ConfigError) passed."""
    cls = strategy_class(cfg, world_size)
    cls.validate(cfg, world_size)
    return cls


def build_strategy(cfg, dist) -> Strategy:
    """The strategy `cfg.train.parallelism` resolves to for dist.world_size processes, validated."""
    return validate(cfg, dist.world_size)(cfg, dist)


__all__ = ["STRATEGIES", "DeepSpeed", "FSDP", "Replicate", "Single", "Strategy", "Zero", "build_strategy",
           "strategy_class", "validate"]
