"""`fsdp`: torch FSDP2 (`fully_shard`): every weight, its gradient and its optimizer state sharded by
rows (DTensor Shard(0)) over the ranks; each transformer block all-gathers its weights for forward
and backward and reduce-scatters (averages) its gradients. With gradient accumulation only the
last micro-batch reduce-scatters (`set_requires_gradient_sync`): the earlier ones sum into the
unsharded gradients, as DDP's no_sync(), so the step sees the same mean gradient as `replicate`.

adamw steps the DTensor shards directly (torch.optim.AdamW); 8-bit state and the low-rank presets
use the row-shard optimizer of optim/sharding/fsdp.py (right-side bases, pretrain/config.check_fsdp).
Checkpoints go through torch.distributed.checkpoint (pretrain/dcp_state.py): each rank writes
its shards, and a resume reshards them to any world size.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from pretrain.strategies.base import Strategy


class FSDP(Strategy):
    name = "fsdp"

    def __init__(self, cfg, dist_info):
        super().__init__(cfg, dist_info)
        self._own_group = False
        if not dist.is_initialized():  # one process (not launched distributed): FSDP2 still needs a group
            backend = "nccl" if dist_info.device.type == "cuda" else "gloo"  # as pretrain.distributed.setup
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=cfg.train.collective_timeout_s))
            self._own_group = True

    def build_optimizer(self, model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device, kwargs = self.dist.device, {}
        # bf16 compute as pretrain.train.autocast_context resolves train.dtype; on CPU float32, no policy
        if device.type == "cuda" and self.cfg.train.dtype in ("auto", "bfloat16"):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:  # one all-gather / reduce-scatter unit per block, then the rest at the root
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        from optim.sharding.fsdp import build_fsdp_optimizer

        return build_fsdp_optimizer(model, self.cfg.optim)  # torch AdamW for adamw, else the row-shard optimizer

    def accumulating(self, last: bool):
        self.model.set_requires_gradient_sync(last)  # reduce-scatter the accumulated sum once, at the last
        return super().accumulating(last)

    def step(self, max_norm: float) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # over the sharded grads
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        with self.guard.gated(grad_norm, self.optimizer) as go:  # the same verdict on every rank
            if go:
                self.optimizer.step()
        return grad_norm

    def checkpoint_manager(self, root, keep_last: int, say=print):
        from pretrain.checkpoint import CheckpointManager
        from pretrain.dcp_state import DCPState

        return CheckpointManager(root, keep_last, rank=self.dist.rank, world_size=self.dist.world_size,
                                 state=DCPState(self.model, self.optimizer), mode=self.name, say=say)

    def describe(self) -> str:
        return (f"fsdp: torch FSDP2 over {self.dist.world_size} rank(s), weights, gradients and optimizer state "
                f"sharded by rows ({type(self.optimizer).__name__})")

    def close(self) -> None:
        if self._own_group:
            dist.destroy_process_group()
            self._own_group = False
