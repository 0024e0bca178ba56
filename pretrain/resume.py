"""The resume policy: which checkpoint a run continues from, and which settings may change.

    find_checkpoint      --resume auto: the newest checkpoint that verifies (newer damaged ones named in one
                         line); a path: that checkpoint, refused in one line if damaged
    check_resume         before anything is loaded: the checkpoint's format is one this run's strategy reads,
                         no setting that fixes the saved tensors' meaning changed (FIXED_ON_RESUME), and each
                         rank's data position can continue; returns one line per setting that changed

Everything here reads files only; pretrain/checkpoint.CheckpointManager runs it on rank 0 and shares
the verdict.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from pretrain.checkpoint import list_checkpoints, verify_checkpoint
from pretrain.config import ConfigError
from pretrain.state_io import FILES, checkpoint_format


class ResumeError(ConfigError):
    """A resume that cannot go ahead (a damaged checkpoint asked for by path, a setting that cannot change)."""


def find_checkpoint(root: Path, resume: str, say=print) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from or None, the refusal or None) for checkpoint.resume `resume`."""
    if resume != "auto":
        bad = verify_checkpoint(resume)
        if bad:
            return None, (f"resume: checkpoint {resume} is damaged ({bad}); pass another checkpoint "
                          "directory, or --resume auto for the newest one that verifies")
        return Path(resume), None
    candidates = list_checkpoints(root)[::-1]
    if not candidates:
        say(f"resume: no complete checkpoint in {root}; starting fresh", flush=True)
        return None, None
    damaged = []
    for path in candidates:
        bad = verify_checkpoint(path)
        if bad is None:
            if damaged:
                say(f"resume: checkpoint {'; '.join(damaged)}; using {path}", flush=True)
            return path, None
        damaged.append(f"{path} is damaged ({bad})")
    return None, (f"resume: no checkpoint in {root} verifies ({'; '.join(damaged)}); move them "
                  "aside to start fresh, or repair one")


def check_resume(path: Path, new_config: dict, new_model_config: dict, *, world_size: int, reads: tuple,
                 mode: str) -> list[str]:
    """Refuse (ResumeError, before anything is written) a checkpoint this run cannot continue from;
    return one log line per setting that changed and takes effect (`config_changes`).
    reads: the formats this run's checkpoint state I/O loads (pretrain/state_io.py); mode: its strategy."""
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
        saved_model = json.loads((path / "model_config.json").read_text())
        if not isinstance(saved, dict) or not isinstance(saved_model, dict):
            raise ValueError("config.yaml and model_config.json must each hold a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:  # only a checkpoint without a manifest gets here
        raise ResumeError(f"resume: checkpoint {path} has no readable config ({e.__class__.__name__}: {e}); "
                          "pass another checkpoint directory") from None
    check_format(path, saved, reads, mode)
    fixed, changed = config_changes(saved, new_config, saved_model, new_model_config)
    if fixed:
        key, old, new = fixed[0]
        raise ResumeError(f"resume: {key} cannot change on resume (checkpoint {path} has {old!r}, this run "
                          f"{new!r}); set it back to {old!r}, or start a new run in another log.run_dir")
    allowed = bool((new_config.get("checkpoint") or {}).get("allow_world_size_change"))
    _check_data_layout(path, changed, allowed, world_size)
    return [f"resume: {key} {old} -> {new} ({note})" for key, old, new, note in changed]


def check_format(path: Path, saved_config: dict, reads: tuple, mode: str) -> None:
    """ResumeError naming both sides when checkpoint `path`'s format is not one of `reads`."""
    saved_format = checkpoint_format(path)
    if saved_format not in reads:
        saved_mode = ((saved_config or {}).get("train") or {}).get("parallelism", "?")
        raise ResumeError(f"resume: checkpoint {path} was written by train.parallelism {saved_mode} "
                          f"({FILES[saved_format]}), which this run's train.parallelism {mode} cannot read (it reads "
                          f"{' or '.join(FILES[f] for f in reads)}); resume with --set train.parallelism={saved_mode}")


def _check_data_layout(path: Path, changed: list, allowed: bool, world_size: int) -> None:
    """Each rank's data position is saved for the saved world size, micro batch and loader workers:
    at the same world size neither of the other two may change (the loader cannot continue from it);
    another world size is refused unless allowed (then every stream is remapped)."""
    saved = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True).get("world_size", world_size)
    if saved == world_size:
        for key, old, new, _ in changed:
            if key in ("train.micro_batch_size", "data.num_workers"):
                raise ResumeError(f"resume: {key} cannot change at the same number of processes (checkpoint {path} "
                                  f"has {old!r}, this run {new!r}): each rank's data position is saved in batches "
                                  f"of that layout; set it back to {old!r}, or start a new run in another "
                                  "log.run_dir")
    elif not allowed:
        raise ResumeError(
            f"resume: checkpoint {path} was written by {saved} rank(s); this run has {world_size}. Weights, "
            "optimizer and schedule would load exactly, but each rank's data position cannot: resume with "
            f"{saved} process(es), or set checkpoint.allow_world_size_change=true to continue the data "
            "from a remapped position (data.loader.remap_train_state: a few lines skipped, none read twice)")


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
