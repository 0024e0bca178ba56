"""Per-layer weight updates: step each weight inside its post-accumulate-grad hook and free its
gradient at once, so full-size gradients never coexist (GaLore's layer-wise mode).

    check_per_layer_allowed(grad_accum_steps, world_size, grad_clip)   # refuse what cannot work
    handle = attach_per_layer_updates(model, optimizer)
    for batch in batches:
        loss(model, batch).backward()       # every weight is stepped during backward
        scheduler.step()                    # no optimizer.step(), no clipping, no zero_grad needed
        norm = handle.pop_grad_norm()       # global gradient norm of that backward (for logging)
    handle.remove()

One optimizer stays in charge of every weight, so its state_dict, checkpoints and the lr
scheduler (which writes `group["lr"]`) work as with `optimizer.step()`. Optimizers with a
`step_param(p)` method (SubTrackAdamW) step p alone. Any other torch optimizer (torch.optim.AdamW,
bitsandbytes' AdamW8bit...) is stepped with `optimizer.step()` from p's hook: at that moment p is
the only parameter holding a gradient (the others are either freed by their own hook or not
computed yet; the hook checks it), so the step touches p alone. Its cost is a pass over the
parameter list per hook, negligible next to a backward.

Why the refusals (`check_per_layer_allowed`):
- gradient accumulation: each micro-batch's backward would step the weights with a partial
  gradient instead of accumulating it;
- several ranks: the gradients would have to be averaged across ranks inside each hook, which
  this module does not do (ranks would diverge);
- gradient clipping: the global norm is only known once every gradient has been computed, by
  which time the first ones were applied and freed.
"""
from __future__ import annotations

import torch
from torch import nn


def check_per_layer_allowed(grad_accum_steps: int, world_size: int, grad_clip: float) -> None:
    """Raise ValueError naming the setting and the fix when per-layer updates cannot be correct."""
    if grad_accum_steps != 1:
        raise ValueError(f"optim.per_layer needs gradient accumulation 1, got {grad_accum_steps} micro-batches per "
                         "step (each backward would step the weights with a partial gradient); set "
                         "train.micro_batch_size to train.total_batch_size (one rank), or optim.per_layer: false")
    if world_size != 1:
        raise ValueError(f"optim.per_layer runs on one rank only, got world size {world_size} (gradients are not "
                         "averaged across ranks inside the hooks); launch a single process or set "
                         "optim.per_layer: false")
    if grad_clip > 0:
        raise ValueError(f"optim.per_layer cannot clip gradients (train.grad_clip {grad_clip}): the global norm is "
                         "unknown while each gradient is applied and freed in its own hook; set train.grad_clip: 0 "
                         "or optim.per_layer: false")


class PerLayerHandle:
    """What `attach_per_layer_updates` returns: `remove()` detaches the hooks; `pop_grad_norm()`
    gives the L2 norm of every gradient applied since the last call (the unclipped global norm
    of one backward) and resets it."""

    def __init__(self, hooks: list, sq_sum: torch.Tensor):
        self._hooks = hooks
        self._sq_sum = sq_sum

    def pop_grad_norm(self) -> torch.Tensor:
        norm = self._sq_sum.sqrt()
        self._sq_sum.zero_()
        return norm

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def attach_per_layer_updates(model: nn.Module, optimizer: torch.optim.Optimizer) -> PerLayerHandle:
    """Register on every trainable weight of `model` that `optimizer` holds a post-accumulate-grad
    hook that steps it with `optimizer` and sets its .grad to None.

    Call `check_per_layer_allowed` first. Refuses a sharded optimizer (it needs all gradients
    at once to reduce them) and parameters the optimizer holds that `model` does not.
    Gradients must start as None (zero_grad(set_to_none=True)); the hooks keep them so.
    """
    from optim.sharded import ShardedOptimizer

    if isinstance(optimizer, ShardedOptimizer):
        raise ValueError("optim.per_layer cannot drive a ShardedOptimizer (it reduces and steps all gradients "
                         "at once); use the unsharded optimizer from optim.build_optimizer on one rank")
    held = _optimizer_params(optimizer)
    held_ids = {id(p) for p in held}
    model_params = [p for p in model.parameters() if p.requires_grad]
    model_ids = {id(p) for p in model_params}
    if not held_ids <= model_ids:
        raise ValueError(f"the optimizer holds {len(held_ids - model_ids)} tensors that are not trainable parameters "
                         "of the model; build the optimizer from this model")
    device = model_params[0].device if model_params else torch.device("cpu")
    sq_sum = torch.zeros((), dtype=torch.float32, device=device)
    step_param = getattr(optimizer, "step_param", None)

    def hook(p: torch.Tensor) -> None:
        with torch.no_grad():
            sq_sum.add_(p.grad.detach().float().norm().square())
            if step_param is not None:
                step_param(p)
                # What torch's wrapped optimizer.step() records: the lr scheduler then knows a
                # step happened and does not warn that it was called before optimizer.step().
                optimizer._opt_called = True
            else:
                others = [q for q in held if q is not p and q.grad is not None]
                if others:
                    raise RuntimeError(f"per-layer update of a tensor of shape {tuple(p.shape)}: {len(others)} other "
                                       "parameters still hold a gradient, so optimizer.step() would update them too; "
                                       "call optimizer.zero_grad(set_to_none=True) before the first backward")
                optimizer.step()
        p.grad = None  # freed now: at most one full-size gradient lives at a time

    hooks = [p.register_post_accumulate_grad_hook(hook) for p in model_params if id(p) in held_ids]
    return PerLayerHandle(hooks, sq_sum)


