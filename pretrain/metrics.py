"""Training metrics: TensorBoard scalars, a JSONL file, a progress bar or plain log lines (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch


class MetricsLogger:
    """`log(step, {"train/loss": 2.3, ...})` appends one JSON line to <run_dir>/metrics.jsonl and, when
    enabled, writes the same scalars to TensorBoard event files in <run_dir>/tensorboard/.

    `resume_step`: the run resumed from that step's checkpoint, so the records of later steps (logged
    by the run that went on past it) are dropped from both, and the resumed run's records replace them;
    -1: a resume was asked for but found no checkpoint, so the run starts over and drops them all.
    None: a fresh run, in a run dir that holds no earlier metrics (pretrain/rundir.py refuses a used one
    without --resume, and --restart moves its files aside), so nothing is appended to an old file.

    On ranks other than 0 (`enabled=False`) every method does nothing.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            keep_records_up_to(run_dir / "metrics.jsonl", resume_step)
        self.file = open(run_dir / "metrics.jsonl", "a")  # appended to across resumes
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # TensorBoard hides events from here on
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                if math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite the JSONL file `path` (atomically) without the records after `step` (and any torn line)."""
    if not path.is_file():
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class Progress:
    """A tqdm bar when stderr is a terminal (or `mode="on"`), plain log lines every `log_every` steps otherwise."""

    def __init__(self, total: int, initial: int, log_every: int, enabled: bool = True, mode: str = "auto"):
        self.enabled = enabled
        self.log_every = log_every
        self.bar = None
        use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.log_every == 0:
            print(f"step {step:>7d} | {text}", flush=True)

    def write(self, text: str) -> None:
        """A line that stays (evaluation results, checkpoint saves) without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Dense bf16 peak FLOP/s per GPU, for MFU (SXM parts; a PCIe part has a lower peak).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of `device` if it is a GPU we know; None otherwise (MFU is then not logged)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)

