"""Parallelism strategies, one class per `train.parallelism` mode (pretrain/strategies/base.py has the
interface):

    single      one process; optim.per_layer steps each weight in its gradient hook
    replicate   torch DDP: gradients all-reduced in buckets during backward, the full optimizer per rank
    zero        optim.sharded.ShardedOptimizer: optimizer state sharded by whole matrices
    deepspeed   the DeepSpeed engine at ZeRO stage 0 around the sharded optimizer (train.deepspeed JSON)
    fsdp        torch FSDP2: weights, gradients and optimizer state sharded by rows; DCP checkpoints

`auto` (TrainConfig.resolve_parallelism) is single with one process, zero with more.
"""
from pretrain.strategies.base import Strategy
from pretrain.strategies.deepspeed_engine import DeepSpeed
from pretrain.strategies.fsdp import FSDP
from pretrain.strategies.replicate import Replicate
from pretrain.strategies.single import Single
from pretrain.strategies.zero import Zero

STRATEGIES = {cls.name: cls for cls in (Single, Replicate, Zero, DeepSpeed, FSDP)}


def build_strategy(cfg, dist) -> Strategy:
    """The strategy `cfg.train.parallelism` resolves to for dist.world_size processes."""
    return STRATEGIES[cfg.train.resolve_parallelism(dist.world_size)](cfg, dist)


__all__ = ["STRATEGIES", "DeepSpeed", "FSDP", "Replicate", "Single", "Strategy", "Zero", "build_strategy"]
