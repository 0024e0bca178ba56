"""`deepspeed`: the DeepSpeed engine at ZeRO stage 0 (train.deepspeed, --deepspeed DS.json) around
the sharded optimizer built with reduce_gradients=False: the engine averages the gradients over
ranks at the accumulation boundary and calls the optimizer, which clips by the true global norm
and steps (pretrain/ds_engine.py). The engine steps inside backward; its checkpoint is the
sharded optimizer's (one shard per rank plus an index)."""
from __future__ import annotations

from pretrain.strategies.base import Strategy


class DeepSpeed(Strategy):
    name = "deepspeed"
    sharded_checkpoint = True
    steps_in_backward = True

    def build_optimizer(self, model):
        from optim.sharded import build_sharded_optimizer

        return build_sharded_optimizer(model, self.cfg.optim, reduce_gradients=False)

    def wrap(self, model, optimizer):
        from pretrain import ds_engine

        super().wrap(model, optimizer)
        tc = self.cfg.train
        self.engine = ds_engine.initialize(model, optimizer, tc.deepspeed, micro_batch_size=tc.micro_batch_size,
                                           grad_accum_steps=tc.grad_accum_steps(self.dist.world_size),
                                           gradient_clipping=tc.grad_clip,
                                           tensorboard_dir=str(self.cfg.run_dir / "deepspeed"))
        return self.engine  # its forward runs the model (and DeepSpeed's hooks)

    def backward(self, loss):
        accum = self.cfg.train.grad_accum_steps(self.dist.world_size)
        self.engine.backward(loss * accum)  # the engine divides by the accumulation steps itself
        self.engine.step()  # averages over ranks, then clips and steps at the accumulation boundary only

    def step(self, max_norm: float):
        return self.engine.get_global_grad_norm()  # measured by the sharded optimizer in engine.step()

    def describe(self) -> str:
        return f"deepspeed: engine at ZeRO stage 0 ({self.cfg.train.deepspeed}) around the sharded optimizer"
