"""The nano run config every training test starts from, written as YAML into a test's directory.

`NANO` is the one tiny run (nano model, 32-token sequences, a few steps, no TensorBoard); a test
changes only what it needs: `nano_yaml(optim={"name": "adamw"}, train={"max_steps": 2})` merges each
given section into NANO's (keys absent from NANO are added, sections absent from it come last, in
the order given). `nano_config(directory)` writes it to `directory/nano.yaml` and returns the path.
"""
from __future__ import annotations

import copy
import os

import yaml

NANO = {
    "model": {"size": "nano"},
    "data": {"seq_len": 32, "num_workers": 0},
    "optim": {"lr": 3.0e-3},
    "train": {"micro_batch_size": 2, "total_batch_size": 4, "max_steps": 20, "warmup_steps": 2, "eval_every": 0,
              "eval_batches": 2},
    "log": {"log_every": 1, "tensorboard": False},
    "checkpoint": {"every": 0},
}


def nano_yaml(**sections: dict) -> str:
    """NANO with each keyword's section updated by the given dict, as YAML text."""
    config = copy.deepcopy(NANO)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return yaml.safe_dump(config, sort_keys=False)


def nano_config(directory: str | os.PathLike, name: str = "nano.yaml", text: str | None = None, **sections: dict):
    """Write `text` (default: `nano_yaml(**sections)`) to `directory/name`; returns the path (a pathlib.Path
    when `directory` is one)."""
    if text is None:
        text = nano_yaml(**sections)
    elif sections:
        raise TypeError("nano_config takes the YAML text or sections to change, not both")
    path = directory / name if hasattr(directory, "joinpath") else os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path
