"""Matrix-granular ZeRO sharding around any torch optimizer (AdamW, SubTrackAdamW, ...).

A projected matrix cannot be split across ranks (its basis S, moments and geodesic step need
the whole matrix), so optimizer state is partitioned by WHOLE tensors. Every rank

  1. owns a size-balanced set of parameters, chosen from names and shapes only
     (`assign_owners`), so all ranks agree without talking and DeepSpeed's parameter clones
     cannot confuse it;
  2. builds the inner optimizer on the tensors it owns only, and steps it;
  3. all-gathers the updated weights in flat per-owner buffers, so every rank ends each step
     with bit-identical weights (receivers copy the owner's bits).

Gradients either arrive already averaged (DDP, the DeepSpeed engine: `reduce_gradients=False`)
or this wrapper reduce-scatters them itself (`reduce_gradients=True`) from a flat buffer laid
out owner by owner, each owner's segment padded to the longest one, so no tensor crosses a
shard boundary and each rank receives exactly the reduced gradients it owns (ZeRO-2 volume:
reduce-scatter + all-gather = 2x model bytes per step). gloo implements
`reduce_scatter_tensor` in torch 2.13, so it is used directly; the reduction is SUM followed by
our own division by the world size (gloo's AVG is unreliable, pytorch issue 162338).

The optimizer math stays in the inner optimizer; sharding only partitions, reduces, steps and
gathers, in optim/sharding/: `ownership` (assign_owners, state_costs), `buckets` (the flat
buffers and their collectives), `state` (name-keyed state, shard files, and
`index_keyed_state_dict`, which loads name-keyed state into any optimizer whose groups carry
`names`) and `optimizer` (the wrapper). This module is the public face.

Wiring into a training loop:

    opt = ShardedOptimizer(model.named_parameters(), factory, groups, reduce_gradients=True)
    loss.backward()                       # plain model, no DDP
    norm = opt.clip_grad_norm_(max_norm)  # reduce-scatters, then the true global norm
    opt.step(); opt.zero_grad()
"""
from optim.sharding.optimizer import FLATTENED_HINT, ShardedOptimizer, build_sharded_optimizer
from optim.sharding.optimizer import _MetaParams  # noqa: F401 - the tests build meta templates with it
from optim.sharding.ownership import assign_owners, state_costs
from optim.sharding.state import index_keyed_state_dict, name_keyed_state_dict, param_group_names

__all__ = ["FLATTENED_HINT", "ShardedOptimizer", "assign_owners", "build_sharded_optimizer", "index_keyed_state_dict",
           "name_keyed_state_dict", "param_group_names", "state_costs"]
