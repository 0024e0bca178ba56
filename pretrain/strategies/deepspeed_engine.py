"""`deepspeed`: the DeepSpeed engine at ZeRO stage 0 (train.deepspeed, --deepspeed DS.json) around
the sharded optimizer built with reduce_gradients=False: the engine averages the gradients over
ranks at the accumulation boundary and calls the optimizer, which clips by the true global norm
and steps (pretrain/ds_engine.py). The engine steps inside backward; its checkpoint is the
sharded optimizer's (one shard per rank plus an index)."""
from __future__ import annotations

from pathlib import Path

from pretrain.config import ConfigError
from pretrain.strategies.base import Strategy


class DeepSpeed(Strategy):
    name = "deepspeed"
    per_layer_refusal = "which the DeepSpeed engine does not allow (drop --deepspeed)"

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        if cfg.train.deepspeed is None:
            raise ConfigError("train.parallelism = deepspeed needs the engine's JSON: set train.deepspeed "
                              "(--deepspeed configs/deepspeed/zero0.json)")
        if not Path(cfg.train.deepspeed).is_file():
            raise ConfigError(f"train.deepspeed = {cfg.train.deepspeed!r} is not a file; pass a DeepSpeed JSON such "
                              "as configs/deepspeed/zero0.json (or drop --deepspeed)")
        super().validate(cfg, world_size)

    def build_optimizer(self, model):
        from optim.sharded import build_sharded_optimizer

        return build_sharded_optimizer(model, self.cfg.optim, reduce_gradients=False)

    def bind(self, model, optimizer):
        from pretrain import ds_engine

        super().bind(model, optimizer)
        tc = self.cfg.train
        self.engine = ds_engine.initialize(model, optimizer, tc.deepspeed, micro_batch_size=tc.micro_batch_size,
                                           grad_accum_steps=tc.grad_accum_steps(self.dist.world_size),
                                           gradient_clipping=tc.grad_clip,
                                           tensorboard_dir=str(self.cfg.run_dir / "deepspeed"))
        return self.engine  # its forward runs the model (and DeepSpeed's hooks)

    def backward(self, loss):
        self.moved = True
        accum = self.cfg.train.grad_accum_steps(self.dist.world_size)
        self.engine.backward(loss * accum)  # the engine divides by the accumulation steps itself
        self.engine.step()  # averages over ranks, then clips and steps at the accumulation boundary only

    def step(self, max_norm: float):
        return self.engine.get_global_grad_norm()  # measured by the sharded optimizer in engine.step()

    def checkpoint_io(self):
        from pretrain.state_io import ShardedState

        return ShardedState()

    def describe(self) -> str:
        return f"deepspeed: engine at ZeRO stage 0 ({self.cfg.train.deepspeed}) around the sharded optimizer"
