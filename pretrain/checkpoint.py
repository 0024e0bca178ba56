"""Checkpoints: written atomically, the last K kept, loaded with `torch.load(weights_only=True)`.

Layout (docs/architecture.md):

    <root>/step_00000100/
        model.pt            model state dict
        model_config.json   LlamaConfig fields
        optimizer/rank00000.pt      one process: the optimizer's state_dict (index-keyed, as torch's)
        optimizer/rank<NNNNN>.pt    sharded (optim.sharded.ShardedOptimizer): one shard per rank, keyed by
        optimizer/index.json        parameter name, and the index (world size, owner of each name)
        dcp/                train.parallelism fsdp, instead of model.pt and optimizer/: model and optimizer
                            state as torch.distributed.checkpoint shards (pretrain/dcp_state.py)
        trainer.pt          step, scheduler, per-rank data loader states, RNG states
        config.yaml         the full resolved run config
        manifest.json       every other file's relative path, size and sha256, written last

Everything is written into `<root>/.tmp-step_00000100/` (`staging_dir`) and renamed into place only
when complete, so a crash mid-save leaves the previous checkpoint as the latest one. The manifest
lets a resume tell a damaged checkpoint (a truncated or lost file) from a good one and fall back
to the newest one that verifies (`CheckpointManager.resolve`). With a sharded optimizer every
rank first writes its shard into the staging directory's `optimizer/`, then rank 0 writes the
rest, the manifest last, and renames; a DCP checkpoint likewise, every rank writing its shards
into `dcp/` first. `load_optimizer` reads either format into either kind of optimizer, so a run
resumes at another world size; DCP reshards itself.

`CheckpointManager` is what the training loop uses: save, keep-last, resume resolution (verified,
with fallback), the settings a resume may change, loading. `locked_run_dir` keeps a second job
off a run directory (an flock on `<run_dir>/.lock`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
from pathlib import Path

import torch
import yaml

from optim.sharding.state import (INDEX_FILE, index_keyed_state_dict, name_keyed_state_dict, param_group_names,
                                  shard_file)
from pretrain.config import ConfigError

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
OPTIMIZER_INDEX = INDEX_FILE  # written by optim.sharded.ShardedOptimizer.save_sharded
MANIFEST = "manifest.json"
REQUIRED = ("model.pt", "trainer.pt")  # what every manifest must list (model.pt: or dcp/.metadata)
DCP_DIR = "dcp"  # train.parallelism fsdp: model and optimizer shards (pretrain/dcp_state.py)
DCP_METADATA = f"{DCP_DIR}/.metadata"  # stands in for model.pt in a DCP checkpoint's manifest


class ResumeError(ConfigError):
    """A resume that cannot go ahead (a damaged checkpoint asked for by path, a setting that cannot change)."""


class RunDirLocked(ConfigError):
    """Another live job holds the run directory."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); the previous one is intact."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | os.PathLike) -> int:
    """The step of checkpoint directory `path` (step_00000100 -> 100)."""
    return int(STEP_DIR.match(Path(path).name).group(1))


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


def prepare_staging(root: str | os.PathLike, step: int, subdir: str = "optimizer") -> Path:
    """An empty staging directory for `step` (a leftover of a crashed save is removed) with an empty
    `subdir`, where the ranks write their shards. Rank 0 only."""
    tmp = staging_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / subdir).mkdir(parents=True)
    return tmp


def save_checkpoint(root: str | os.PathLike, step: int, *, model_state: dict | None, model_config: dict,
                    optimizer_state: dict | None, trainer_state: dict, config_yaml: str,
                    keep_last: int | None) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete all but the newest `keep_last`
    (None: delete nothing yet, the caller prunes later; newer abandoned ones are set aside either way).

    optimizer_state: a state_dict, written as optimizer/rank00000.pt; or None when the ranks
    already wrote their shards into `staging_dir(root, step)/optimizer` (after `prepare_staging`).
    model_state None: the ranks already wrote model and optimizer into `staging_dir(root, step)/dcp`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if optimizer_state is None:
        tmp = staging_dir(root, step)
        written = DCP_METADATA if model_state is None else f"optimizer/{OPTIMIZER_INDEX}"
        if not (tmp / written).is_file():
            raise FileNotFoundError(f"{tmp} holds no {written}; every rank writes its shards there first "
                                    "(optimizer.save_sharded or dcp.save), or pass optimizer_state")
    else:
        tmp = prepare_staging(root, step)
        _write(tmp / "optimizer" / shard_file(0), optimizer_state)
    if model_state is not None:
        _write(tmp / "model.pt", model_state)
    _write(tmp / "model_config.json", json.dumps(model_config, indent=2) + "\n")
    _write(tmp / "trainer.pt", trainer_state)
    _write(tmp / "config.yaml", config_yaml)
    write_manifest(tmp)  # last: it covers every file above and every rank's optimizer shard
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again: move the old one aside first, delete it after
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, step, keep_last)
    return final


def prune(root: Path, step: int, keep_last: int | None, spare: str | os.PathLike | None = None) -> None:
    """Keep the newest `keep_last` checkpoints up to `step`, the one just written among them, and
    `spare` (the divergence guard's newest checkpoint from before the trouble, pretrain/guard.py);
    keep_last None: only set the abandoned ones aside.

    Checkpoints newer than `step` come from a trajectory this run abandoned (it resumed from an
    older checkpoint, or fell back past a damaged one): they are renamed `abandoned-step_*`, kept
    on disk but never picked by `--resume auto`, rather than deleted or resumed from later. (A fresh
    run never meets them: pretrain/rundir.py refuses a used run dir without --resume or --restart.)
    """
    checkpoints = list_checkpoints(root)
    for newer in [c for c in checkpoints if int(STEP_DIR.match(c.name).group(1)) > step]:
        os.replace(newer, newer.with_name(f"abandoned-{newer.name}"))
    current = [c for c in checkpoints if int(STEP_DIR.match(c.name).group(1)) <= step]
    if keep_last is None:
        return
    for old in current[:-keep_last]:
        if spare is None or old.resolve() != Path(spare).resolve():
            shutil.rmtree(old, ignore_errors=True)


def _write(path: Path, obj) -> None:
    """torch.save `obj` (text as is) to `path` through a Python file. Any failure is raised as an
    OSError naming `path`: a full disk may surface as torch's zip writer's RuntimeError ("unexpected
    pos"), which names no file."""
    try:
        with open(path, "w" if isinstance(obj, str) else "wb") as f:
            if isinstance(obj, str):
                f.write(obj)
            else:
                torch.save(obj, f)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    except Exception as e:  # noqa: BLE001 - whatever the writer raised: the caller reports the file
        raise OSError(getattr(e, "errno", None), _describe_write_error(e, path), str(path)) from e


def _describe_write_error(error: BaseException, path: Path) -> str:
    """What went wrong, in a few words: "no space left on device" when the filesystem is full (whatever
    the writer raised for it), else the error's type and first line."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on device"
    try:
        full = shutil.disk_usage(next(p for p in [Path(path), *Path(path).parents] if p.exists())).free < (1 << 20)
    except (OSError, StopIteration):
        full = False
    if full:  # torch's zip writer turns ENOSPC into RuntimeError("... unexpected pos ...")
        return "no space left on device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{error.__class__.__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """`directory`/manifest.json: {"files": {relative path: {"size", "sha256"}}} of every other file."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write(directory / MANIFEST, json.dumps({"version": 1, "files": entries}, indent=1) + "\n")


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None if checkpoint `path` is whole, else what is wrong ("model.pt: size 123 != 4567").

    Sizes and checksums against its manifest. A checkpoint without a manifest (written before
    manifests existed) is verified by reading it (`_readable`).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return _readable(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST}: unreadable ({e.__class__.__name__}: {e})"
    for name in REQUIRED:
        if name not in files and not (name == "model.pt" and DCP_METADATA in files):  # DCP: weights in dcp/
            return f"{name}: not in {MANIFEST}"
    for name, size in sizes.items():  # sizes first: cheap, and they catch truncation
        if not (path / name).is_file():
            return f"{name}: missing"
        if (path / name).stat().st_size != size:
            return f"{name}: size {(path / name).stat().st_size} != {size}"
    for name, entry in files.items():
        if _sha256(path / name) != entry.get("sha256"):
            return f"{name}: sha256 differs from {MANIFEST}"
    return None


def _readable(path: Path) -> str | None:
    """None if every file of checkpoint `path` (one without a manifest) reads back, else what is wrong:
    each .pt through torch.load(weights_only=True) (mmap: the tensors are not read into memory, the
    archive and its records are checked), the JSON and YAML parsed, DCP metadata through the
    restricted unpickler."""
    required = ["trainer.pt", "model_config.json"] + ([DCP_METADATA] if is_dcp_checkpoint(path) else ["model.pt"])
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"{missing[0]}: missing (and no {MANIFEST} to check the rest)"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        try:
            if file.suffix == ".pt":
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            elif file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".yaml":
                yaml.safe_load(file.read_text())
            elif name == DCP_METADATA:
                from pretrain.dcp_state import read_metadata

                read_metadata(file.parent)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file makes its reader raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"{name}: unreadable without {MANIFEST} ({e.__class__.__name__}: {first})"
    return None


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


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """Written by train.parallelism fsdp: model and optimizer as DCP shards in dcp/."""
    return (Path(path) / DCP_METADATA).is_file()


def load_checkpoint(path: str | os.PathLike, map_location="cpu", with_optimizer: bool = True,
                    with_model: bool = True) -> dict:
    """{"model", "model_config", "optimizer", "trainer", "config_yaml"} of checkpoint directory `path`.

    "optimizer" is optimizer/rank00000.pt: the whole state of a one-process run, rank 0's shard of a
    sharded one (`load_optimizer` reads every format); of a DCP checkpoint, the full tensors of the
    optimizer state keyed by flattened name ("state.<param>.exp_avg"). Left out when `with_optimizer`
    is False, "model" when `with_model` is False. A DCP checkpoint's tensors are read whole in this
    one process (no process group needed: `python -m models.hf export` reads them so).
    """
    path = Path(path)
    dcp_checkpoint = is_dcp_checkpoint(path)
    needed = ["model_config.json", "trainer.pt", "config.yaml"]
    if not dcp_checkpoint:
        needed += ["model.pt", "optimizer/rank00000.pt"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing}")

    def load(name):
        if dcp_checkpoint and name != "trainer.pt":
            from pretrain.dcp_state import load_full

            tensors = load_full(path / DCP_DIR, prefix={"model.pt": "model.", "optimizer": "optim."}[name])
            return {k: v.to(map_location) for k, v in tensors.items()}
        return torch.load(path / name, map_location=map_location, weights_only=True)

    out = {"model_config": json.loads((path / "model_config.json").read_text()),
           "trainer": load("trainer.pt"), "config_yaml": (path / "config.yaml").read_text()}
    if with_model:
        out["model"] = load("model.pt")
    if with_optimizer:
        out["optimizer"] = load("optimizer" if dcp_checkpoint else "optimizer/rank00000.pt")
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
        optimizer.load_state_dict(index_keyed_state_dict(param_group_names(optimizer), by_name,
                                                         shards[0]["param_groups"]))
        return f"{len(shards)} shard(s) merged by parameter name"
    plain = torch.load(directory / shard_file(0), map_location=map_location, weights_only=True)
    if sharded_optimizer:
        names = param_group_names(optimizer)
        count = sum(len(g) for g in names)
        if any(i >= count for i in plain["state"]):
            raise ValueError(f"{directory / shard_file(0)} holds state for {len(plain['state'])} parameters, "
                             f"the model has {count}; was it saved from a different model?")
        optimizer.load_state_dict(name_keyed_state_dict(plain, names))
        return "one full optimizer state, split by parameter name"
    optimizer.load_state_dict(plain)
    return "one full optimizer state"


class CheckpointManager:
    """Owns a run's checkpoints (as torchtitan's CheckpointManager): `save` (atomic, with a manifest,
    the last `keep_last` kept), `resolve` (which checkpoint a resume starts from, verified),
    `check_config` (which settings may change on resume) and `load`.

    save and resolve are collective: every rank calls them; rank 0 writes, verifies and renames.
    `state` (train.parallelism fsdp: pretrain.dcp_state.DCPState) saves and loads model and optimizer
    itself, collectively, into the checkpoint's dcp/ (`save_state(dir)`, `load_state(dir)`).
    """

    def __init__(self, root: str | os.PathLike, keep_last: int, *, rank: int = 0, world_size: int = 1,
                 sharded: bool = False, state=None, mode: str = "?", say=print):
        self.root, self.keep_last, self.mode = Path(root), keep_last, mode  # mode: the strategy's name
        self.rank, self.world_size, self.sharded, self.state, self.say = rank, world_size, sharded, state, say

    def _gather(self, obj) -> list:
        from pretrain.distributed import all_gather_objects

        return all_gather_objects(obj, self.world_size)

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ save
    def save(self, step: int, *, model_state: dict, optimizer, trainer_state: dict, model_config: dict,
             config_yaml: str, prune: bool = True) -> Path:
        """Write checkpoint `step`; with `sharded` every rank first writes its optimizer shard.
        prune False: the older ones stay until `prune_to(step)` (the divergence guard confirms it first).

        A failed write (disk full, ...) on any rank removes the staging directory and raises
        CheckpointWriteError on every rank, naming the file; the previous checkpoint stays the latest.
        """
        tmp, failure = staging_dir(self.root, step), None
        if self.state is not None:  # DCP: every rank writes its shards; a failure anywhere raises everywhere
            if self.rank == 0:
                failure = self._attempt(tmp, prepare_staging, self.root, step, DCP_DIR)
            failure = self._gather(failure)[0]  # the staging directory exists before anyone writes into it
            failure = failure or self._attempt(tmp / DCP_DIR, self.state.save_state, tmp / DCP_DIR)
            failure = next((f for f in self._gather(failure) if f), None)
        elif self.sharded:
            if self.rank == 0:
                failure = self._attempt(tmp, prepare_staging, self.root, step)
            self._barrier()  # the staging directory exists before anyone writes into it
            shard = tmp / "optimizer" / shard_file(self.rank)  # the file this rank's save_sharded writes
            failure = failure or self._attempt(shard, optimizer.save_sharded, str(shard.parent))
            if failure is not None:
                self._barrier()  # the barrier that ends save_sharded, which this rank did not reach
            failure = next((f for f in self._gather(failure) if f), None)  # every shard on disk, or none
        if self.rank == 0 and failure is None:
            failure = self._attempt(tmp, save_checkpoint, self.root, step,
                                    model_state=None if self.state is not None else model_state,
                                    model_config=model_config,
                                    optimizer_state=None if self.sharded or self.state else optimizer.state_dict(),
                                    trainer_state=trainer_state, config_yaml=config_yaml,
                                    keep_last=self.keep_last if prune else None)
        if self.rank == 0 and failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        failure = self._gather(failure)[0]  # rank 0's verdict, after its rename
        if failure is not None:
            raise CheckpointWriteError(failure)
        return self.root / step_dir_name(step)

    def prune_to(self, step: int, spare=None) -> None:
        """keep_last after a `save(step, prune=False)`, sparing `spare` (rank 0 deletes; no collective)."""
        if self.rank == 0:
            prune(self.root, step, self.keep_last, spare)

    def _attempt(self, where: Path, write, *args, **kwargs) -> str | None:
        """None if `write` succeeded, else the one-line report of whatever it raised (naming its file,
        else `where`): a save that fails for any reason must leave the previous checkpoint and a clean
        staging directory behind, never a traceback."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            write(*args, **kwargs)
            return None
        except CheckpointException as e:  # DCP: every rank gets every rank's failures; report the first
            rank, (error, _) = min(e.failures.items(), key=lambda item: item[0])
            filename = getattr(error, "filename", None)
            what = f"rank {rank}: " + _describe_write_error(error, Path(filename or where))
        except Exception as e:  # noqa: BLE001 - OSError from _write, or anything else a writer raises
            filename = getattr(e, "filename", None)
            what = _describe_write_error(e, Path(filename or where))
        previous = latest_checkpoint(self.root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return f"checkpoint: {what} while writing {filename or where}; {kept}"

    # ------------------------------------------------------------------ resume
    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None (no resume, or "auto" and no checkpoint yet), the
        newest checkpoint that verifies ("auto": newer damaged ones are named in one warning line),
        or `resume` itself if it verifies (ResumeError otherwise)."""
        if resume is None:
            return None
        found, problem = self._find(resume) if self.rank == 0 else (None, None)  # rank 0 reads the files
        found, problem = self._gather((found, problem))[0]
        if problem is not None:
            raise ResumeError(problem)
        return found

    def _find(self, resume: str) -> tuple[Path | None, str | None]:
        if resume != "auto":
            bad = verify_checkpoint(resume)
            if bad:
                return None, (f"resume: checkpoint {resume} is damaged ({bad}); pass another checkpoint "
                              "directory, or --resume auto for the newest one that verifies")
            return Path(resume), None
        candidates = list_checkpoints(self.root)[::-1]
        if not candidates:
            self.say(f"resume: no complete checkpoint in {self.root}; starting fresh", flush=True)
            return None, None
        damaged = []
        for path in candidates:
            bad = verify_checkpoint(path)
            if bad is None:
                if damaged:
                    self.say(f"resume: checkpoint {'; '.join(damaged)}; using {path}", flush=True)
                return path, None
            damaged.append(f"{path} is damaged ({bad})")
        return None, (f"resume: no checkpoint in {self.root} verifies ({'; '.join(damaged)}); move them "
                      "aside to start fresh, or repair one")

    def check_config(self, path: Path, new_config: dict, new_model_config: dict) -> list[str]:
        """Refuse (ResumeError, before anything is written) a setting that cannot change on resume;
        return one log line per setting that changed and takes effect (`config_changes`)."""
        try:
            saved = yaml.safe_load((path / "config.yaml").read_text())
            saved_model = json.loads((path / "model_config.json").read_text())
            if not isinstance(saved, dict) or not isinstance(saved_model, dict):
                raise ValueError("config.yaml and model_config.json must each hold a mapping")
        except (OSError, ValueError, yaml.YAMLError) as e:  # only a checkpoint without a manifest gets here
            raise ResumeError(f"resume: checkpoint {path} has no readable config ({e.__class__.__name__}: {e}); "
                              "pass another checkpoint directory") from None
        self._check_format(path, saved)
        fixed, changed = config_changes(saved, new_config, saved_model, new_model_config)
        if fixed:
            key, old, new = fixed[0]
            raise ResumeError(f"resume: {key} cannot change on resume (checkpoint {path} has {old!r}, this run "
                              f"{new!r}); set it back to {old!r}, or start a new run in another log.run_dir")
        self._check_data_layout(path, changed, bool((new_config.get("checkpoint") or {}).get("allow_world_size_change")))
        return [f"resume: {key} {old} -> {new} ({note})" for key, old, new, note in changed]

    def _check_data_layout(self, path: Path, changed: list, allowed: bool) -> None:
        """Each rank's data position is saved for the saved world size, micro batch and loader workers:
        at the same world size neither of the other two may change (the loader cannot continue from it);
        another world size is refused unless allowed (then every stream is remapped)."""
        saved = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True).get("world_size", self.world_size)
        if saved == self.world_size:
            for key, old, new, _ in changed:
                if key in ("train.micro_batch_size", "data.num_workers"):
                    raise ResumeError(f"resume: {key} cannot change at the same number of processes (checkpoint {path} "
                                      f"has {old!r}, this run {new!r}): each rank's data position is saved in batches "
                                      f"of that layout; set it back to {old!r}, or start a new run in another "
                                      "log.run_dir")
        elif not allowed:
            raise ResumeError(
                f"resume: checkpoint {path} was written by {saved} rank(s); this run has {self.world_size}. Weights, "
                "optimizer and schedule would load exactly, but each rank's data position cannot: resume with "
                f"{saved} process(es), or set checkpoint.allow_world_size_change=true to continue the data "
                "from a remapped position (data.loader.remap_train_state: a few lines skipped, none read twice)")

    def _check_format(self, path: Path, saved_config: dict) -> None:
        """Only fsdp reads DCP checkpoints (dcp/), and fsdp reads nothing else (ResumeError naming both)."""
        saved_mode = ((saved_config or {}).get("train") or {}).get("parallelism", "?")
        if is_dcp_checkpoint(path) and self.state is None:
            raise ResumeError(f"resume: checkpoint {path} was written by train.parallelism fsdp (DCP shards in "
                              f"{DCP_DIR}/), which this run's parallelism {self.mode} cannot read; resume with "
                              "--set train.parallelism=fsdp")
        if not is_dcp_checkpoint(path) and self.state is not None:
            raise ResumeError(f"resume: checkpoint {path} was written by train.parallelism {saved_mode} (model.pt, "
                              f"optimizer/), and this run's parallelism fsdp reads only DCP checkpoints ({DCP_DIR}/); "
                              f"resume with --set train.parallelism={saved_mode}")

    def load(self, path: Path, *, model, optimizer, scheduler, map_location="cpu") -> tuple[dict, str]:
        """Model, optimizer and schedule state of checkpoint `path` into the given objects; then the
        optimizer's hyper-parameters and the schedule's base lr are set back to the config's (so a
        changed optim.lr or update_interval takes effect; unchanged, they are the saved values).
        Returns (trainer state, how the optimizer state was read)."""
        from pretrain.schedule import rebase

        fresh = [{k: v for k, v in g.items() if k not in ("params", "names", "param_names")}
                 for g in optimizer.param_groups]
        state = load_checkpoint(path, map_location=map_location, with_optimizer=False, with_model=self.state is None)
        self._check_format(path, yaml.safe_load(state["config_yaml"]))
        if self.state is not None:
            self.state.load_state(path / DCP_DIR)  # collective; DCP reshards to this world size
            how = f"DCP shards resharded to {self.world_size} rank(s)"
        else:
            model.load_state_dict(state["model"])
            how = load_optimizer(optimizer, path, map_location=map_location)  # any world size, by parameter name
        scheduler.load_state_dict(state["trainer"]["scheduler"])
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)
        rebase(scheduler, [g["initial_lr"] for g in optimizer.param_groups])
        return state["trainer"], how


# Settings a resume cannot change: they decide the shapes and meaning of the saved tensors (the
# optimizer's state, its basis dtype and side, the accumulated-gradient buffers) or of the saved data
# position (which files, how lines become sequences). The micro batch and loader workers may change
# with the world size (checkpoint.allow_world_size_change); at the same world size the loader itself
# refuses a position saved with another layout.
FIXED_ON_RESUME = ("model.size", "data.tokenizer", "data.source", "data.seq_len", "data.packing", "optim.name",
                   "optim.rank", "optim.state_bits", "optim.basis_dtype", "optim.accumulate", "optim.subspace",
                   "optim.moments", "optim.residual", "optim.proj_type",
                   "optim.matrix_lr_ratio")  # ratio 1 keeps adamw in one group, any other splits it
MODEL_FREE = ("activation_checkpointing", "init_std")  # model fields that change no weight on resume
NOT_COMPARED = ("name", "checkpoint.resume", "log.run_dir")
IGNORED_ON_RESUME = {"train.seed": "ignored: the checkpoint's RNG state continues"}


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def config_changes(saved: dict, new: dict, saved_model: dict, new_model: dict) -> tuple[list, list]:
    """Compare a checkpoint's run config (and resolved model config) with this run's.

    Returns (fixed, changed): fixed = [(key, saved, new)] that cannot change (model shape, tokenizer,
    optimizer method, rank, state bits, subspace/moment/residual rules); changed = [(key, saved,
    new, note)] that may. A key missing on either side (a config from older code) is not compared.
    """
    from optim.factory import PRESET_KEYS, PRESETS

    old, now = _flat(saved or {}), _flat(new)
    for flat in (old, now):  # null = the preset's choice: compare the choices themselves
        for rule in PRESET_KEYS:
            if flat.get(f"optim.{rule}") is None:
                flat[f"optim.{rule}"] = (PRESETS.get(flat.get("optim.name")) or {}).get(rule)
    for key in set(saved_model) & set(new_model) - set(MODEL_FREE):  # the resolved shape, not the spelling
        old[f"model.{key}"], now[f"model.{key}"] = saved_model[key], new_model[key]
    fixed, changed = [], []
    for key in [k for k in now if k in old and k not in NOT_COMPARED and old[k] != now[k]]:
        if key in FIXED_ON_RESUME or (key.startswith("model.") and key[6:] not in MODEL_FREE):
            fixed.append((key, old[key], now[key]))
        else:
            changed.append((key, old[key], now[key], IGNORED_ON_RESUME.get(key, "takes effect")))
    return fixed, changed


def _try_lock(run_dir: Path) -> tuple[int | None, str | None]:
    """(fd, None) with the lock held, or (None, why not): never raises, so the other ranks, waiting
    for rank 0's answer in a collective, always get one."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return None, f"cannot create the lock file {run_dir / '.lock'}: {e.strerror or e}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if not isinstance(e, BlockingIOError):
            return None, f"cannot lock {run_dir / '.lock'}: {e.strerror or e} (does this filesystem support flock?)"
        return None, (f"run dir {run_dir} is in use by {holder}; wait for that job to end, or pass another "
                      "--set log.run_dir=...")
    try:  # who holds it, for the message a second job prints; best effort (the lock is what counts)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    except OSError:
        pass
    return fd, None


@contextlib.contextmanager
def locked_run_dir(run_dir: str | os.PathLike, rank: int = 0, world_size: int = 1):
    """Hold an exclusive `flock` on <run_dir>/.lock (rank 0; the other ranks share its run) for the
    life of the block. The kernel drops it when the process dies, kill -9 included, so a stale
    file never blocks a restart. Collective: every rank raises RunDirLocked if rank 0 could not."""
    from pretrain.distributed import all_gather_objects

    fd, problem = _try_lock(Path(run_dir)) if rank == 0 else (None, None)
    problem = all_gather_objects(problem, world_size)[0]
    if problem is not None:
        raise RunDirLocked(problem)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


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
