"""A used run directory is never silently restarted.

Without a resume, a run directory that holds a complete checkpoint or logged metrics is refused in one
line (RunDirUsed, exit status 2) that names the newest checkpoint and the three ways on: `--resume auto`,
another `log.run_dir`, or `--restart`, which moves the old contents aside into a sibling directory
`<run_dir>.old-<UTC time>` (one line says where) and starts fresh. A directory with nothing of value (only
`config.yaml` or the lock of a run that died during set-up) starts fresh as before.

Called by rank 0 under the run-dir lock (pretrain.checkpoint.locked_run_dir), so no other job writes
meanwhile; the verdict reaches every rank through one all_gather_objects.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from pretrain.config import ConfigError

LOCK = ".lock"


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
