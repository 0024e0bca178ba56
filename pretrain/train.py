"""The training loop, read top to bottom.

    set up       distributed, seed, tokenizer, model, optimizer, learning-rate schedule, data
    resume       model, optimizer, schedule, data position, RNG state and step from a checkpoint
    loop         gradient accumulation -> reduce over ranks, clip, optimizer step (the strategy) -> metrics
                 (losses and gradient norm stay on the device; read every log.log_every steps, so the
                 host waits for the device only at log, evaluation and checkpoint steps)
    evaluation   loss and perplexity on fixed validation batches: step 0, every eval_every, the end
    checkpoints  every checkpoint.every steps, on SIGTERM / SIGUSR1 / SIGINT (then exit; with several ranks
                 the signal is checked, collectively, every log_every steps), at the end
    guard        a step whose loss or gradient norm is not finite moves nothing, is counted, and
                 train.max_skipped_steps in a row stop the run (pretrain/guard.py decides on the device)

How a step is distributed is the strategy's business (train.parallelism, pretrain/strategies/:
single, replicate, zero, deepspeed, fsdp): it wraps the model, builds the optimizer, runs backward and
the reduce-clip-step, and says how the checkpoint holds the optimizer state. The loop names no mode.

`train(cfg)` runs it in-process and returns a summary; `python -m pretrain` is the CLI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import signal
import sys
import threading
import time

import torch
import torch.nn.functional as F

from pretrain import distributed, rundir
from pretrain.checkpoint import latest_checkpoint, locked_run_dir, rng_state, set_rng_state
from pretrain.config import RunConfig, config_to_dict, config_to_yaml, resolve_model_config
from pretrain.guard import DivergenceGuard
from pretrain.memory import state_tensor_bytes
from pretrain.metrics import MetricsLogger, Progress, peak_flops
from pretrain.schedule import build_scheduler

# SLURM sends SIGTERM or SIGUSR1 before preempting a job; SIGINT is Ctrl-C (a second one interrupts at once)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Remembers a SIGTERM / SIGUSR1 / SIGINT; the loop checks it at a step boundary (every step with one process,
    every log_every steps with several: the check is an all-reduce), saves and exits."""

    def __init__(self):
        self.signum = None
        self.previous = {}

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

    def agreed(self, world: int, device: torch.device) -> int | None:
        """The signal to stop for, decided alike on every rank: with several ranks a collective (a signal
        may reach one task only), and the answer is the reduced value alone. A signal that lands after the
        reduce returned is left for the next check: re-reading the flag here would stop this rank while
        its peers train on, each waiting for the other's collective."""
        if world == 1:
            return self.signum
        reduced = int(distributed.all_reduce_max(torch.tensor([float(self.signum or 0)], device=device), world).item())
        return reduced or None


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
def evaluate(model, batches: list[dict], device, autocast, world_size: int) -> float:
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
    distributed.all_reduce_sum(totals, world_size)
    return (totals[0] / totals[1].clamp(min=1)).item()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def train(cfg: RunConfig, restart: bool = False) -> dict:
    """Train as `cfg` says; returns a summary (losses, steps, where the run and its last checkpoint are).
    A run dir an earlier run used needs cfg.checkpoint.resume, or `restart` to move its contents aside
    (pretrain/rundir.py)."""
    dist = distributed.setup(cfg.train.device, cfg.train.collective_timeout_s)
    finished = False
    try:
        with locked_run_dir(cfg.run_dir, dist.rank, dist.world_size), StopRequest() as stop, \
                contextlib.ExitStack() as on_exit:  # one job per run dir; on_exit: the strategy's close()
            moved = rundir.claim(cfg.run_dir, cfg.checkpoint.resume, restart, dist.rank, dist.world_size)
            if moved and dist.is_main:
                print(moved, flush=True)
            summary = _train(cfg, dist, stop, on_exit)
        finished = True
        return summary
    finally:  # only a group setup() joined: a caller's own group stays usable
        distributed.cleanup(dist, together=finished)  # after an error a peer may be gone: no barrier


def _train(cfg: RunConfig, dist: distributed.DistInfo, stop: StopRequest, on_exit: contextlib.ExitStack) -> dict:
    from data.loader import build_tokenizer, build_train_loader, build_val_batches, describe_remap, remap_train_state
    from models.sizes import build_model, count_parameters, flops_per_token
    from pretrain.strategies import build_strategy

    tc, device, world = cfg.train, dist.device, dist.world_size
    run_dir, checkpoint_root = cfg.run_dir, cfg.run_dir / "checkpoints"
    say = print if dist.is_main else (lambda *a, **k: None)

    # ---------------------------------------------------------------- set up
    seed_everything(tc.seed)  # the same seed on every rank: identical initial weights
    tokenizer = build_tokenizer(cfg.data)
    model_cfg = resolve_model_config(cfg, tokenizer.vocab_size)
    tokenizer.check_fits(model_cfg.vocab_size)  # refuse before any step, not with an index error later
    config_yaml, model_config_dict = config_to_yaml(cfg), dataclasses.asdict(model_cfg)  # fixed for the run
    accum = tc.grad_accum_steps(world)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf  # inf: the norm is still measured, not applied
    strategy = build_strategy(cfg, dist)  # train.parallelism: single | replicate | zero | deepspeed | fsdp
    on_exit.callback(strategy.close)  # after the run, or an error: hooks removed, a group of its own left
    # bfloat16: pure-bf16 weights and gradients (GaLore's 7B recipe); optimizer bases/state stay float32
    model = build_model(model_cfg).to(device, dtype=getattr(torch, tc.param_dtype))
    optimizer = strategy.build_optimizer(model)
    forward = strategy.wrap(model, optimizer)  # the model, DDP or the DeepSpeed engine; `model` stays plain
    scheduler = build_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    loader = build_train_loader(cfg.data, tokenizer, tc.micro_batch_size, rank=dist.rank, world_size=world)
    val_batches = build_val_batches(cfg.data, tokenizer, tc.micro_batch_size, tc.eval_batches,
                                    rank=dist.rank, world_size=world)
    autocast = functools.partial(autocast_context, tc.dtype, device)  # a fresh context per use
    seq_len = model_cfg.max_seq_len if getattr(cfg.data, "seq_len", None) is None else cfg.data.seq_len
    tokens_per_step = tc.total_batch_size * seq_len
    model_flops_per_step = flops_per_token(model_cfg, seq_len) * tokens_per_step  # for MFU
    peak = peak_flops(device)
    say(f"model {cfg.model.size}: {count_parameters(model_cfg) / 1e6:.2f}M parameters, vocab {model_cfg.vocab_size}, "
        f"context {model_cfg.max_seq_len} | optimizer {cfg.optim.name} lr {cfg.optim.lr:g} | "
        f"{world} rank(s) x {tc.micro_batch_size} sequences x {accum} accumulation = {tc.total_batch_size} "
        f"sequences ({tokens_per_step} tokens) per step | {strategy.describe()} | weights {tc.param_dtype} | "
        f"device {device} | run dir {run_dir}", flush=True)
    checkpoints = strategy.checkpoint_manager(checkpoint_root, cfg.checkpoint.keep_last, say=say)
    guard = DivergenceGuard(max_skipped=tc.max_skipped_steps, spike_factor=tc.loss_spike_factor, device=device,
                            world=world, checkpoints=checkpoints, lr=cfg.optim.lr, say=say)
    strategy.attach_guard(guard)  # the strategy holds a bad step's update back

    def save(step: int, prune_now: bool = True) -> str | None:
        """Collective: every rank calls it (each writes its optimizer shard when sharded). None: refused,
        the state is not finite. prune_now False: keep_last waits until the next step proves it healthy."""
        model_state = model.state_dict()
        if not guard.state_is_finite(model_state, optimizer):
            say(f"checkpoint: step {step} not written: the weights or optimizer state hold non-finite values; "
                f"the newest checkpoint {latest_checkpoint(checkpoint_root)} is kept", file=sys.stderr, flush=True)
            return None
        data_states = distributed.all_gather_objects(loader.state_dict(), world)  # every rank's data position
        trainer_state = {"step": step, "world_size": world, "scheduler": scheduler.state_dict(),
                         "data": data_states, "rng": rng_state()}
        path = str(checkpoints.save(step, model_state=model_state, optimizer=optimizer, trainer_state=trainer_state,
                                    model_config=model_config_dict, config_yaml=config_yaml, prune=False))
        guard.saved(step, prune_now)
        return path

    # ---------------------------------------------------------------- resume
    step = 0
    resume_from = checkpoints.resolve(cfg.checkpoint.resume)  # verified; "auto" falls back past damaged ones
    if resume_from is not None:
        for line in checkpoints.check_config(resume_from, config_to_dict(cfg), model_config_dict):
            say(line, flush=True)  # refused above (ResumeError) if a setting that cannot change did
        trainer, how = checkpoints.load(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                        map_location=device)
        saved_world = trainer["world_size"]  # another world size only if allowed (check_config refused it otherwise)
        if saved_world == world:
            loader.load_state_dict(trainer["data"][dist.rank])
        else:
            remapped = remap_train_state(trainer["data"], loader)
            loader.load_state_dict(remapped)
            say(f"resume: world size {saved_world} -> {world}; {describe_remap(trainer['data'], remapped)}", flush=True)
        set_rng_state(trainer["rng"])
        step = trainer["step"]
        say(f"resume: from {resume_from} at step {step} (optimizer: {how})", flush=True)
    start_step = step
    if dist.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    stop_at = tc.max_steps if tc.steps_per_run is None else min(tc.max_steps, start_step + tc.steps_per_run)

    # ---------------------------------------------------------------- loop
    metrics = MetricsLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.log.tensorboard,
                            # resume asked for but nothing to resume from: a fresh start drops what a crashed attempt logged
                            resume_step=step if resume_from is not None else (-1 if cfg.checkpoint.resume else None))
    progress = Progress(total=tc.max_steps, initial=step, log_every=cfg.log.log_every, enabled=dist.is_main,
                        mode=cfg.log.progress_bar)
    train_losses, evals, stopped_by, checksums, diverged = [], [], None, [], None
    last_saved, saved_step = None, None  # saved_step is the same on every rank (save() is collective)
    started = window_start = time.perf_counter()
    pending = []  # each step's loss since the last log (the mean over ranks), left on the device until then
    log_every = cfg.log.log_every

    def log_metrics(step: int, lr: float, grad_norm: torch.Tensor) -> None:
        """Where the loop waits for the device between evaluations and checkpoints (besides the guard's
        fallback, pretrain/guard.py): the pending losses and the scalars of `step`; speed is the mean
        since the last log. Collective: every rank calls it at the same steps."""
        nonlocal window_start
        losses = torch.stack(pending).tolist()  # already the mean over ranks (the guard reduced each)
        train_losses.extend(losses)
        guard.record(losses)
        step_time = (time.perf_counter() - window_start) / len(pending)
        scalars = {"train/loss": train_losses[-1], "lr": lr, "grad_norm": float(grad_norm),
                   "train/skipped_steps": guard.skipped,
                   "tokens_per_s": tokens_per_step / step_time, "step_time": step_time}
        scalars["model_tflops"] = model_flops_per_step / step_time / 1e12  # all ranks together
        if peak is not None:
            scalars["mfu"] = model_flops_per_step / step_time / (peak * world)
        if device.type == "cuda":
            scalars["peak_memory"] = torch.cuda.max_memory_allocated(device)  # since the last log
            torch.cuda.reset_peak_memory_stats(device)
        stats = optimizer.pop_subspace_stats() if hasattr(optimizer, "pop_subspace_stats") else None
        if stats and stats.get("count", 1) > 0:  # low-rank optimizers: subspace movement since the last log
            scalars.update({f"subspace/{k}": v for k, v in stats.items()})
        metrics.log(step, scalars)
        progress.update(step, f"loss {train_losses[-1]:.4f} | lr {lr:.2e} | grad norm {scalars['grad_norm']:.3f} | "
                              f"{scalars['tokens_per_s']:.0f} tok/s" + (f" | skipped {guard.skipped}" * bool(guard.skipped)))
        pending.clear()
        window_start = time.perf_counter()

    @contextlib.contextmanager
    def off_the_clock():
        """Evaluation and checkpoints do not count towards the logged step time."""
        nonlocal window_start
        paused = time.perf_counter()
        yield
        window_start += time.perf_counter() - paused

    def run_evaluation(step: int) -> None:
        if not val_batches:
            return
        loss = evaluate(model, val_batches, device, autocast, world)
        evals.append((step, loss))
        metrics.log(step, {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0))})
        progress.write(f"step {step:>7d} | eval loss {loss:.4f} | perplexity {math.exp(min(loss, 80.0)):.2f}")

    def checkpoint(step: int, prune_now: bool, note: str = "") -> None:
        """Save `step` unless it was skipped (its weights are an older step's, and keep_last would prune a
        good checkpoint for it) or its state is not finite."""
        nonlocal last_saved, saved_step
        if guard.skipping:
            progress.write(f"step {step:>7d} | checkpoint not written: the step was skipped (loss or gradient norm "
                           "not finite)")
        elif (path := save(step, prune_now)) is not None:
            last_saved, saved_step = path, step
            progress.write(f"step {step:>7d} | checkpoint {last_saved}{note}")

    def save_after_failure(step: int, data_position: dict, error: Exception) -> None:
        """Checkpoint the last completed step after step + 1 failed (one process); a failed save is
        reported and the caller re-raises the original error either way."""
        try:
            loader.load_state_dict(data_position)  # un-read the failed step's batches: resume re-reads them
            path = save(step)
            if path is None:  # refused: non-finite state (the line above says so)
                return
        except Exception as save_error:
            print(f"pretrain: step {step + 1} failed ({error!r}); saving step {step} failed too "
                  f"({save_error!r}); resume from an earlier checkpoint", file=sys.stderr, flush=True)
            return
        print(f"pretrain: step {step + 1} failed ({error!r}); saved checkpoint {path} of step {step} "
              "(fix the cause and resume with --resume auto)", file=sys.stderr, flush=True)

    if step == 0:
        with off_the_clock():
            run_evaluation(0)
    batches = iter(loader)
    while step < stop_at:
        # A stop is honoured at the next step with one process; with several, within log_every steps
        # (a collective, so every rank asks at the same steps).
        if (world == 1 or step % log_every == 0) and (signum := stop.agreed(world, device)):
            stopped_by = signal.Signals(signum).name
            break

        # A failure in this step before the weights move (data, forward, backward) leaves the model and
        # optimizer at the last completed step: save it, then re-raise. One process only: with several
        # ranks a collective save could hang when only one rank failed.
        boundary = loader.state_dict() if world == 1 else None  # the data position after the last step
        weights_moving = False
        try:
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            guard.begin(step + 1, loss_sum)  # decided by the strategy's step (DeepSpeed's: inside the last backward)
            for micro in range(accum):
                batch = next(batches)
                labels = batch["labels"].to(device, non_blocking=True)
                with strategy.accumulating(last=micro == accum - 1):  # DDP: no all-reduce before the last
                    with autocast():
                        logits = forward(batch["input_ids"].to(device, non_blocking=True))
                    loss = lm_loss(logits, labels) / accum  # mean over the global batch once summed
                    weights_moving = weights_moving or strategy.steps_in_backward  # per-layer hooks, DeepSpeed
                    loss_sum += loss.detach()  # before backward: the guard reads it where the weights move
                    strategy.backward(loss)

            weights_moving = True  # from here the optimizer changes weights and state
            grad_norm = strategy.step(max_norm)  # reduce over ranks, clip, step; the norm before clipping
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        except Exception as error:
            if world == 1 and not weights_moving and step > start_step and saved_step != step:
                save_after_failure(step, boundary, error)
            raise
        if tc.replica_check_every and step % tc.replica_check_every == 0:
            checksums.append((step, distributed.check_replicas(model, world, step)))  # raises if ranks differ
        pending.append(guard.end(grad_norm))  # no .item(): the device runs ahead until the next log step
        at_log = step % log_every == 0 or step == stop_at
        at_checkpoint = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        diverged = guard.read(step) if at_log or at_checkpoint or guard.read_now else None
        if at_log:
            log_metrics(step, lr, grad_norm)
        if diverged:  # no final checkpoint: the newest good one stays the newest
            say(f"pretrain: {diverged}", file=sys.stderr, flush=True)
            stopped_by = "diverged"
            break

        with off_the_clock():
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps:
                run_evaluation(step)
            if at_checkpoint:
                checkpoint(step, prune_now=False)  # pruned once the next step proves it healthy

    if pending:  # stopped by a signal between log steps (one process): log the last step
        guard.read(step)
        log_metrics(step, lr, grad_norm)

    # ---------------------------------------------------------------- final checkpoint
    if stopped_by is None and step < tc.max_steps:
        stopped_by = "steps_per_run"
    if saved_step != step and stopped_by != "diverged":
        if step > start_step or resume_from is None:
            checkpoint(step, prune_now=True, note=f" (stopped: {stopped_by})" if stopped_by else "")
        else:  # nothing trained since the checkpoint we resumed from
            last_saved = str(resume_from)
    if stopped_by != "diverged":
        guard.finish()  # keep_last for a checkpoint of the last step, which has no next step to prove it
    progress.close()
    metrics.close()
    return {
        "run_dir": str(run_dir), "start_step": start_step, "step": step, "max_steps": tc.max_steps,
        "stopped_by": stopped_by, "checkpoint": last_saved, "train_losses": train_losses, "evals": evals,
        "first_eval_loss": evals[0][1] if evals else None, "final_eval_loss": evals[-1][1] if evals else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "wall_time_s": time.perf_counter() - started, "mode": strategy.name, "strategy": strategy.describe(),
        "weight_checksums": checksums, "skipped_steps": guard.skipped, "diverged": diverged,
        "optimizer_state_bytes": state_tensor_bytes(optimizer),  # this rank's
        "optimizer_state_bytes_matrices": state_tensor_bytes(optimizer, matrices_only=True),
    }
