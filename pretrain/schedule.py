"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GaLore / SubTrack++ recipe).

The multiplier of optimizer step s (0-based, the s-th call of optimizer.step()) is

    (s + 1) / warmup                                         for s < warmup
    r + (1 - r) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (max_steps - warmup)   otherwise

with r = min_lr_ratio and p clipped to 1: the first step already moves, the peak lr is reached
on the last warmup step and the lr ends at r * lr.
"""
import functools
import math

import torch


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_multiplier` to every group's lr; its state_dict holds plain numbers only."""
    fn = functools.partial(lr_multiplier, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def rebase(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """Make `base_lrs` the peak lrs of a loaded scheduler (its saved ones would win otherwise) and
    set each group's current lr as the schedule gives it at the scheduler's step: a changed optim.lr
    takes effect on resume, an unchanged one gives the same floats as LambdaLR itself."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, fn in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    # get_last_lr() reads this private list, which LambdaLR only refreshes inside step(); torch offers
    # no public setter, and without it the first log line after a resume would show the saved lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
