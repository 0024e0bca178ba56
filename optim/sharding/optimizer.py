"""ShardedOptimizer: each rank steps the inner optimizer on the whole tensors it owns (optim/sharded.py
tells the whole story); build_sharded_optimizer builds it from an optim.factory config."""
import contextlib

import torch
import torch.distributed as dist

from optim.nbytes import tensor_bytes
from optim.sharding.buckets import all_gather_params, plan_buckets, reduce_scatter_grads
from optim.sharding.ownership import assign_owners, state_costs
from optim.sharding.state import (NOT_HYPER, index_keyed_state_dict, load_shards, name_keyed_state_dict,
                                  save_shards)
from optim.stats import SubspaceStats

FLATTENED_HINT = (
    "a matrix optimizer needs each projected weight whole and 2-D. DeepSpeed ZeRO stage >= 1 (and, "
    "on GPUs, its bf16 optimizer wrapper) hands the optimizer flattened 1-D partitions: use ZeRO "
    "stage 0 (configs/deepspeed/zero0.json) with optim.sharded.ShardedOptimizer, which shards the "
    "optimizer state by whole matrices")


class ShardedOptimizer(torch.optim.Optimizer, SubspaceStats):
    """ZeRO-style wrapper: each rank holds optimizer state for the whole tensors it owns.

    Args:
        named_params: the model's `named_parameters()` (frozen ones are skipped).
        optimizer_factory: `groups -> torch.optim.Optimizer`, called once with this rank's
            groups (same hyper-parameters as `param_groups`, params filtered to owned tensors;
            a group may be empty).
        param_groups: torch-style groups over the same parameters; a `names` list per group is
            used when present (as `optim.factory.param_groups` gives). Default: one group.
            Groups with a `rank` key are projected: their weights must stay 2-D.
        reduce_gradients: False when gradients arrive averaged (DDP, DeepSpeed engine); True to
            reduce-scatter them here (then clip with `clip_grad_norm_`, not torch's).
        process_group: the data-parallel group (default: the world).
        bucket_numel: cap on elements per rank per collective (bounds the flat buffers' memory).
        max_grad_norm: when set, `step()` clips by the true global norm first unless
            `clip_grad_norm_` was already called this step (the DeepSpeed path uses this).
        costs: name -> size used to balance ownership (default numel: the least padding in the
            collectives); `build_sharded_optimizer(..., balance="state")` passes state bytes.

    `param_groups` of the wrapper list ALL parameters with the inner optimizer's
    hyper-parameters, so LR schedulers and DeepSpeed see the full model; hyper-parameters are
    copied to the inner optimizer before every step.
    """

    def __init__(self, named_params, optimizer_factory, param_groups=None, *, reduce_gradients=False,
                 process_group=None, bucket_numel=2 ** 25, max_grad_norm=None, costs=None):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self._params = dict(named)
        self._shapes = {n: p.shape for n, p in named}
        name_of = {id(p): n for n, p in named}
        self.process_group = process_group
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.reduce_gradients = reduce_gradients
        self.max_grad_norm = max_grad_norm
        self.step_gate = None  # pretrain.guard.DivergenceGuard, set by the training loop's strategy
        self._clipped = False
        self.comm_bytes = {"reduce_scatter": 0, "all_gather": 0, "all_reduce": 0}
        self._grads_reduced = False

        full_groups = []  # (names, hyper-parameters)
        for g in (param_groups if param_groups is not None else [{"params": [p for _, p in named]}]):
            params = list(g["params"])
            for p in params:
                if id(p) not in name_of:
                    raise ValueError(f"a param group holds a tensor of shape {tuple(p.shape)} that is not "
                                     "among named_params (or is frozen); build groups from the same model")
            names = [name_of[id(p)] for p in params]
            if "names" in g and list(g["names"]) != names:
                raise ValueError(f"param group 'names' {list(g['names'])[:3]}... disagree with its params "
                                 f"{names[:3]}...")
            if names:  # DeepSpeed drops empty groups; never create one
                full_groups.append((names, {k: v for k, v in g.items() if k not in NOT_HYPER}))
        grouped = [n for names, _ in full_groups for n in names]
        if len(set(grouped)) != len(grouped) or set(grouped) != set(self._params):
            raise ValueError("param_groups must hold every trainable parameter exactly once; missing "
                             f"{sorted(set(self._params) - set(grouped))[:5]}")
        self._projected = {n for names, hyper in full_groups if "rank" in hyper for n in names}
        self._check_shapes(self._params)

        self.owners = assign_owners(self._shapes, self.world_size, costs)
        self.owned = [n for n, r in self.owners.items() if r == self.rank]
        inner_groups = [dict(hyper, params=[self._params[n] for n in names if self.owners[n] == self.rank],
                             names=[n for n in names if self.owners[n] == self.rank])
                        for names, hyper in full_groups]
        self.inner = optimizer_factory(inner_groups)
        if len(self.inner.param_groups) != len(inner_groups):
            raise ValueError(f"optimizer_factory built {len(self.inner.param_groups)} param groups from "
                             f"{len(inner_groups)}; it must keep the groups it is given")
        self._inner_names = [[name_of[id(p)] for p in ig["params"]] for ig in self.inner.param_groups]

        wrapper_groups = [dict({k: v for k, v in ig.items() if k not in NOT_HYPER},
                               params=[self._params[n] for n in names], names=names)
                          for (names, _), ig in zip(full_groups, self.inner.param_groups)]
        super().__init__(wrapper_groups, defaults=dict(self.inner.defaults))
        # Pairs by object, not index: DeepSpeed edits `param_groups` in place.
        self._pairs = list(zip(self.param_groups, self.inner.param_groups))
        numels = {n: p.numel() for n, p in self._params.items()}
        dtypes = {n: p.dtype for n, p in self._params.items()}
        self._buckets = plan_buckets(self.owners, numels, dtypes, self.world_size, bucket_numel)
        self._device = named[0][1].device if named else torch.device("cpu")

    # -- checks -------------------------------------------------------------------------------
    def _check_shapes(self, params: dict):
        for name, p in params.items():
            if name in self._projected and p.dim() != 2:
                raise ValueError(f"{name} has shape {tuple(p.shape)} where a projected 2-D weight of shape "
                                 f"{tuple(self._shapes[name])} was configured: {FLATTENED_HINT}")
            if p.shape != self._shapes[name]:
                raise ValueError(f"{name} changed shape from {tuple(self._shapes[name])} to {tuple(p.shape)}: "
                                 f"{FLATTENED_HINT}")

    def bind(self, named_params):
        """Re-point every name at the tensor `named_params` now gives for it (after DeepSpeed or
        another wrapper replaced parameters by clones); state moves with the name."""
        new = {n: p for n, p in named_params if n in self._params}
        missing = sorted(set(self._params) - set(new))
        if missing:
            raise ValueError(f"bind: parameters {missing[:5]} are no longer in the model")
        self._check_shapes(new)
        swap = {id(self._params[n]): new[n] for n in new if new[n] is not self._params[n]}
        if not swap:
            return
        for groups in (self.param_groups, self.inner.param_groups):
            for g in groups:
                g["params"] = [swap.get(id(p), p) for p in g["params"]]
        state = self.inner.state
        for old_id, p in swap.items():
            old = next((q for q in list(state) if id(q) == old_id), None)
            if old is not None:
                state[p] = state.pop(old)
        self._params = {n: new[n] for n in self._params}

    # -- communication ------------------------------------------------------------------------
    def _reduce_scatter_grads(self):
        """Each rank ends with the averaged gradients of the tensors it owns; others are freed."""
        self.comm_bytes["reduce_scatter"] += reduce_scatter_grads(self._buckets, self._params, self.rank,
                                                                  self.world_size, self._device, self.process_group)
        for name in self._params:
            if self.owners[name] != self.rank:
                self._params[name].grad = None
        self._grads_reduced = True

    def _all_gather_params(self):
        """Copy every owner's updated weights to all ranks, one flat buffer per bucket."""
        self.comm_bytes["all_gather"] += all_gather_params(self._buckets, self._params, self.rank, self.world_size,
                                                           self._device, self.process_group)

    def _sync_hyper(self):
        for wg, ig in self._pairs:
            for k, v in wg.items():
                if k not in NOT_HYPER:
                    ig[k] = v

    # -- optimizer API ------------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the true global L2 norm of the (reduced) gradients; returns it before clipping.

        Each rank takes the norms of the gradients it owns, one all-reduce of a vector with one
        slot per parameter (zeros elsewhere, so the sum is exact) gives every rank all of them,
        and the total is taken over them in model order: the same numbers, in the same order, as
        `torch.nn.utils.clip_grad_norm_` in one process.
        """
        if norm_type != 2.0:
            raise ValueError(f"clip_grad_norm_: only the L2 norm is supported, got norm_type={norm_type}")
        if self.reduce_gradients and not self._grads_reduced:
            self._reduce_scatter_grads()
        slot = {n: i for i, n in enumerate(self._params)}
        mine = [n for n in self.owned if self._params[n].grad is not None]
        norms = torch.zeros(len(slot), dtype=torch.float32, device=self._device)
        if mine:
            grads = [self._params[n].grad for n in mine]
            foreach_norm = getattr(torch, "_foreach_norm", None)  # the kernel torch's clipping uses
            local = foreach_norm(grads, 2.0) if foreach_norm else [torch.linalg.vector_norm(g) for g in grads]
            norms[[slot[n] for n in mine]] = torch.stack(local).float()
        if self.world_size > 1:
            dist.all_reduce(norms, op=dist.ReduceOp.SUM, group=self.process_group)
            self.comm_bytes["all_reduce"] += tensor_bytes(norms)
        total = torch.linalg.vector_norm(norms, 2.0)
        torch.nn.utils.clip_grads_with_norm_([self._params[n] for n in mine], max_norm, total)
        self._clipped = True
        # DeepSpeed's engine.get_global_grad_norm() reads this private name of its own optimizers; a client
        # optimizer has no other way to hand the engine the norm it measured
        self._global_grad_norm = total
        return total

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedOptimizer.step does not take a closure (each rank steps only its shard)")
        self._check_shapes(self._params)
        if self.reduce_gradients and not self._grads_reduced:
            self._reduce_scatter_grads()
        if self.max_grad_norm and not self._clipped:
            self.clip_grad_norm_(self.max_grad_norm)
        # pretrain.guard: a step whose loss or norm is not finite moves nothing (the same verdict on every
        # rank: the norm is global); the inner optimizer may take the verdict on the device (found_inf)
        gate = contextlib.nullcontext(True)
        if self.step_gate is not None and self._clipped:  # the norm of this step exists
            gate = self.step_gate.gated(self._global_grad_norm, self.inner)
        with gate as go:
            if go:
                self._sync_hyper()
                self.inner.step()
                self._all_gather_params()
        self._grads_reduced = self._clipped = False

    def zero_grad(self, set_to_none: bool = True):
        for p in self._params.values():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self._grads_reduced = self._clipped = False

    def add_param_group(self, param_group):
        if getattr(self, "_pairs", None) is not None:
            raise NotImplementedError("ShardedOptimizer: parameters are partitioned at construction; "
                                      "build a new optimizer to add parameters")
        super().add_param_group(param_group)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by THIS rank (tensors in the inner optimizer's state)."""
        return tensor_bytes(list(self.inner.state.values()))

    def pop_subspace_stats(self):
        """The inner optimizer's subspace statistics from every rank, merged (None if it has none).

        Collective: every rank must call it. `count` adds up, `*_max` is the max over ranks,
        `*_mean` the count-weighted mean; every rank gets the merged dict.
        """
        if not isinstance(self.inner, SubspaceStats):
            return None
        local = self.inner.pop_subspace_stats()
        if self.world_size == 1:
            return local
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, local, group=self.process_group)
        return _merge_stats(gathered)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard: state keyed by parameter NAME, group hyper-parameters, ownership."""
        self._sync_hyper()  # the wrapper's current values (an LR scheduler has moved lr since the last step)
        return {"rank": self.rank, "world_size": self.world_size, "owned": list(self.owned),
                **name_keyed_state_dict(self.inner.state_dict(), self._inner_names)}

    def load_state_dict(self, state_dict: dict):
        """Load state for the names this rank owns from a shard or from merged shards.

        `state_dict["state"]` may hold any superset of the owned names (a merge of shards saved at
        another world size); group hyper-parameters are taken from it as torch does.
        """
        saved_groups, state = state_dict["param_groups"], state_dict["state"]
        inner = index_keyed_state_dict(self._inner_names, state, saved_groups)
        missing = [n for n in self.owned if n not in state]
        if state and missing:
            raise ValueError(f"checkpoint has no optimizer state for {missing[:5]} (rank {self.rank} owns "
                             "them); was it saved from a different model?")
        self.inner.load_state_dict(inner)
        # torch replaced the inner group dicts (they carry their names): pair the new ones.
        self._pairs = [(wg, ig) for (wg, _), ig in zip(self._pairs, self.inner.param_groups)]
        for (wg, _), saved in zip(self._pairs, saved_groups):
            wg.update({k: v for k, v in saved.items() if k not in NOT_HYPER})

    def save_sharded(self, directory: str):
        """Every rank writes `rank<rank:05d>.pt` (the checkpoint layout's optimizer/ file names);
        rank 0 writes `index.json` (world size, owner of each name, files).
        Collective: returns once all shards are on disk."""
        save_shards(directory, self.state_dict(), self.rank, self.world_size, self.owners, self.process_group)

    def load_sharded(self, directory: str):
        """Load the shards written by `save_sharded` at ANY world size: each rank reads only the
        shard files that hold the names it owns now."""
        self.load_state_dict(load_shards(directory, self.owned, self._device))


class _MetaParams:
    """What `optim.factory` reads from a model (`named_parameters()`), as meta tensors: building
    the optimizer over it costs no memory and yields the exact groups and hyper-parameters."""

    def __init__(self, model):
        self._named = [(n, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                              requires_grad=p.requires_grad))
                       for n, p in model.named_parameters()]

    def named_parameters(self):
        return iter(self._named)

    def parameters(self):
        return (p for _, p in self._named)


def build_sharded_optimizer(model, cfg, balance: str = "numel", **kwargs) -> ShardedOptimizer:
    """`optim.factory.build_optimizer(model, cfg)`, sharded by whole tensors across the ranks.

    The factory runs once on meta tensors to give the groups and their hyper-parameters, then
    each rank builds the same optimizer class over the tensors it owns. kwargs go to
    `ShardedOptimizer` (`reduce_gradients`, `process_group`, `bucket_numel`, `max_grad_norm`).

    balance: "numel" balances parameter elements (the all-gather pads each owner's segment to
    the largest, so this moves the fewest bytes); "state" balances optimizer-state bytes, which
    for SubTrack++ differ from numel (a projected matrix keeps 2 r n + m r numbers, a plain one
    2 m n): at 7b on 8 ranks the largest shard of state falls from 1.24x to 1.00x of 1/N, for
    10% more padding in the collectives.
    """
    from optim.factory import build_optimizer

    template = build_optimizer(_MetaParams(model), cfg)
    params = dict(model.named_parameters())
    groups = [dict(g, params=[params[n] for n in g["names"]]) for g in template.param_groups]
    if balance == "state":
        kwargs["costs"] = state_costs(template)
    elif balance != "numel":
        raise ValueError(f"balance {balance!r} must be 'numel' or 'state'")
    # Each group carries every hyper-parameter, so the class's own defaults never apply.
    return ShardedOptimizer(model.named_parameters(), lambda owned: type(template)(owned), groups, **kwargs)


def _merge_stats(items: list):
    """Merge per-rank stats dicts: `count` and plain numbers add, `*_max` takes the max,
    `*_mean` is the count-weighted mean."""
    items = [x for x in items if x is not None]
    if not items or not isinstance(items[0], dict):
        return items or None
    counts = [float(x.get("count", 0.0)) for x in items]
    total = sum(counts)
    out = {}
    for key in dict.fromkeys(k for x in items for k in x):
        values = [(x[key], c) for x, c in zip(items, counts) if key in x]
        if key.endswith("_max"):
            out[key] = max(v for v, _ in values)
        elif key.endswith("_mean"):
            out[key] = sum(v * c for v, c in values) / total if total else 0.0
        else:
            out[key] = sum(v for v, _ in values)
    return out
