"""The nano run every training test starts from: its config, and how a test runs it and reads it back.

`NANO` is the one tiny run (nano model, 32-token sequences, a few steps, no TensorBoard); a test
changes only what it needs: `nano_yaml(optim={"name": "adamw"}, train={"max_steps": 2})` merges each
given section into NANO's (keys absent from NANO are added, sections absent from it come last, in
the order given). `nano_config(directory)` writes it to `directory/nano.yaml` and returns the path.

`run_cli(*args)` runs `python -m pretrain` in a fresh process; `read_metrics(run_dir)` and
`train_losses(run_dir)` read its metrics.jsonl; `assert_identical(a, b)` compares nested state bit for bit.
These are importable modules rather than conftest.py fixtures because spawned rank processes import them too.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def run_cli(*args, timeout=180):
    """`python -m pretrain ARGS` in a fresh process (one thread: the test machine is shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pretrain", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def assert_identical(a, b, where=""):
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
