"""`fsdp`: torch FSDP2 (`fully_shard`): every weight, its gradient and its optimizer state sharded by
rows (DTensor Shard(0)) over the ranks; each transformer block all-gathers its weights for forward
and backward and reduce-scatters (averages) its gradients. With gradient accumulation only the
last micro-batch reduce-scatters (`set_requires_gradient_sync`): the earlier ones sum into the
unsharded gradients, as DDP's no_sync(), so the step sees the same mean gradient as `replicate`.

adamw steps the DTensor shards directly (torch.optim.AdamW); 8-bit state and the low-rank presets
use the row-shard optimizer of optim/sharding/fsdp.py (right-side bases). Checkpoints go through
torch.distributed.checkpoint (pretrain/dcp_state.py): each rank writes its shards, and a resume
reshards them to any world size. FSDP2 needs a process group even with one process.
"""
from __future__ import annotations

import torch

from pretrain.config import ConfigError
from pretrain.strategies.base import Strategy


class FSDP(Strategy):
    name = "fsdp"
    needs_group_alone = True
    per_layer_refusal = "before FSDP2 has reduce-scattered its gradient"

    @classmethod
    def validate(cls, cfg, world_size: int) -> None:
        """What FSDP2's row shards (Shard(0)) cannot run."""
        from optim.factory import MATRIX_PEERS, PRESETS
        from optim.sharding.fsdp import check_row_local_projection

        super().validate(cfg, world_size)
        if cfg.optim.name in MATRIX_PEERS:
            raise ConfigError(f"optim.name {cfg.optim.name!r} under train.parallelism fsdp: {cfg.optim.name} "
                              "needs each matrix whole (Muon orthogonalizes the whole update, Adafactor's column "
                              "statistics span every row), and FSDP2 keeps row shards; choose train.parallelism zero "
                              "(whole-matrix ownership) or replicate")
        if PRESETS[cfg.optim.name] is not None:
            try:
                check_row_local_projection(cfg.optim.proj_type)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if cfg.train.replica_check_every:
            raise ConfigError("train.replica_check_every compares full weight replicas, but under train.parallelism "
                              "fsdp each rank holds its own shards; set train.replica_check_every=0")

    def parallelize(self, model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        # bf16 compute as pretrain.train.autocast_context resolves train.dtype; on CPU float32, no policy
        if self.dist.device.type == "cuda" and self.cfg.train.dtype in ("auto", "bfloat16"):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers:  # one all-gather / reduce-scatter unit per block, then the rest at the root
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def build_optimizer(self, model):
        from optim.sharding.fsdp import build_fsdp_optimizer

        return build_fsdp_optimizer(model, self.cfg.optim)  # torch AdamW for adamw, else the row-shard optimizer

    def accumulating(self, last: bool):
        self.model.set_requires_gradient_sync(last)  # reduce-scatter the accumulated sum once, at the last
        return super().accumulating(last)

    def step(self, max_norm: float) -> torch.Tensor:
        self.moved = True
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # over the sharded grads
        from torch.distributed.tensor import DTensor  # here, not at import: it costs a second to load

        if isinstance(grad_norm, DTensor):  # the norm over the shards: the global one, on every rank
            grad_norm = grad_norm.full_tensor()
        with self.guard.gated(grad_norm, self.optimizer) as go:  # the same verdict on every rank
            if go:
                self.optimizer.step()
        return grad_norm

    def checkpoint_io(self):
        from pretrain.dcp_state import DCPState

        return DCPState(self.model, self.optimizer)

    def describe(self) -> str:
        return (f"fsdp: torch FSDP2 over {self.dist.world_size} rank(s), weights, gradients and optimizer state "
                f"sharded by rows ({type(self.optimizer).__name__})")
