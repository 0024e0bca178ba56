"""Optimizer state keyed by parameter NAME, so it loads at any world size and into any optimizer.

torch keys state by position (0, 1, ... over the groups' params); a shard holds only the
tensors its rank owns, so on disk state is keyed by name instead. `name_keyed_state_dict` and
`index_keyed_state_dict` convert between the two; `save_shards` / `load_shards` write and read
the per-rank files and `index.json` of a checkpoint's optimizer/ directory.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

NOT_HYPER = ("params", "names", "param_names")  # group keys that are not hyper-parameters
INDEX_FILE = "index.json"


def shard_file(rank: int) -> str:
    """The file of rank `rank`'s shard in a checkpoint's optimizer/ directory."""
    return f"rank{rank:05d}.pt"


def param_group_names(optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The parameter names of each param group (optim.build_optimizer's groups carry `names`)."""
    if any("names" not in g for g in optimizer.param_groups):
        raise ValueError("the optimizer's param groups carry no 'names'; build it with optim.build_optimizer")
    return [list(g["names"]) for g in optimizer.param_groups]


def name_keyed_state_dict(state_dict: dict, names: list[list[str]]) -> dict:
    """torch's index-keyed `state_dict` with its state keyed by parameter name instead (`names`:
    per group, in params order) and its groups reduced to their hyper-parameters."""
    index_to_name = [n for group in names for n in group]
    return {"state": {index_to_name[i]: s for i, s in state_dict["state"].items()},
            "param_groups": [{k: v for k, v in g.items() if k not in NOT_HYPER} for g in state_dict["param_groups"]]}


def index_keyed_state_dict(names: list[list[str]], by_name: dict, saved_groups: list[dict]) -> dict:
    """A torch state_dict for an optimizer whose groups hold the parameters `names` (per group,
    in params order), from state keyed by parameter name (`by_name`: any superset or subset;
    names it lacks get no state) and the saved groups' hyper-parameters. Groups carry `names`."""
    if len(saved_groups) != len(names):
        raise ValueError(f"the checkpoint has {len(saved_groups)} optimizer param groups, this optimizer "
                         f"{len(names)}; build it with the same optim: config")
    state, groups, index = {}, [], 0
    for group_names, saved in zip(names, saved_groups):
        ids = []
        for name in group_names:
            if name in by_name:
                state[index] = by_name[name]
            ids.append(index)
            index += 1
        groups.append(dict(saved, params=ids, names=list(group_names)))
    return {"state": state, "param_groups": groups}


def save_shards(directory: str, shard: dict, rank: int, world_size: int, owners: dict[str, int],
                group=None) -> None:
    """Every rank writes its `shard` as `shard_file(rank)`; rank 0 writes `index.json` (world size,
    owner of each name, files). Collective: returns once all shards are on disk."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, shard_file(rank)), "wb") as f:  # a full disk: OSError(ENOSPC), not RuntimeError
        torch.save(shard, f)
    if rank == 0:
        index = {"world_size": world_size, "owners": owners, "files": [shard_file(r) for r in range(world_size)]}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=1)
    if world_size > 1:
        dist.barrier(group=group)


def load_shards(directory: str, owned: list[str], device) -> dict:
    """The name-keyed state of the `owned` names from the shards `save_shards` wrote at ANY world
    size, reading only the shard files that hold them, with the groups' hyper-parameters."""
    index_path = os.path.join(directory, INDEX_FILE)
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{index_path} not found: not a sharded optimizer checkpoint")
    with open(index_path) as f:
        index = json.load(f)
    unknown = [n for n in owned if n not in index["owners"]]
    if unknown:
        raise ValueError(f"{index_path} has no owner for {unknown[:5]}; was it saved from a different model?")
    ranks = sorted({index["owners"][n] for n in owned}) or [0]
    merged, wanted = {"state": {}, "param_groups": None}, set(owned)
    for r in ranks:
        shard = torch.load(os.path.join(directory, index["files"][r]), map_location=device, weights_only=True)
        merged["state"].update({n: s for n, s in shard["state"].items() if n in wanted})
        merged["param_groups"] = shard["param_groups"]
    return merged
