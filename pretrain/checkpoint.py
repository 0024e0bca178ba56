"""Checkpoints: written atomically, the last K kept, loaded with `torch.load(weights_only=True)`.

Layout (docs/architecture.md):

    <root>/step_00000100/
        model.pt            model state dict
        model_config.json   LlamaConfig fields
        optimizer/rank00000.pt      one process: the optimizer's state_dict (index-keyed, as torch's)
        optimizer/rank<NNNNN>.pt    sharded (optim.sharded.ShardedOptimizer): one shard per rank, keyed by
        optimizer/index.json        parameter name, and the index (world size, owner of each name)
        trainer.pt          step, scheduler, per-rank data loader states, RNG states
        config.yaml         the full resolved run config

Everything is written into `<root>/.tmp-step_00000100/` (`staging_dir`) and renamed into place only
when complete, so a crash mid-save leaves the previous checkpoint as the latest one. With a
sharded optimizer every rank first writes its shard into the staging directory's `optimizer/`,
then rank 0 writes the rest and renames. `load_optimizer` reads either format into either kind
of optimizer, so a run resumes at another world size.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
OPTIMIZER_INDEX = "index.json"  # written by optim.sharded.ShardedOptimizer.save_sharded


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def staging_dir(root: str | os.PathLike, step: int) -> Path:
    """Where checkpoint `step` is assembled before the rename (the same path on every rank)."""
    return Path(root) / f"{TMP_PREFIX}{step_dir_name(step)}"


def prepare_staging(root: str | os.PathLike, step: int) -> Path:
    """An empty staging directory for `step` (a leftover of a crashed save is removed). Rank 0 only."""
    tmp = staging_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "optimizer").mkdir(parents=True)
    return tmp


def save_checkpoint(root: str | os.PathLike, step: int, *, model_state: dict, model_config: dict,
                    optimizer_state: dict | None, trainer_state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete all but the newest `keep_last`.

    optimizer_state: a state_dict, written as optimizer/rank00000.pt; or None when the ranks
    already wrote their shards into `staging_dir(root, step)/optimizer` (after `prepare_staging`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if optimizer_state is None:
        tmp = staging_dir(root, step)
        if not (tmp / "optimizer" / OPTIMIZER_INDEX).is_file():
            raise FileNotFoundError(f"{tmp / 'optimizer'} holds no sharded optimizer state ({OPTIMIZER_INDEX}); "
                                    "call optimizer.save_sharded there on every rank first, or pass optimizer_state")
    else:
        tmp = prepare_staging(root, step)
        torch.save(optimizer_state, tmp / "optimizer" / "rank00000.pt")
    torch.save(model_state, tmp / "model.pt")
    (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again: move the old one aside first, delete it after
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    # Flush the files and the directory entry so the rename is not seen before the data.
    for child in [*path.rglob("*"), path]:
        try:
            fd = os.open(child, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", with_optimizer: bool = True) -> dict:
    """{"model", "model_config", "optimizer", "trainer", "config_yaml"} of checkpoint directory `path`.

    "optimizer" is optimizer/rank00000.pt: the whole state of a one-process run, rank 0's shard of a
    sharded one (`load_optimizer` reads every format); left out when `with_optimizer` is False.
    """
    path = Path(path)
    missing = [n for n in ("model.pt", "model_config.json", "optimizer/rank00000.pt", "trainer.pt", "config.yaml")
               if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing}")

    def load(name):
        return torch.load(path / name, map_location=map_location, weights_only=True)

    out = {"model": load("model.pt"), "model_config": json.loads((path / "model_config.json").read_text()),
           "trainer": load("trainer.pt"), "config_yaml": (path / "config.yaml").read_text()}
    if with_optimizer:
        out["optimizer"] = load("optimizer/rank00000.pt")
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike, map_location="cpu") -> str:
    """Load checkpoint `path`'s optimizer state into `optimizer`, whichever format it was saved in.

    sharded -> sharded: `optimizer.load_sharded` (each rank reads the shards holding what it owns
    now, at any world size); sharded -> one process: the shards merged by parameter name; one
    process -> sharded: the index-keyed state renamed by the groups' `names`. Returns what was
    done, for the log.
    """
    directory = Path(path) / "optimizer"
    sharded_checkpoint = (directory / OPTIMIZER_INDEX).is_file()
    sharded_optimizer = hasattr(optimizer, "load_sharded")
    if sharded_checkpoint and sharded_optimizer:
        optimizer.load_sharded(str(directory))
        return "sharded state, each rank its own parameters"
    if sharded_checkpoint:
        index = json.loads((directory / OPTIMIZER_INDEX).read_text())
        shards = [torch.load(directory / f, map_location=map_location, weights_only=True) for f in index["files"]]
        by_name = {name: s for shard in shards for name, s in shard["state"].items()}
        optimizer.load_state_dict(_index_keyed(optimizer, by_name, shards[0]["param_groups"]))
        return f"{len(shards)} shard(s) merged by parameter name"
    plain = torch.load(directory / "rank00000.pt", map_location=map_location, weights_only=True)
    if sharded_optimizer:
        names = [n for g in optimizer.param_groups for n in g["names"]]
        if any(i >= len(names) for i in plain["state"]):
            raise ValueError(f"{directory / 'rank00000.pt'} holds state for {len(plain['state'])} parameters, "
                                 f"the model has {len(names)}; was it saved from a different model?")
        hyper = [{k: v for k, v in g.items() if k not in ("params", "names", "param_names")}
                 for g in plain["param_groups"]]
        optimizer.load_state_dict({"state": {names[i]: s for i, s in plain["state"].items()}, "param_groups": hyper})
        return "one full optimizer state, split by parameter name"
    optimizer.load_state_dict(plain)
    return "one full optimizer state"


def _index_keyed(optimizer: torch.optim.Optimizer, by_name: dict, saved_groups: list[dict]) -> dict:
    """A torch state_dict for `optimizer` (groups carry `names`) from state keyed by parameter name."""
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} optimizer param groups, this optimizer "
                         f"{len(optimizer.param_groups)}; resume with the same optim: config")
    state, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, saved_groups):
        if "names" not in group:
            raise ValueError("the optimizer's param groups carry no 'names'; build it with optim.build_optimizer")
        ids = []
        for name in group["names"]:
            if name in by_name:
                state[index] = by_name[name]
            ids.append(index)
            index += 1
        groups.append(dict(saved, params=ids, names=list(group["names"])))
    return {"state": state, "param_groups": groups}


def resolve_resume(resume: str | None, root: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: None (fresh), "auto" (latest complete under root, None if none), or a path."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    return Path(resume)


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain lists/tensors (weights_only loadable)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
