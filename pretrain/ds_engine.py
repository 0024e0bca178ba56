"""The one module that imports DeepSpeed: its engine at ZeRO stage 0 around our optimizer.

DeepSpeed runs the launcher, gradient averaging and its TensorBoard monitor; the
optimizer is ours (optim.sharded.ShardedOptimizer with `reduce_gradients=False`, which shards
optimizer state by whole matrices), and so is mixed precision (torch.autocast in the loop).
Settings that would hand a matrix optimizer flattened weights are refused before DeepSpeed is
imported (docs/architecture.md, "Matrix-granular ZeRO sharding"): ZeRO stage >= 1 (one flat 1-D
partition per rank) and the bf16 / fp16 sections (on GPUs, BF16_Optimizer flattens too).

Gradient clipping comes from the JSON (or the run config for "auto"); with the sharded
optimizer it is applied in the optimizer's step by the true global norm (`_route_clipping`).

Config values "auto" are filled from the run config (as Hugging Face's integration does); a
number that disagrees with the run config is an error, so there is one source of truth.

Training loop use (one optimizer step per `grad_accum_steps` micro-batches):

    engine = ds_engine.initialize(model, optimizer, path, micro_batch_size=B, grad_accum_steps=A,
                                  gradient_clipping=max_norm, tensorboard_dir=run_dir)
    loss = loss_fn(engine(input_ids), labels)
    engine.backward(loss)   # DeepSpeed divides by A and averages over ranks at the boundary
    engine.step()           # clips and steps only at the accumulation boundary
"""
import json
import math
import os

import torch

from optim.sharded import ShardedOptimizer

STAGE0_HINT = ("use ZeRO stage 0 (configs/deepspeed/zero0.json) with the sharded optimizer "
               "(optim/sharded.py), which shards optimizer state by whole matrices")


def load_config(path: str, *, micro_batch_size: int, grad_accum_steps: int = 1, gradient_clipping: float = 0.0,
                tensorboard_dir: str | None = None) -> dict:
    """Read a DeepSpeed JSON config, refuse what would flatten weights, fill the "auto" values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config {path} not found; the shipped ones are in configs/deepspeed/")
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    check_config(config, path)
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch_size),
                       ("gradient_accumulation_steps", grad_accum_steps),
                       ("gradient_clipping", float(gradient_clipping))):
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(f"{path}: {key} = {given} disagrees with the run config ({value}); set it to \"auto\"")
        config[key] = value
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x world
    board = config.get("tensorboard", {})
    if board.get("enabled") and board.get("output_path", "auto") == "auto":
        if tensorboard_dir is None:
            raise ValueError(f"{path}: tensorboard.output_path is \"auto\" but no tensorboard_dir was given")
        board["output_path"] = tensorboard_dir
    return config


def check_config(config: dict, path: str = "DeepSpeed config") -> None:
    """Raise ValueError for settings that hand the client optimizer flattened weights, or that
    would make DeepSpeed own what the training loop owns."""
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage >= 1:
        raise ValueError(f"{path}: zero_optimization.stage = {stage} hands the client optimizer one flattened "
                         f"1-D partition, which a matrix optimizer cannot project; {STAGE0_HINT}")
    for section in ("bf16", "fp16", "amp", "torch_autocast"):
        if config.get(section, {}).get("enabled", False):
            raise ValueError(f"{path}: {section}.enabled is true, but mixed precision stays in the training loop "
                             "(torch.autocast, train.precision): on GPUs DeepSpeed's bf16 optimizer wrapper flattens "
                             f"the weights a matrix optimizer needs whole. Set {section}.enabled to false; {STAGE0_HINT}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"{path}: remove the \"{section}\" section; the optimizer and its learning-rate "
                             "schedule come from the run config (optim:, train:)")


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: str, *, micro_batch_size: int,
               grad_accum_steps: int = 1, gradient_clipping: float = 0.0, tensorboard_dir: str | None = None):
    """`deepspeed.initialize` at ZeRO stage 0 with `optimizer` as the client optimizer.

    The process group must already be initialised (pretrain/distributed.py); DeepSpeed adopts
    it. Returns the engine; `engine.module` is `model`, `engine.optimizer` is `optimizer`.
    """
    config = load_config(ds_config, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                         gradient_clipping=gradient_clipping, tensorboard_dir=tensorboard_dir)
    sharded = isinstance(optimizer, ShardedOptimizer)  # the project's own; any torch optimizer works too
    if sharded and optimizer.reduce_gradients:
        raise ValueError("the DeepSpeed engine already averages gradients: build the ShardedOptimizer with "
                         "reduce_gradients=False")
    if sharded:
        _route_clipping(config, optimizer)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if engine.optimizer is not optimizer:
        raise RuntimeError(f"DeepSpeed wrapped the client optimizer in {type(engine.optimizer).__name__}, which "
                           f"would hand it flattened weights; {STAGE0_HINT}")
    if sharded:
        # DeepSpeed may have swapped parameters for clones; the sharded optimizer keys them by name.
        optimizer.bind(engine.module.named_parameters())
    return engine


def _route_clipping(config: dict, optimizer) -> None:
    """With the sharded optimizer, clipping happens in its step(): the true global norm over the
    owners' gradients, the same numbers as torch's clip_grad_norm_ in one process, and DeepSpeed
    reports it (`engine.get_global_grad_norm()` reads the optimizer's `_global_grad_norm`).
    DeepSpeed's own stage-0 clipping sums the norm in another order and records no norm."""
    # inf when clipping is off: the norm is still computed (one small all-reduce) and reported
    optimizer.max_grad_norm = config["gradient_clipping"] or math.inf
    config["gradient_clipping"] = 0.0
