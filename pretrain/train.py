"""The training loop, read top to bottom: `Trainer`.

    set up       (__init__) distributed, seed, tokenizer, model, optimizer, learning-rate schedule, data
    resume       model, optimizer, schedule, data position, RNG state and step from a checkpoint
    fit          per step: train_step (gradient accumulation -> reduce over ranks, clip, optimizer step, all
                 the strategy's), then after_step (metrics, divergence guard, evaluation, checkpoints).
                 Losses and gradient norm stay on the device; read every log.log_every steps, so the host
                 waits for the device only at log, evaluation and checkpoint steps
    evaluation   loss and perplexity on fixed validation batches: step 0, every eval_every, the end
    checkpoints  every checkpoint.every steps, on SIGTERM / SIGUSR1 / SIGINT (then exit; pretrain/stop.py),
                 at the end
    guard        a step whose loss or gradient norm is not finite moves nothing, is counted, and
                 train.max_skipped_steps in a row stop the run (pretrain/guard.py decides on the device)

How a step is distributed is the strategy's business (train.parallelism, pretrain/strategies/:
single, replicate, zero, deepspeed, fsdp): it shards or wraps the model, builds the optimizer, runs
backward and the reduce-clip-step, owns the collectives and says how a checkpoint holds the state.
The loop names no mode.

`train(cfg)` runs it in-process and returns a summary; `python -m pretrain` is the CLI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import time

import torch
import torch.nn.functional as F

from optim.stats import SubspaceStats
from pretrain import distributed, rundir, strategies
from pretrain.checkpoint import CheckpointManager, latest_checkpoint
from pretrain.config import RunConfig, config_to_dict, config_to_yaml, resolve_model_config
from pretrain.guard import DivergenceGuard
from pretrain.memory import state_tensor_bytes
from pretrain.metrics import MetricsLogger, Progress, peak_flops
from pretrain.rng import rng_state, seed_everything, set_rng_state
from pretrain.rundir import locked_run_dir
from pretrain.schedule import build_scheduler
from pretrain.stop import StopRequest


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on CUDA for dtype auto/bfloat16; float32 (no autocast) on CPU unless bfloat16 is asked for."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against labels (B, T) (-100: no loss), in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)


@torch.no_grad()
def evaluate(model, batches: list[dict], device, autocast, sum_over_ranks) -> float:
    """Mean token loss over the fixed validation batches of every rank."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    for batch in batches:
        labels = batch["labels"].to(device)
        with autocast():
            logits = model(batch["input_ids"].to(device))
        totals[0] += lm_loss(logits, labels, reduction="sum").double()
        totals[1] += (labels != -100).sum()
    model.train()
    sum_over_ranks(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def train(cfg: RunConfig, restart: bool = False) -> dict:
    """Train as `cfg` says; returns a summary (losses, steps, where the run and its last checkpoint are).
    A run dir an earlier run used needs cfg.checkpoint.resume, or `restart` to move its contents aside
    (pretrain/rundir.py)."""
    strategy_class = strategies.validate(cfg, distributed.env_world_size())  # refused before any process group
    dist = distributed.setup(cfg.train.device, cfg.train.collective_timeout_s,
                             group_alone=strategy_class.needs_group_alone)
    finished = False
    try:
        with locked_run_dir(cfg.run_dir, dist.rank, dist.world_size), \
                StopRequest(dist.world_size, cfg.log.log_every, dist.device) as stop:  # one job per run dir
            moved = rundir.claim(cfg.run_dir, cfg.checkpoint.resume, restart, dist.rank, dist.world_size)
            if moved and dist.is_main:
                print(moved, flush=True)
            trainer = Trainer(cfg, dist, strategies.build_strategy(cfg, dist), stop)
            try:
                summary = trainer.fit()
            finally:  # after the run, or an error: hooks removed
                trainer.strategy.close()
        finished = True
        return summary
    finally:  # only a group setup() joined: a caller's own group stays usable
        distributed.cleanup(dist, together=finished)  # after an error a peer may be gone: no barrier


class LogWindow:
    """The steps since the last log line: their losses (the mean over ranks, left on the device until the
    log reads them) and their wall time, with evaluation and checkpoints kept off the clock."""

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints do not count towards the logged step time."""
        paused = time.perf_counter()
        yield
        self.start += time.perf_counter() - paused

    def take(self) -> tuple[list[float], float]:
        """(the pending losses, the mean seconds per step) since the last take; the host waits for the device here."""
        losses = torch.stack(self.pending).tolist()
        step_time = (time.perf_counter() - self.start) / len(self.pending)
        self.pending.clear()
        self.start = time.perf_counter()
        return losses, step_time


def _silent(*args, **kwargs) -> None:
    pass


class Trainer:
    """One run of the loop: built in __init__, run by fit(), which returns the summary."""

    def __init__(self, cfg: RunConfig, dist: distributed.DistInfo, strategy, stop: StopRequest):
        self.cfg, self.dist, self.strategy, self.stop = cfg, dist, strategy, stop
        self.say = print if dist.is_main else _silent
        seed_everything(cfg.train.seed)  # the same seed on every rank: identical initial weights
        self._build_model()
        self._build_data()
        self.checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                             io=strategy.checkpoint_io(), rank=dist.rank, world_size=dist.world_size,
                                             mode=strategy.name, say=self.say)
        self.guard = DivergenceGuard(max_skipped=cfg.train.max_skipped_steps, spike_factor=cfg.train.loss_spike_factor,
                                     device=dist.device, world=dist.world_size, checkpoints=self.checkpoints,
                                     lr=cfg.optim.lr, say=self.say)
        strategy.attach_guard(self.guard)  # the strategy holds a bad step's update back
        self.step = self.start_step = 0
        self.resumed_from = None
        self.train_losses, self.evals, self.checksums = [], [], []
        self.stopped_by = self.diverged = None
        self.last_saved = self.saved_step = None  # saved_step is the same on every rank (save() is collective)

    # ---------------------------------------------------------------- set up
    def _build_model(self) -> None:
        from data.loader import build_tokenizer
        from models.sizes import build_model, count_parameters

        cfg, tc, strategy = self.cfg, self.cfg.train, self.strategy
        self.tokenizer = build_tokenizer(cfg.data)
        self.model_cfg = resolve_model_config(cfg, self.tokenizer.vocab_size)
        self.tokenizer.check_fits(self.model_cfg.vocab_size)  # refuse before any step, not with an index error later
        self.config_yaml, self.model_config_dict = config_to_yaml(cfg), dataclasses.asdict(self.model_cfg)
        # bfloat16: pure-bf16 weights and gradients (GaLore's 7B recipe); optimizer bases/state stay float32
        model = build_model(self.model_cfg).to(self.dist.device, dtype=getattr(torch, tc.param_dtype))
        self.model = strategy.parallelize(model)  # the plain module (FSDP2 shards it in place)
        self.optimizer = strategy.build_optimizer(self.model)
        self.forward = strategy.bind(self.model, self.optimizer)  # the model, DDP or the DeepSpeed engine
        self.scheduler = build_scheduler(self.optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        self.accum = tc.grad_accum_steps(self.dist.world_size)
        self.max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf  # inf: the norm is still measured, not applied
        self.autocast = functools.partial(autocast_context, tc.dtype, self.dist.device)  # a fresh context per use
        self.say(f"model {cfg.model.size}: {count_parameters(self.model_cfg) / 1e6:.2f}M parameters, vocab "
                 f"{self.model_cfg.vocab_size}, context {self.model_cfg.max_seq_len} | optimizer {cfg.optim.name} lr "
                 f"{cfg.optim.lr:g} | {self.dist.world_size} rank(s) x {tc.micro_batch_size} sequences x {self.accum} "
                 f"accumulation = {tc.total_batch_size} sequences ({self.tokens_per_step} tokens) per step | "
                 f"{strategy.describe()} | weights {tc.param_dtype} | device {self.dist.device} | run dir "
                 f"{cfg.run_dir}", flush=True)

    @property
    def tokens_per_step(self) -> int:
        seq_len = self.model_cfg.max_seq_len if self.cfg.data.seq_len is None else self.cfg.data.seq_len
        return self.cfg.train.total_batch_size * seq_len

    def _build_data(self) -> None:
        from data.loader import build_train_loader, build_val_batches
        from models.sizes import flops_per_token

        tc, rank, world = self.cfg.train, self.dist.rank, self.dist.world_size
        self.loader = build_train_loader(self.cfg.data, self.tokenizer, tc.micro_batch_size, rank=rank,
                                         world_size=world)
        self.val_batches = build_val_batches(self.cfg.data, self.tokenizer, tc.micro_batch_size, tc.eval_batches,
                                             rank=rank, world_size=world)
        seq_len = self.tokens_per_step // tc.total_batch_size
        self.model_flops_per_step = flops_per_token(self.model_cfg, seq_len) * self.tokens_per_step  # for MFU
        self.peak_flops = peak_flops(self.dist.device)

    # ---------------------------------------------------------------- resume
    def resume(self) -> None:
        """Model, optimizer, schedule, data position, RNG state and step from checkpoint.resume, if any."""
        from data.loader import describe_remap, remap_train_state

        path = self.checkpoints.resolve(self.cfg.checkpoint.resume)  # verified; "auto" falls back past damaged ones
        if path is not None:
            for line in self.checkpoints.check_config(path, config_to_dict(self.cfg), self.model_config_dict):
                self.say(line, flush=True)  # refused above (ResumeError) if a setting that cannot change did
            trainer, how = self.checkpoints.load(path, model=self.model, optimizer=self.optimizer,
                                                 scheduler=self.scheduler, map_location=self.dist.device)
            saved_world = trainer["world_size"]  # another world size only if allowed (check_config refused it otherwise)
            if saved_world == self.dist.world_size:
                self.loader.load_state_dict(trainer["data"][self.dist.rank])
            else:
                remapped = remap_train_state(trainer["data"], self.loader)
                self.loader.load_state_dict(remapped)
                self.say(f"resume: world size {saved_world} -> {self.dist.world_size}; "
                         f"{describe_remap(trainer['data'], remapped)}", flush=True)
            set_rng_state(trainer["rng"])
            self.step = self.start_step = trainer["step"]
            self.resumed_from = path
            self.say(f"resume: from {path} at step {self.step} (optimizer: {how})", flush=True)
        if self.dist.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
            self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (self.cfg.run_dir / "config.yaml").write_text(self.config_yaml)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        self.resume()
        stop_at = tc.max_steps if tc.steps_per_run is None else min(tc.max_steps, self.start_step + tc.steps_per_run)
        # resume asked for but nothing to resume from: a fresh start drops what a crashed attempt logged
        fresh = -1 if cfg.checkpoint.resume else None
        self.metrics = MetricsLogger(cfg.run_dir, enabled=self.dist.is_main, tensorboard=cfg.log.tensorboard,
                                     resume_step=self.step if self.resumed_from is not None else fresh)
        self.progress = Progress(total=tc.max_steps, initial=self.step, log_every=cfg.log.log_every,
                                 enabled=self.dist.is_main, mode=cfg.log.progress_bar)
        self.window, self.started = LogWindow(), time.perf_counter()
        if self.step == 0:
            with self.window.paused():
                self.run_evaluation(0)
        batches = iter(self.loader)
        lr = grad_norm = None
        while self.step < stop_at:
            if signum := self.stop.agreed(self.step, self.strategy.max_over_ranks):
                self.stopped_by = signal.Signals(signum).name
                break
            lr, grad_norm = self.train_step(batches)
            if not self.after_step(lr, grad_norm, stop_at):
                break
        if self.window.pending:  # stopped by a signal between log steps (one process): log the last step
            self.guard.read(self.step)
            self.log_metrics(lr, grad_norm)
        self.finish()
        return self.summary()

    def train_step(self, batches) -> tuple[float, torch.Tensor]:
        """One optimizer step: (its lr, the gradient norm before clipping, on the device). A failure before
        the weights move (data, forward, backward) leaves model and optimizer at the last completed step,
        which is saved when the strategy allows (save_after_failure); the error is raised either way."""
        strategy = self.strategy
        strategy.begin_step()
        boundary = self.loader.state_dict() if strategy.can_save_after_failure else None  # after the last step
        try:
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=self.dist.device)
            self.guard.begin(self.step + 1, loss_sum)  # decided by the strategy's step (DeepSpeed's: in the last backward)
            for micro in range(self.accum):
                batch = next(batches)
                labels = batch["labels"].to(self.dist.device, non_blocking=True)
                with strategy.accumulating(last=micro == self.accum - 1):  # DDP: no all-reduce before the last
                    with self.autocast():
                        logits = self.forward(batch["input_ids"].to(self.dist.device, non_blocking=True))
                    loss = lm_loss(logits, labels) / self.accum  # mean over the global batch once summed
                    loss_sum += loss.detach()  # before backward: the guard reads it where the weights move
                    strategy.backward(loss)
            grad_norm = strategy.step(self.max_norm)  # reduce over ranks, clip, step; the norm before clipping
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        except Exception as error:
            if strategy.can_save_after_failure and self.step > self.start_step and self.saved_step != self.step:
                self.save_after_failure(boundary, error)
            raise
        self.step += 1
        return lr, grad_norm

    def after_step(self, lr: float, grad_norm: torch.Tensor, stop_at: int) -> bool:
        """Metrics, the guard's verdict, evaluation and checkpoints after a step; False: stop (diverged)."""
        step, tc = self.step, self.cfg.train
        if tc.replica_check_every and step % tc.replica_check_every == 0:
            self.checksums.append((step, self.strategy.check_replicas(step)))  # raises if ranks differ
        self.window.add(self.guard.end(grad_norm))  # no .item(): the device runs ahead until the next log step
        at_log = step % self.cfg.log.log_every == 0 or step == stop_at
        at_checkpoint = self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0
        self.diverged = self.guard.read(step) if at_log or at_checkpoint or self.guard.read_now else None
        if at_log:
            self.log_metrics(lr, grad_norm)
        if self.diverged:  # no final checkpoint: the newest good one stays the newest
            self.say(f"pretrain: {self.diverged}", file=sys.stderr, flush=True)
            self.stopped_by = "diverged"
            return False
        with self.window.paused():
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps:
                self.run_evaluation(step)
            if at_checkpoint:
                self.checkpoint(prune_now=False)  # pruned once the next step proves it healthy
        return True

    def finish(self) -> None:
        """The final checkpoint (unless diverged or nothing trained since the resumed one), then close the logs."""
        if self.stopped_by is None and self.step < self.cfg.train.max_steps:
            self.stopped_by = "steps_per_run"
        if self.saved_step != self.step and self.stopped_by != "diverged":
            if self.step > self.start_step or self.resumed_from is None:
                self.checkpoint(prune_now=True, note=f" (stopped: {self.stopped_by})" if self.stopped_by else "")
            else:  # nothing trained since the checkpoint we resumed from
                self.last_saved = str(self.resumed_from)
        if self.stopped_by != "diverged":
            self.guard.finish()  # keep_last for a checkpoint of the last step, which has no next step to prove it
        self.progress.close()
        self.metrics.close()

    # ---------------------------------------------------------------- metrics and evaluation
    def log_metrics(self, lr: float, grad_norm: torch.Tensor) -> None:
        """Where the loop waits for the device between evaluations and checkpoints (besides the guard's
        fallback, pretrain/guard.py): the pending losses and the scalars of this step; speed is the mean
        since the last log. Collective: every rank calls it at the same steps."""
        losses, step_time = self.window.take()  # already the mean over ranks (the guard reduced each)
        self.train_losses.extend(losses)
        self.guard.record(losses)
        flops = self.model_flops_per_step / step_time
        scalars = {"train/loss": losses[-1], "lr": lr, "grad_norm": float(grad_norm),
                   "train/skipped_steps": self.guard.skipped, "tokens_per_s": self.tokens_per_step / step_time,
                   "step_time": step_time, "model_tflops": flops / 1e12}  # all ranks together
        if self.peak_flops is not None:
            scalars["mfu"] = flops / (self.peak_flops * self.dist.world_size)
        if self.dist.device.type == "cuda":
            scalars["peak_memory"] = torch.cuda.max_memory_allocated(self.dist.device)  # since the last log
            torch.cuda.reset_peak_memory_stats(self.dist.device)
        stats = self.optimizer.pop_subspace_stats() if isinstance(self.optimizer, SubspaceStats) else None
        if stats and stats.get("count", 1) > 0:  # low-rank optimizers: subspace movement since the last log
            scalars.update({f"subspace/{k}": v for k, v in stats.items()})
        self.metrics.log(self.step, scalars)
        skipped = f" | skipped {self.guard.skipped}" if self.guard.skipped else ""
        self.progress.update(self.step, f"loss {losses[-1]:.4f} | lr {lr:.2e} | grad norm {scalars['grad_norm']:.3f} | "
                                        f"{scalars['tokens_per_s']:.0f} tok/s{skipped}")

    def run_evaluation(self, step: int) -> None:
        if not self.val_batches:
            return
        loss = evaluate(self.model, self.val_batches, self.dist.device, self.autocast, self.strategy.sum_over_ranks)
        self.evals.append((step, loss))
        self.metrics.log(step, {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0))})
        self.progress.write(f"step {step:>7d} | eval loss {loss:.4f} | perplexity {math.exp(min(loss, 80.0)):.2f}")

    # ---------------------------------------------------------------- checkpoints
    def save(self, prune_now: bool = True) -> str | None:
        """Checkpoint this step. Collective: every rank calls it (each writes its shards when sharded).
        None: refused, the state is not finite. prune_now False: keep_last waits until the next step
        proves it healthy."""
        model_state = self.model.state_dict()
        if not self.guard.state_is_finite(model_state, self.optimizer):
            self.say(f"checkpoint: step {self.step} not written: the weights or optimizer state hold non-finite "
                     f"values; the newest checkpoint {latest_checkpoint(self.checkpoints.root)} is kept",
                     file=sys.stderr, flush=True)
            return None
        data_states = self.strategy.gather_objects(self.loader.state_dict())  # every rank's data position
        trainer_state = {"step": self.step, "world_size": self.dist.world_size, "data": data_states,
                         "scheduler": self.scheduler.state_dict(), "rng": rng_state()}
        path = str(self.checkpoints.save(self.step, model_state=model_state, optimizer=self.optimizer,
                                         trainer_state=trainer_state, model_config=self.model_config_dict,
                                         config_yaml=self.config_yaml, prune=False))
        self.guard.saved(self.step, prune_now)
        return path

    def checkpoint(self, prune_now: bool, note: str = "") -> None:
        """Save this step unless it was skipped (its weights are an older step's, and keep_last would prune a
        good checkpoint for it) or its state is not finite."""
        if self.guard.skipping:
            self.progress.write(f"step {self.step:>7d} | checkpoint not written: the step was skipped (loss or "
                                "gradient norm not finite)")
        elif (path := self.save(prune_now)) is not None:
            self.last_saved, self.saved_step = path, self.step
            self.progress.write(f"step {self.step:>7d} | checkpoint {self.last_saved}{note}")

    def save_after_failure(self, data_position: dict, error: Exception) -> None:
        """Checkpoint the last completed step after the next one failed; a failed save is reported, and
        the caller re-raises the original error either way."""
        step = self.step
        try:
            self.loader.load_state_dict(data_position)  # un-read the failed step's batches: resume re-reads them
            path = self.save()
            if path is None:  # refused: non-finite state (the line above says so)
                return
        except Exception as save_error:
            print(f"pretrain: step {step + 1} failed ({error!r}); saving step {step} failed too "
                  f"({save_error!r}); resume from an earlier checkpoint", file=sys.stderr, flush=True)
            return
        print(f"pretrain: step {step + 1} failed ({error!r}); saved checkpoint {path} of step {step} "
              "(fix the cause and resume with --resume auto)", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        evals, losses = self.evals, self.train_losses
        return {
            "run_dir": str(self.cfg.run_dir), "start_step": self.start_step, "step": self.step,
            "max_steps": self.cfg.train.max_steps, "stopped_by": self.stopped_by, "checkpoint": self.last_saved,
            "train_losses": losses, "evals": evals, "first_eval_loss": evals[0][1] if evals else None,
            "final_eval_loss": evals[-1][1] if evals else None, "final_train_loss": losses[-1] if losses else None,
            "wall_time_s": time.perf_counter() - self.started, "mode": self.strategy.name,
            "strategy": self.strategy.describe(), "weight_checksums": self.checksums,
            "skipped_steps": self.guard.skipped, "diverged": self.diverged,
            "optimizer_state_bytes": state_tensor_bytes(self.optimizer),  # this rank's
            "optimizer_state_bytes_matrices": state_tensor_bytes(self.optimizer, matrices_only=True),
        }
