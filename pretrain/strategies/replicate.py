"""`replicate`: torch DistributedDataParallel around the model, the full optimizer on every rank.

DDP buckets the gradients and overlaps their all-reduce (mean over ranks) with backward; with
gradient accumulation the micro-batches before the last run under `no_sync()`, so one all-reduce
per step averages the accumulated sums. Every rank then clips by the same norm and steps the same
optimizer on the same gradients, so the replicas stay bit-identical."""
from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from pretrain.strategies.base import Strategy


class Replicate(Strategy):
    name = "replicate"
    alone_runs_single = True

    def build_optimizer(self, model):
        from optim.factory import build_optimizer

        return build_optimizer(model, self.cfg.optim)

    def bind(self, model, optimizer):
        super().bind(model, optimizer)
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        return self.ddp

    def accumulating(self, last: bool):
        return super().accumulating(last) if last else self.ddp.no_sync()

    def describe(self) -> str:
        return f"replicate: torch DDP over {self.dist.world_size} ranks, the full optimizer on every rank"
