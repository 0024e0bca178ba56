"""`zero`: optim.sharded.ShardedOptimizer, state sharded by whole matrices. It reduce-scatters the
gradients, clips by the true global norm, each rank steps the matrices it owns and all-gathers
the weights; the checkpoint holds one optimizer shard per rank plus an index."""
from __future__ import annotations

from pretrain.strategies.base import Strategy


class Zero(Strategy):
    name = "zero"
    alone_runs_single = True

    def build_optimizer(self, model):
        from optim.sharded import build_sharded_optimizer

        return build_sharded_optimizer(model, self.cfg.optim, reduce_gradients=True)

    def step(self, max_norm: float):
        self.moved = True
        grad_norm = self.optimizer.clip_grad_norm_(max_norm)  # reduce-scatter, then the true global norm
        self.optimizer.step()  # each rank its own matrices, then all-gather the weights
        return grad_norm

    def checkpoint_io(self):
        from pretrain.state_io import ShardedState

        return ShardedState()

    def describe(self) -> str:
        return (f"zero: optimizer state sharded by whole matrices over {self.dist.world_size} ranks "
                "(reduce-scatter gradients, all-gather weights)")
