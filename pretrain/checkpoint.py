"""Checkpoints: written atomically, the last K kept, loaded with `torch.load(weights_only=True)`.

Layout (docs/architecture.md):

    <root>/step_00000100/
        model.pt            model state dict
        model_config.json   LlamaConfig fields
        optimizer/rank00000.pt
        trainer.pt          step, scheduler, per-rank data loader states, RNG states
        config.yaml         the full resolved run config

Everything is written into `<root>/.tmp-step_00000100-<pid>/` and renamed into place only when
complete, so a crash mid-save leaves the previous checkpoint as the latest one.
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


def save_checkpoint(root: str | os.PathLike, step: int, *, model_state: dict, model_config: dict,
                    optimizer_state: dict, trainer_state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete all but the newest `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "optimizer").mkdir(parents=True)
    torch.save(model_state, tmp / "model.pt")
    (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    torch.save(optimizer_state, tmp / "optimizer" / "rank00000.pt")
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


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """{"model", "model_config", "optimizer", "trainer", "config_yaml"} of checkpoint directory `path`."""
    path = Path(path)
    missing = [n for n in ("model.pt", "model_config.json", "optimizer/rank00000.pt", "trainer.pt", "config.yaml")
               if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing}")

    def load(name):
        return torch.load(path / name, map_location=map_location, weights_only=True)

    return {"model": load("model.pt"), "model_config": json.loads((path / "model_config.json").read_text()),
            "optimizer": load("optimizer/rank00000.pt"), "trainer": load("trainer.pt"),
            "config_yaml": (path / "config.yaml").read_text()}


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
