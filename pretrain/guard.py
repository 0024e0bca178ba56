"""The divergence guard: a step whose loss or gradient norm is not finite (or, when asked, whose loss
spikes) moves nothing; repeated ones stop the run with the last good checkpoint named; no checkpoint is
written with non-finite state, and none from before the trouble is pruned away.

Each step, on the device, with no host sync:

    loss  = the step's loss, summed over ranks (one one-element all-reduce per step with several ranks,
            so every rank decides alike; the grad norm is global already)
    ok    = isfinite(loss) & isfinite(grad_norm) & (loss <= spike limit)
    stats = [skipped in a row, skipped in all, first skipped step of the streak, first skipped step
             since the last read, last skipped step, its loss, its gradient norm]   (torch.where)

The optimizer step is held back through `gated(grad_norm, optimizer)`, called by the strategy between
clipping and stepping (pretrain/strategies/, optim/sharding/optimizer.py for zero and deepspeed):

- device gate: an optimizer that honours GradScaler's protocol (`_step_supports_amp_scaling`: torch's
  fused Adam / AdamW / SGD, `fused=True`) gets `found_inf = 1 - ok`; its kernel then skips the update
  and undoes its step count on the device. No host sync.
- fallback, every other optimizer (SubTrackAdamW and its 8-bit and row-sharded forms, torch's
  foreach AdamW, Muon, Adafactor, ...): one host read of the one-element flag per step, and
  `optimizer.step()` is not called for a bad step. On a CPU it costs nothing; on a GPU it waits for
  the step's backward before the update is queued.
- optim.per_layer steps each weight inside backward, before the global norm exists: there the bad
  step is counted, stops the run and is kept out of checkpoints, but the weights already moved.

The host reads `stats` (one small .tolist()) only at log and checkpoint steps, and at every step where
the fallback read the flag anyway. A read decides the rest: `train.max_skipped_steps` in a row stop the
run (one line: the step, its loss and norm, the newest checkpoint from before the trouble, what to
try); a checkpoint step that was itself skipped writes nothing.

Which checkpoint is "from before the trouble": checkpoint s holds the weights whose loss is step s+1's,
so with the first skipped step f the newest good one is the newest with s <= f - 2 (with optim.lr
1e30 the weights of step f - 1 are finite but already ruined). Likewise keep_last prunes the older
checkpoints only once the step after the new one trained with a finite loss (seen at the next read;
up to keep_last + 1 exist meanwhile), and once any step was skipped the newest checkpoint from
before the first one is never pruned for the rest of the process.
"""
from __future__ import annotations

import contextlib
import math
import statistics

import torch

from optim.nbytes import local_part
from pretrain import distributed
from pretrain.checkpoint import list_checkpoints, step_of

RUN, TOTAL, STREAK_FIRST, FIRST_SINCE_READ, LAST, LAST_LOSS, LAST_NORM = range(7)
NONE = -1.0  # "no such step" in stats
SPIKE_WINDOW = 50  # recent per-step losses whose median the spike rule compares with
SPIKE_MIN_HISTORY = 10  # no spike rule before this many finite losses


def supports_found_inf(optimizer) -> bool:
    """Whether optimizer.step() honours GradScaler's `found_inf` attribute (torch's fused optimizers).
    torch marks them by this private class attribute, which GradScaler itself reads; there is no public one."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class DivergenceGuard:
    def __init__(self, *, max_skipped: int, spike_factor: float | None, device: torch.device, world: int,
                 checkpoints=None, lr: float | None = None, say=print):
        self.max_skipped, self.spike_factor, self.device, self.world = max_skipped, spike_factor, device, world
        self.lr = lr  # for the stop line's suggestion
        self.checkpoints, self.say = checkpoints, say
        self.stats = torch.tensor([0, 0, NONE, NONE, NONE, math.nan, math.nan], dtype=torch.float64, device=device)
        self.limit = torch.full((), math.inf, dtype=torch.float64, device=device)  # spike rule: k x median
        self.recent: list[float] = []  # finite per-step losses, for the median
        self.host = [0, 0, NONE, NONE, NONE, math.nan, math.nan]  # stats as last read
        self.read_now = False  # the fallback read the flag this step: the host may read stats for free
        self.first_skipped = None  # the first skipped step of this process (host, from reads)
        self.unconfirmed = None  # step of the newest checkpoint whose older neighbours wait to be pruned
        self._step = self._loss = self._ok = None

    # ------------------------------------------------------------------ each step (device only)
    def begin(self, step: int, loss_sum: torch.Tensor) -> None:
        """Step `step` starts; `loss_sum` is its loss as the micro-batches add to it (in place)."""
        self._step, self._loss, self._ok = step, loss_sum, None

    def decide(self, grad_norm) -> torch.Tensor:
        """This step's verdict, a 0-dim bool on the device (computed once per step)."""
        if self._ok is not None:
            return self._ok
        loss = self.loss  # the step's loss, the same on every rank
        norm = torch.as_tensor(grad_norm, device=self.device).detach().reshape(()).double()
        loss64 = loss.double()
        ok = torch.isfinite(loss64) & torch.isfinite(norm) & (loss64 <= self.limit)
        s, step = self.stats, float(self._step)
        bad = ~ok
        run = (s[RUN] + 1) * bad
        self.stats = torch.stack([
            run, s[TOTAL] + bad,
            torch.where(bad & (s[RUN] == 0), step, s[STREAK_FIRST]),
            torch.where(bad & (s[FIRST_SINCE_READ] < 0), step, s[FIRST_SINCE_READ]),
            torch.where(bad, step, s[LAST]), torch.where(bad, loss64, s[LAST_LOSS]),
            torch.where(bad, norm, s[LAST_NORM])])
        self._ok = ok
        return ok

    @property
    def loss(self) -> torch.Tensor:
        """The step's loss, the mean over ranks (all-reduced once per step: every rank decides alike)."""
        if not isinstance(self._loss, tuple):
            self._loss = (distributed.all_reduce_sum(self._loss.detach().clone(), self.world) / self.world,)
        return self._loss[0]

    @contextlib.contextmanager
    def gated(self, grad_norm, optimizer):
        """`with guard.gated(norm, opt) as go: if go: opt.step()`: the update only when the step is ok."""
        ok = self.decide(grad_norm)
        if supports_found_inf(optimizer):  # decided on the device: the fused kernel skips itself
            optimizer.grad_scale, optimizer.found_inf = None, (~ok).float()
            try:
                yield True
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        else:
            self.read_now = True
            yield bool(ok)  # the fallback: one host read per step

    def end(self, grad_norm) -> torch.Tensor:
        """After strategy.step: decides a step no gate asked about (optim.per_layer); returns the loss."""
        self.decide(grad_norm)
        return self.loss

    # ------------------------------------------------------------------ host reads
    def record(self, losses: list[float]) -> None:
        """The per-step losses the loop just logged: the spike rule's history (its limit moves at reads)."""
        if self.spike_factor is not None:
            self.recent = (self.recent + [x for x in losses if math.isfinite(x)])[-SPIKE_WINDOW:]

    def read(self, step: int) -> str | None:
        """Read the device counters (call at log and checkpoint steps, or whenever `read_now`); prune what
        the newest checkpoint's next step confirmed; return the stop line, or None to go on."""
        self.read_now = False
        self.host = self.stats.tolist()
        first_since = self.host[FIRST_SINCE_READ]
        if first_since >= 0:
            self.stats[FIRST_SINCE_READ] = NONE
            if self.first_skipped is None:
                self.first_skipped = int(first_since)
        if self.unconfirmed is not None and step > self.unconfirmed:  # its next step has run
            if first_since < 0 or first_since > self.unconfirmed + 1:
                self.prune(self.unconfirmed)
            self.unconfirmed = None  # a checkpoint whose next step was skipped keeps its neighbours
        if self.spike_factor is not None:
            if len(self.recent) >= SPIKE_MIN_HISTORY:
                self.limit.fill_(self.spike_factor * statistics.median(self.recent))
        if self.host[RUN] >= self.max_skipped:
            return self.stop_line()
        return None

    @property
    def skipping(self) -> bool:
        """The last step read was skipped (nothing to checkpoint: the weights are an older step's)."""
        return self.host[RUN] > 0

    @property
    def skipped(self) -> int:
        return int(self.host[TOTAL])

    def before_trouble(self) -> str | None:
        """The newest checkpoint on disk whose weights gave a finite loss before the first skipped step."""
        if self.checkpoints is None or self.first_skipped is None:
            return None
        good = [p for p in list_checkpoints(self.checkpoints.root) if step_of(p) <= self.first_skipped - 2]
        return str(good[-1]) if good else None

    def stop_line(self) -> str:
        run, _, first, _, last, loss, norm = self.host
        streak_first = int(first)
        if self.first_skipped is None or self.first_skipped > streak_first:
            self.first_skipped = streak_first
        newest = self.before_trouble()
        lower = f"a lower optim.lr (e.g. --set optim.lr={self.lr / 10:g})" if self.lr else "a lower optim.lr"
        where = (f"the newest checkpoint before the trouble is {newest}; try --resume {newest} with {lower}"
                 if newest else f"no checkpoint from before the trouble exists; start again with {lower}")
        return (f"diverged: step {int(last)} skipped (loss {loss:.4g}, gradient norm {norm:.4g}), {int(run)} steps "
                f"in a row since step {streak_first} (train.max_skipped_steps {self.max_skipped}); {where}")

    # ------------------------------------------------------------------ checkpoints
    def saved(self, step: int, prune_now: bool) -> None:
        """Checkpoint `step` was written without pruning: prune now (the run's last), or once its next
        step is seen to be healthy."""
        if prune_now:
            self.prune(step)
        else:
            self.unconfirmed = step

    def finish(self) -> None:
        """The run ends healthy: the newest checkpoint has no next step to wait for."""
        if self.unconfirmed is not None and not self.skipping:
            self.prune(self.unconfirmed)
        self.unconfirmed = None

    def prune(self, step: int) -> None:
        if self.checkpoints is not None:
            spare = self.before_trouble() if self.first_skipped is not None else None
            self.checkpoints.prune_to(step, spare=spare)

    def state_is_finite(self, model_state: dict, optimizer) -> bool:
        """Every floating tensor of the weights and of this rank's optimizer state is finite, on every rank
        (collective; read once per checkpoint)."""
        from optim.sharded import ShardedOptimizer

        state = optimizer.inner.state if isinstance(optimizer, ShardedOptimizer) else optimizer.state  # this rank's
        tensors = [t for t in _tensors([model_state, state]) if t.is_floating_point()]
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        for t in tensors:
            local = local_part(t)  # this rank's shard
            bad = bad + (~torch.isfinite(local)).any().to(bad.device, torch.float32)
        return float(distributed.all_reduce_sum(bad.reshape(1), self.world)) == 0


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
