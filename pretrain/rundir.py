"""A used run directory is never silently restarted.

Without a resume, a run directory that holds a complete checkpoint or logged metrics is refused in one
line (RunDirUsed, exit status 2) that names the newest checkpoint and the three ways on: `--resume auto`,
another `log.run_dir`, or `--restart`, which moves the old contents aside into a sibling directory
`<run_dir>.old-<UTC time>` (one line says where) and starts fresh. A directory with nothing of value (only
`config.yaml` or the lock of a run that died during set-up) starts fresh as before.

Called by rank 0 under the run-dir lock (`locked_run_dir`: an flock on `<run_dir>/.lock` keeps a second job
off the directory), so no other job writes meanwhile; the verdict reaches every rank through one
all_gather_objects.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from pretrain.config import ConfigError

LOCK = ".lock"


class RunDirLocked(ConfigError):
    """Another live job holds the run directory."""


class RunDirUsed(ConfigError):
    """A fresh run (no --resume) into a directory that holds an earlier run's checkpoints or metrics."""


def earlier_run(run_dir: Path) -> list[str]:
    """What of an earlier run `run_dir` holds: its newest checkpoint, its metrics ([] if nothing)."""
    from pretrain.checkpoint import latest_checkpoint

    found = []
    newest = latest_checkpoint(run_dir / "checkpoints")
    if newest is not None:
        found.append(f"newest checkpoint {newest}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics.name)
    events = run_dir / "tensorboard"
    if events.is_dir() and any(events.iterdir()):
        found.append("tensorboard/")
    return found


def move_aside(run_dir: Path) -> Path:
    """Move everything in `run_dir` but the lock (held by this job) into a new sibling directory."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    suffix = 1
    while target.exists():  # two restarts within a second
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{suffix}")
        suffix += 1
    target.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name != LOCK:
            os.replace(entry, target / entry.name)
    return target


def claim(run_dir: Path, resume: str | None, restart: bool, rank: int = 0, world_size: int = 1) -> str | None:
    """Refuse a fresh run into a used `run_dir` (RunDirUsed on every rank), or with `restart` move the old
    contents aside. Returns the line to print about the move (rank 0), else None. Collective."""
    from pretrain.distributed import all_gather_objects

    problem, note = None, None
    if rank == 0:
        problem, note = _decide(Path(run_dir), resume, restart)
    problem = all_gather_objects(problem, world_size)[0]
    if problem is not None:
        raise RunDirUsed(problem)
    return note


def _decide(run_dir: Path, resume: str | None, restart: bool) -> tuple[str | None, str | None]:
    if restart and resume is not None:
        return (f"--restart and --resume {resume} contradict each other: --restart starts over, --resume "
                "continues; pass one of them"), None
    if resume is not None:
        return None, None
    found = earlier_run(run_dir)
    if not found:
        return None, None
    if restart:
        try:
            target = move_aside(run_dir)
        except OSError as e:
            return f"--restart: cannot move the old contents of {run_dir} aside: {e.strerror or e}", None
        return None, f"pretrain: --restart: moved the earlier run's files in {run_dir} ({', '.join(found)}) to {target}"
    return (f"run dir {run_dir} holds an earlier run ({', '.join(found)}); continue it with --resume auto, "
            "start a new run with --set log.run_dir=ANOTHER_DIR, or start over here with --restart (the old "
            "contents are moved aside)"), None


def _try_lock(run_dir: Path) -> tuple[int | None, str | None]:
    """(fd, None) with the lock held, or (None, why not): never raises, so the other ranks, waiting
    for rank 0's answer in a collective, always get one."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return None, f"cannot create the lock file {run_dir / LOCK}: {e.strerror or e}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if not isinstance(e, BlockingIOError):
            return None, f"cannot lock {run_dir / LOCK}: {e.strerror or e} (does this filesystem support flock?)"
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
