"""Checkpoints: written atomically with a manifest, the last K kept, loaded with `torch.load(weights_only=True)`.

Layout (docs/architecture.md):

    <root>/step_00000100/
        model.pt, optimizer/        model and optimizer state, in the format the strategy's state I/O writes
        or dcp/                     (pretrain/state_io.py: one file, whole-matrix shards, or DCP shards)
        model_config.json   LlamaConfig fields
        trainer.pt          step, scheduler, per-rank data loader states, RNG states
        config.yaml         the full resolved run config
        manifest.json       every other file's relative path, size and sha256, written last

Everything is written into `<root>/.tmp-step_00000100/` (`staging_dir`) and renamed into place only
when complete, so a crash mid-save leaves the previous checkpoint as the latest one. The manifest
lets a resume tell a damaged checkpoint (a truncated or lost file) from a good one and fall back
to the newest one that verifies (pretrain/resume.py). When the ranks write shards, every rank
first writes its part into the staging directory, then rank 0 writes the rest, the manifest last,
and renames.

`CheckpointManager` is what the training loop uses: save, keep-last, resume (the policy is
pretrain/resume.py), loading. The run-dir lock is pretrain/rundir.py's, RNG state pretrain/rng.py's.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from pretrain.state_io import DCP, DCP_DIR, DCP_METADATA, PLAIN_OPTIMIZER, checkpoint_format

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
REQUIRED = ("model.pt", "trainer.pt")  # what every manifest must list (model.pt: or dcp/.metadata)


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


def save_checkpoint(root: str | os.PathLike, step: int, *, state_files: dict, model_config: dict,
                    trainer_state: dict, config_yaml: str, keep_last: int | None, staged: str | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete all but the newest `keep_last`
    (None: delete nothing yet, the caller prunes later; newer abandoned ones are set aside either way).

    state_files: {relative path: object} of the model and optimizer state rank 0 writes (a state I/O's
    rank0_files). staged: the file the ranks already wrote into `staging_dir(root, step)` (after
    `prepare_staging`) to mark their shards complete; None: nothing is staged, the directory starts empty.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if staged is not None:
        tmp = staging_dir(root, step)
        if not (tmp / staged).is_file():
            raise FileNotFoundError(f"{tmp} holds no {staged}; every rank writes its shards there first "
                                    "(optimizer.save_sharded or dcp.save)")
    else:
        tmp = prepare_staging(root, step)
    for name, obj in state_files.items():
        _write(tmp / name, obj)
    _write(tmp / "model_config.json", json.dumps(model_config, indent=2) + "\n")
    _write(tmp / "trainer.pt", trainer_state)
    _write(tmp / "config.yaml", config_yaml)
    write_manifest(tmp)  # last: it covers every file above and every rank's shard
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
    """Model and optimizer as DCP shards in dcp/ (pretrain/dcp_state.py)."""
    return checkpoint_format(path) == DCP


def load_checkpoint(path: str | os.PathLike, map_location="cpu", with_optimizer: bool = True,
                    with_model: bool = True) -> dict:
    """{"model", "model_config", "optimizer", "trainer", "config_yaml"} of checkpoint directory `path`.

    "optimizer" is optimizer/rank00000.pt: the whole state of a one-process run, rank 0's shard of a
    sharded one (pretrain/state_io.py reads every format); of a DCP checkpoint, the full tensors of the
    optimizer state keyed by flattened name ("state.<param>.exp_avg"). Left out when `with_optimizer`
    is False, "model" when `with_model` is False. A DCP checkpoint's tensors are read whole in this
    one process (no process group needed: `python -m pretrain.export` reads them so).
    """
    path = Path(path)
    dcp_checkpoint = checkpoint_format(path) == DCP
    needed = ["model_config.json", "trainer.pt", "config.yaml"]
    if not dcp_checkpoint:
        needed += ["model.pt", PLAIN_OPTIMIZER]
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
        out["optimizer"] = load("optimizer" if dcp_checkpoint else PLAIN_OPTIMIZER)
    return out


class CheckpointManager:
    """Owns a run's checkpoints (as torchtitan's CheckpointManager): `save` (atomic, with a manifest,
    the last `keep_last` kept), `resolve` (which checkpoint a resume starts from, verified),
    `check_config` (which settings may change on resume) and `load`.

    save and resolve are collective: every rank calls them; rank 0 writes, verifies and renames.
    `io` is the strategy's checkpoint state I/O (pretrain/state_io.py): which files hold the model and
    optimizer, who writes them, which formats it reads. `mode` names the strategy in refusals.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int, *, io=None, rank: int = 0, world_size: int = 1,
                 mode: str = "?", say=print):
        from pretrain.state_io import PlainState

        self.root, self.keep_last, self.io, self.mode = Path(root), keep_last, io or PlainState(), mode
        self.rank, self.world_size, self.say = rank, world_size, say

    def _gather(self, obj) -> list:
        from pretrain.distributed import all_gather_objects

        return all_gather_objects(obj, self.world_size)

    # ------------------------------------------------------------------ save
    def save(self, step: int, *, model_state: dict, optimizer, trainer_state: dict, model_config: dict,
             config_yaml: str, prune: bool = True) -> Path:
        """Write checkpoint `step`: every rank its shards (if the format has any), then rank 0 the rest.
        prune False: the older ones stay until `prune_to(step)` (the divergence guard confirms it first).

        A failed write (disk full, ...) on any rank removes the staging directory and raises
        CheckpointWriteError on every rank, naming the file; the previous checkpoint stays the latest.
        """
        tmp, failure, io = staging_dir(self.root, step), None, self.io
        if io.staged is not None:  # the ranks write first; a failure anywhere is reported everywhere
            if self.rank == 0:
                failure = self._attempt(tmp, prepare_staging, self.root, step, io.subdir)
            failure = self._gather(failure)[0]  # the staging directory exists before anyone writes into it
            failure = failure or self._attempt(tmp / io.subdir, io.write_shards, tmp, optimizer)
            failure = next((f for f in self._gather(failure) if f), None)  # every shard on disk, or none
        if self.rank == 0 and failure is None:
            failure = self._attempt(tmp, save_checkpoint, self.root, step,
                                    state_files=io.rank0_files(model_state, optimizer), staged=io.staged,
                                    model_config=model_config, trainer_state=trainer_state, config_yaml=config_yaml,
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
        or `resume` itself if it verifies (ResumeError otherwise). Rank 0 reads the files."""
        from pretrain.resume import ResumeError, find_checkpoint

        if resume is None:
            return None
        found, problem = find_checkpoint(self.root, resume, self.say) if self.rank == 0 else (None, None)
        found, problem = self._gather((found, problem))[0]
        if problem is not None:
            raise ResumeError(problem)
        return found

    def check_config(self, path: Path, new_config: dict, new_model_config: dict) -> list[str]:
        """pretrain.resume.check_resume for this run: its format, its settings, its world size."""
        from pretrain.resume import check_resume

        return check_resume(path, new_config, new_model_config, world_size=self.world_size, reads=self.io.reads,
                            mode=self.mode)

    def load(self, path: Path, *, model, optimizer, scheduler, map_location="cpu") -> tuple[dict, str]:
        """Model, optimizer and schedule state of checkpoint `path` into the given objects; then the
        optimizer's hyper-parameters and the schedule's base lr are set back to the config's (so a
        changed optim.lr or update_interval takes effect; unchanged, they are the saved values).
        Returns (trainer state, how the optimizer state was read)."""
        from pretrain.resume import check_format
        from pretrain.schedule import rebase

        fresh = [{k: v for k, v in g.items() if k not in ("params", "names", "param_names")}
                 for g in optimizer.param_groups]
        check_format(path, yaml.safe_load((path / "config.yaml").read_text()), self.io.reads, self.mode)
        how = self.io.load(path, model, optimizer, map_location=map_location)
        trainer = torch.load(path / "trainer.pt", map_location=map_location, weights_only=True)
        scheduler.load_state_dict(trainer["scheduler"])
        for group, hyper in zip(optimizer.param_groups, fresh):
            group.update(hyper)
        rebase(scheduler, [g["initial_lr"] for g in optimizer.param_groups])
        return trainer, how
