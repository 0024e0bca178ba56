"""The SubTrack++ family on FSDP2's row shards (`train.parallelism: fsdp`; docs/architecture.md, "FSDP2").

`torch.distributed.fsdp.fully_shard` leaves every weight a DTensor sharded by rows (`Shard(0)`): each
process holds rows [a, b) of W and, after backward, of its gradient. With a right-side basis P: (r, n),
kept whole and identical on every process, a step is row-local:

    R = G P^T (rows, r)   the Adam moments of R (rows, r)   phi per row   update N P (rows, n)

and only sums over rows cross processes. `RowShardedSubTrack` is SubTrackAdamW reading each weight's
local rows (`_local`) and summing the partial sums of optim/grassmann.py's generators with one
all-reduce per round for all weights (`_all_reduce`):

    normal step          the norm-growth limiter: every recovered weight's two squared norms, one all-reduce
    subspace update      + two rounds: sum_p G_p^T R_p and R_p^T R_p, then the best-angle scalars;
                         every process then computes the same new P and rotates its own rows of the moments
    first basis / SVD    the whole gradient of that weight, gathered (`_full`), the same SVD on every process

Plain weights (embeddings, norms, the output head) step their local rows: element-wise AdamW, or
bitsandbytes' 8-bit AdamW per local shard. 8-bit moments are quantized blockwise within each local
shard; whether a moment is 8-bit is decided by its whole size, so every process decides alike.

Checkpoints (torch.distributed.checkpoint): `state_dict()` hands the row state (moments, the
accumulated gradient) out as DTensors sharded like the weight, so DCP saves each process's rows and
reshards them to any number of processes; bases, counters and limiter norms are the same on every
process and are saved once. 8-bit moments are handed out dequantized (float32): their blocks belong
to one shard, and another number of processes cuts other shards; `load_state_dict` quantizes them
again within the new local shards (exactly the saved codes when the shards are the same).
"""
from __future__ import annotations

from itertools import chain

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from optim import grassmann as gm
from optim import quant8
from optim.subtrack import SubTrackAdamW

ROW_STATE = ("exp_avg", "exp_avg_sq", "grad_sum")  # state held as the weight's rows (right projection)
SIGNED = {"exp_avg": True, "exp_avg_sq": False}  # the 8-bit map of each moment


def check_row_local_projection(proj_type: str, shape: tuple[int, int] | None = None,
                               name: str = "optim.proj_type") -> None:
    """ValueError unless a weight of `shape` projects on the right under `proj_type` (shape None: every
    weight, i.e. proj_type 'right'): FSDP2 shards weights by rows, and only a right-side basis keeps a
    step row-local (module docstring). `name`: the option, or the weight when a shape is given."""
    if shape is None:
        if proj_type == "right":
            return
        what = f"{name} = {proj_type!r}"
    elif gm.projection_side(tuple(shape), proj_type) == gm.RIGHT:
        return
    else:
        what = f"{name} {tuple(shape)} would be projected on the left with optim.proj_type {proj_type!r}"
    raise ValueError(f"{what} under train.parallelism fsdp: FSDP2 shards weights by rows, and only a right-side "
                     "basis P (r x n) keeps the projection, the moments and recovery row-local; add --set "
                     "optim.proj_type=right (or optim.proj_type: right in the config)")


def _require_row_shards(p: torch.Tensor, name: str) -> None:
    if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
        how = tuple(p.placements) if isinstance(p, DTensor) else "a plain tensor"
        raise ValueError(f"{name} is {how}; RowShardedSubTrack steps FSDP2's row shards (DTensor Shard(0) on a "
                         "1-D mesh): call torch.distributed.fsdp.fully_shard on the model before building it")


class RowShardedSubTrack(SubTrackAdamW):
    """SubTrackAdamW on weights sharded by rows (FSDP2); every projected group must project on the right."""

    def _check_projected_group(self, group: dict) -> None:
        super()._check_projected_group(group)
        names = group.get("names") or [f"parameter {i} of the group" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            check_row_local_projection(group["proj_type"], tuple(p.shape), name)

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        _require_row_shards(p, self._name_of(p, group))
        super()._init_state(p, group)

    # ----------------------------------------------------------------- the hooks of SubTrackAdamW
    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def _all_reduce(self, buffer: torch.Tensor) -> None:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self._process_group())

    def _full(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return self._as_rows(p, local).full_tensor()

    def _process_group(self):
        p = self.param_groups[0]["params"][0]
        return p.device_mesh.get_group()

    @staticmethod
    def _as_rows(p: DTensor, local: torch.Tensor) -> DTensor:
        """`local`: this process's rows of a tensor with p's row split and `local`'s other dimensions."""
        shape = torch.Size((p.shape[0], *local.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)

    # ----------------------------------------------------------------- checkpoints (DCP)
    def state_dict(self) -> dict:
        """torch's state dict with the row state as DTensors (8-bit moments dequantized): see the module doc."""
        out = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, state in list(out["state"].items()):
            p, state = params[index], dict(state)  # a copy: torch's dict holds the live state tensors
            for key in ROW_STATE:
                if key not in state:
                    continue
                value = state[key]
                if key in SIGNED and quant8.is_8bit(state, key):
                    value = quant8.read_moment(state, key, SIGNED[key])
                    del state[key + quant8.ABSMAX_SUFFIX]
                state[key] = self._as_rows(p, value)
            out["state"][index] = state
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Accepts `state_dict()`'s form at any number of processes (DCP resharded the rows): each row
        state back to local rows, 8-bit moments quantized within this process's shard."""
        # saved id (an index, or a name under DCP's get/set_state_dict) -> parameter, by position as torch does
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        param_of = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        states = {}
        for saved_id, saved in state_dict["state"].items():
            state = dict(saved)
            for key in ROW_STATE:
                if isinstance(state.get(key), DTensor):
                    state[key] = state[key].to_local()
                if key in SIGNED and key in state and quant8.is_8bit(self.state[param_of[saved_id]], key):
                    packed = quant8.pack(state[key], SIGNED[key])
                    state[key], state[key + quant8.ABSMAX_SUFFIX] = packed["codes"], packed["absmax"]
            states[saved_id] = state
        super().load_state_dict({**state_dict, "state": states})


def build_fsdp_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg` (optim.factory.OptimConfig) names, over a model already sharded by fully_shard:
    torch's AdamW for adamw (it steps DTensors itself), RowShardedSubTrack for everything else."""
    from optim.factory import build_optimizer

    return build_optimizer(model, cfg, optimizer_class=RowShardedSubTrack)
