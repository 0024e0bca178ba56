"""Stopping on a signal: SLURM sends SIGTERM or SIGUSR1 before preempting a job; SIGINT is Ctrl-C (a
second one interrupts at once). The handler only records the signal; the loop asks at a step boundary,
saves and exits."""
from __future__ import annotations

import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Remembers a SIGTERM / SIGUSR1 / SIGINT. `agreed` answers every step with one process; with several
    every `check_every` steps, since the answer is a collective (log.log_every: the steps where the loop
    waits for the device anyway)."""

    def __init__(self, world_size: int = 1, check_every: int = 1, device: torch.device | None = None):
        self.signum = None
        self.previous = {}
        self.check_every = 1 if world_size == 1 else check_every  # one process: no collective, every step
        self.collective = world_size > 1
        self.device = device or torch.device("cpu")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the save
        self.signum = signum

    def agreed(self, step: int, max_over_ranks) -> int | None:
        """The signal to stop for at `step`, decided alike on every rank: with several ranks the max of
        every rank's flag (a signal may reach one task only), and the answer is the reduced value alone.
        A signal that lands after the reduce returned is left for the next check: re-reading the flag here
        would stop this rank while its peers train on, each waiting for the other's collective."""
        if step % self.check_every:
            return None
        if not self.collective:
            return self.signum
        reduced = int(max_over_ranks(torch.tensor([float(self.signum or 0)], device=self.device)).item())
        return reduced or None
