"""How a checkpoint holds the model and optimizer state: one object per format, chosen by the strategy.

    PlainState     model.pt + optimizer/rank00000.pt: the whole optimizer's state_dict (index-keyed, as torch's)
    ShardedState   model.pt + optimizer/rank<NNNNN>.pt, one shard per rank keyed by parameter name, and
                   optimizer/index.json (optim.sharded.ShardedOptimizer.save_sharded)
    DCPState       dcp/: model and optimizer as torch.distributed.checkpoint shards (pretrain/dcp_state.py)

Each object answers the same four questions, so pretrain/checkpoint.CheckpointManager saves and loads
without knowing which format it holds:

    subdir                           the staging directory's subdirectory the ranks write into
    write_shards(staging, optimizer) collective: what every rank writes before rank 0 (nothing for PlainState)
    rank0_files(model_state, opt)    {relative path: object} rank 0 writes next to trainer.pt
    reads                            the formats (checkpoint_format) it can load
    load(path, model, optimizer)     collective: the state into the live objects; returns how, for the log
    staged                           the file whose presence shows the ranks' writes are complete (or None)

Plain and sharded checkpoints read into either kind of optimizer (by parameter name), so a run
resumes at another world size; DCP reshards itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from optim.sharding.state import (INDEX_FILE, index_keyed_state_dict, name_keyed_state_dict, param_group_names,
                                  shard_file)

PLAIN, SHARDED, DCP = "plain", "sharded", "dcp"  # what checkpoint_format says a checkpoint directory holds
OPTIMIZER_DIR = "optimizer"
PLAIN_OPTIMIZER = f"{OPTIMIZER_DIR}/{shard_file(0)}"
SHARDED_INDEX = f"{OPTIMIZER_DIR}/{INDEX_FILE}"
DCP_DIR = "dcp"
DCP_METADATA = f"{DCP_DIR}/.metadata"  # written last by dcp.save
FILES = {PLAIN: f"model.pt, {PLAIN_OPTIMIZER}", SHARDED: f"model.pt, {OPTIMIZER_DIR}/ shards",
         DCP: f"DCP shards in {DCP_DIR}/"}  # each format in a few words, for refusals


def checkpoint_format(path: str | os.PathLike) -> str:
    """PLAIN, SHARDED or DCP: which files checkpoint directory `path` holds its state in."""
    path = Path(path)
    if (path / DCP_METADATA).is_file():
        return DCP
    return SHARDED if (path / SHARDED_INDEX).is_file() else PLAIN


class PlainState:
    """The whole optimizer on every rank (single, replicate): rank 0 writes its state_dict in one file."""

    subdir = OPTIMIZER_DIR
    reads = (PLAIN, SHARDED)
    staged = None  # no file the ranks write before rank 0

    def write_shards(self, staging: Path, optimizer) -> None:
        pass

    def rank0_files(self, model_state: dict, optimizer) -> dict:
        return {"model.pt": model_state, PLAIN_OPTIMIZER: optimizer.state_dict()}

    def load(self, path: Path, model, optimizer, map_location="cpu") -> str:
        _load_model(path, model, map_location)
        return self.load_optimizer(path, optimizer, map_location)

    def load_optimizer(self, path: Path, optimizer, map_location="cpu") -> str:
        if checkpoint_format(path) == SHARDED:
            shards = _read_shards(path / OPTIMIZER_DIR, map_location)
            by_name = {name: s for shard in shards for name, s in shard["state"].items()}
            optimizer.load_state_dict(index_keyed_state_dict(param_group_names(optimizer), by_name,
                                                             shards[0]["param_groups"]))
            return f"{len(shards)} shard(s) merged by parameter name"
        optimizer.load_state_dict(torch.load(path / PLAIN_OPTIMIZER, map_location=map_location, weights_only=True))
        return "one full optimizer state"


class ShardedState:
    """optim.sharded.ShardedOptimizer (zero, deepspeed): every rank writes the shard of the matrices it owns."""

    subdir = OPTIMIZER_DIR
    reads = (PLAIN, SHARDED)
    staged = SHARDED_INDEX  # save_sharded's index, written once every shard is on disk

    def write_shards(self, staging: Path, optimizer) -> None:
        try:
            optimizer.save_sharded(str(staging / OPTIMIZER_DIR))
        except BaseException as e:
            if isinstance(e, OSError) and e.filename is None:  # name the file this rank was writing
                e.filename = str(staging / OPTIMIZER_DIR / shard_file(dist.get_rank() if dist.is_initialized() else 0))
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()  # the one that ends save_sharded, which this rank did not reach: no peer hangs
            raise

    def rank0_files(self, model_state: dict, optimizer) -> dict:
        return {"model.pt": model_state}

    def load(self, path: Path, model, optimizer, map_location="cpu") -> str:
        _load_model(path, model, map_location)
        return self.load_optimizer(path, optimizer, map_location)

    def load_optimizer(self, path: Path, optimizer, map_location="cpu") -> str:
        if checkpoint_format(path) == SHARDED:
            optimizer.load_sharded(str(path / OPTIMIZER_DIR))  # each rank the shards holding what it owns now
            return "sharded state, each rank its own parameters"
        plain = torch.load(path / PLAIN_OPTIMIZER, map_location=map_location, weights_only=True)
        names = param_group_names(optimizer)
        count = sum(len(g) for g in names)
        if any(i >= count for i in plain["state"]):
            raise ValueError(f"{path / PLAIN_OPTIMIZER} holds state for {len(plain['state'])} parameters, "
                             f"the model has {count}; was it saved from a different model?")
        optimizer.load_state_dict(name_keyed_state_dict(plain, names))
        return "one full optimizer state, split by parameter name"


def _load_model(path: Path, model, map_location) -> None:
    model.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))


def _read_shards(directory: Path, map_location) -> list[dict]:
    index = json.loads((directory / INDEX_FILE).read_text())
    return [torch.load(directory / f, map_location=map_location, weights_only=True) for f in index["files"]]
