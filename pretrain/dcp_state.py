"""Model and optimizer state through torch.distributed.checkpoint (DCP), for train.parallelism fsdp.

A checkpoint's `dcp/` holds {"model": ..., "optim": ...} as torch's get_state_dict gives them
(names are the plain model's: fully_shard keeps them). Saving and loading are collective: each
rank writes its own row shards, and a load reshards them to the ranks it runs on, at any world
size. `load_full` reads entries back as whole tensors in one process, without a process group
(export, tests).

Nothing read here may run code. DCP's FileSystemReader unpickles `.metadata` with plain pickle, and
its default load planner reads non-tensor entries with torch.load(weights_only=False): a crafted
checkpoint would run whatever it names. So every read goes through `SafeReader`, which unpickles the
metadata allowing only the classes DCP writes there (`METADATA_GLOBALS`, found by listing the globals
of real fsdp checkpoints), and `SafePlanner`, which loads those entries with weights_only=True.
"""
from __future__ import annotations

import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data.errors import UserError
from pretrain.state_io import DCP, DCP_DIR, DCP_METADATA

METADATA = ".metadata"  # written last by dcp.save: its presence marks a DCP directory
_MD = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS = {  # everything torch 2.13's dcp.save pickles into .metadata (besides torch dtypes)
    (_MD, "Metadata"), (_MD, "MetadataIndex"), (_MD, "StorageMeta"), (_MD, "TensorProperties"),
    (_MD, "TensorStorageMetadata"), (_MD, "ChunkStorageMetadata"), (_MD, "BytesStorageMetadata"),
    (_MD, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),  # a layout by name ("torch.strided")
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(UserError):
    """A checkpoint file that would run code (or is no DCP metadata at all) when read."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"checkpoint file {self.path} refers to {module}.{name}, which DCP metadata never "
                               "holds: it was not written by torch.distributed.checkpoint and would run code if "
                               "loaded; it was not loaded (use a checkpoint you wrote yourself)")


def read_metadata(directory: str | os.PathLike) -> Metadata:
    """`directory`/.metadata through the restricted unpickler (UnsafeCheckpoint naming the file otherwise)."""
    path = os.path.join(directory, METADATA)
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpoint:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or garbage bytes: whatever pickle raises
            raise UnsafeCheckpoint(f"checkpoint file {path} is not readable DCP metadata ({e.__class__.__name__}: "
                                   f"{str(e)[:200]}); use another checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"checkpoint file {path} holds a {type(metadata).__name__}, not DCP metadata; "
                               "use another checkpoint")
    return metadata


class SafeReader(FileSystemReader):
    """torch's FileSystemReader, reading `.metadata` with the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:  # what FileSystemReader.read_metadata does after loading
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """torch's DefaultLoadPlanner, loading non-tensor entries (param groups, counters) with weights_only=True."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does, with weights_only=False
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _load(state: dict, directory, **kwargs) -> None:
    read_metadata(directory)  # refused here, in one line: inside dcp.load it would be one rank's wrapped failure
    dcp.load(state, storage_reader=SafeReader(str(directory)), planner=SafePlanner(), **kwargs)


def is_dcp_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


class DCPState:
    """The checkpoint format of a sharded (FSDP2) model and its optimizer (pretrain/state_io.py has the
    other two and the interface): every rank writes its shards into dcp/, rank 0 nothing more."""

    subdir = DCP_DIR
    reads = (DCP,)
    staged = DCP_METADATA

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def _state(self) -> dict:
        # get_state_dict initialises an empty optimizer state with a zero-gradient step at lr 0 (torch's
        # _init_optim_state), so a fresh optimizer can be the template of a load. Only torch's AdamW takes
        # it: SubTrackAdamW creates its state at construction, and a subspace method must never see a
        # zero gradient as a real one (it would compute a basis from it).
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def write_shards(self, staging, optimizer) -> None:
        """Collective: every rank writes its shards into `staging`/dcp. A failed write on any rank raises
        torch's CheckpointException on every rank."""
        dcp.save(self._state(), checkpoint_id=str(os.path.join(staging, DCP_DIR)))

    def rank0_files(self, model_state: dict, optimizer) -> dict:
        return {}  # the weights are in dcp/ too

    def load(self, path, model, optimizer, map_location="cpu") -> str:
        """Collective: the shards this rank holds now, read from wherever they were saved."""
        state = self._state()
        _load(state, os.path.join(path, DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return f"DCP shards resharded to {world} rank(s)"


def load_full(directory: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor entry of DCP `directory` whose flattened name starts with `prefix`, as a whole
    CPU tensor keyed by the rest of its name ("model.lm_head.weight" -> "lm_head.weight"). One
    process, no process group: the template is built from the checkpoint's own metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(directory)
    template = {name: torch.empty(md.size, dtype=md.properties.dtype)
                for name, md in metadata.state_dict_metadata.items()
                if name.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not template:
        raise ValueError(f"{directory} holds no tensor named {prefix}*")
    with warnings.catch_warnings():  # torch warns that it assumes one process, which is what no_dist asks
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load(template, directory, no_dist=True)
    return {name[len(prefix):]: tensor for name, tensor in template.items()}
