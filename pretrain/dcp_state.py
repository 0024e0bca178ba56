"""Model and optimizer state through torch.distributed.checkpoint (DCP), for train.parallelism fsdp.

A checkpoint's `dcp/` holds {"model": ..., "optim": ...} as torch's get_state_dict gives them
(names are the plain model's: fully_shard keeps them). Saving and loading are collective: each
rank writes its own row shards, and a load reshards them to the ranks it runs on, at any world
size. `load_full` reads entries back as whole tensors in one process, without a process group
(export, tests).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

METADATA = ".metadata"  # written last by dcp.save: its presence marks a DCP directory


def is_dcp_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


class DCPState:
    """The `state` a CheckpointManager saves and loads for a sharded (FSDP2) model and its optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def _state(self) -> dict:
        # get_state_dict initialises an empty optimizer state with a zero-gradient step at lr 0 (torch's
        # _init_optim_state), so a fresh optimizer can be the template of a load. Only torch's AdamW takes
        # it: SubTrackAdamW creates its state at construction, and a subspace method must never see a
        # zero gradient as a real one (it would compute a basis from it).
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save_state(self, directory: str | os.PathLike) -> None:
        """Collective: every rank writes its shards into `directory`. A failed write on any rank raises
        torch's CheckpointException on every rank."""
        dcp.save(self._state(), checkpoint_id=str(directory))

    def load_state(self, directory: str | os.PathLike) -> None:
        """Collective: the shards this rank holds now, read from wherever they were saved."""
        state = self._state()
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full(directory: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor entry of DCP `directory` whose flattened name starts with `prefix`, as a whole
    CPU tensor keyed by the rest of its name ("model.lm_head.weight" -> "lm_head.weight"). One
    process, no process group: the template is built from the checkpoint's own metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    template = {name: torch.empty(md.size, dtype=md.properties.dtype)
                for name, md in metadata.state_dict_metadata.items()
                if name.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not template:
        raise ValueError(f"{directory} holds no tensor named {prefix}*")
    with warnings.catch_warnings():  # torch warns that it assumes one process, which is what no_dist asks
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(template, checkpoint_id=str(directory), no_dist=True)
    return {name[len(prefix):]: tensor for name, tensor in template.items()}
