"""Training metrics: TensorBoard scalars, a JSONL file, a progress bar or plain log lines (rank 0 only)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch


class MetricsLogger:
    """`log(step, {"train/loss": 2.3, ...})` appends one JSON line to <run_dir>/metrics.jsonl and, when
    enabled, writes the same scalars to TensorBoard event files in <run_dir>/tensorboard/.

    On ranks other than 0 (`enabled=False`) every method does nothing.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")  # appended to across resumes
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

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

