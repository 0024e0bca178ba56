"""Bytes moved and step time per step on N gloo ranks: the replicate (DDP), zero and fsdp strategies.

    python -m pretrain.bench comm [--model 20m] [--world-size 2] [--steps 5] ...

Setups, each on the same model and random batches; the strategies' rows run the training loop's
own strategy objects (pretrain/strategies/: parallelize, bind, backward, step with clipping at 1.0):
  replicate-adamw       train.parallelism=replicate: DDP all-reduces gradients, every rank steps full AdamW
  ddp+sharded-adamw     DDP all-reduce, ShardedOptimizer steps its shard and all-gathers (3x model bytes)
  zero-adamw            train.parallelism=zero: ShardedOptimizer reduce-scatters gradients and all-gathers
                        weights (ZeRO-2: 2x)
  zero-subtrack++       the same with SubTrack++ as the inner optimizer
  fsdp-adamw            train.parallelism=fsdp: FSDP2 all-gathers each block's weights for forward and again
                        for backward, reduce-scatters its gradients; torch AdamW steps the row shards
  fsdp-subtrack++       the same with SubTrack++ on the row shards (proj_type right; the limiter's all-reduce)

The last column is what each rank holds of weights + gradients + optimizer state (after the step,
before zero_grad): FSDP divides all three by N, the others only the state.

Bytes are counted at the collectives (DDP through a comm hook, the sharded optimizer through its
`comm_bytes`, FSDP2 and the row-sharded optimizer at torch.distributed's all_gather_single /
reduce_scatter_single / all_reduce: the size S of each flat buffer, padding included) and reported as what each rank
sends under the usual ring algorithms (all-reduce 2(N-1)/N x S; reduce-scatter and all-gather
(N-1)/N x S of the full buffer), the figure that sets the time on a bandwidth-bound network.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import typing


class Setup(typing.NamedTuple):
    mode: str  # a strategy of pretrain/strategies/, or "ddp+sharded" (no strategy of the loop)
    optim: str
    optim_settings: dict = {}
    count_at_torch: bool = False  # FSDP2's collectives: counted at torch.distributed (no hook or comm_bytes)


FSDP_SIDE = {"proj_type": "right"}  # FSDP2's row shards need right-side bases
SETUPS = {"replicate-adamw": Setup("replicate", "adamw"), "ddp+sharded-adamw": Setup("ddp+sharded", "adamw"),
          "zero-adamw": Setup("zero", "adamw"), "zero-subtrack++": Setup("zero", "subtrack++"),
          "fsdp-adamw": Setup("fsdp", "adamw", FSDP_SIDE, True),
          "fsdp-subtrack++": Setup("fsdp", "subtrack++", FSDP_SIDE, True)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain.bench comm", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="20m", help="model size from models.sizes.SIZES (default 20m)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=64, help="SubTrack++ rank r")
    p.add_argument("--update-interval", type=int, default=200, help="SubTrack++ subspace update interval")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {','.join(SETUPS)}")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--start-method", choices=("spawn", "fork"), default="spawn",
                   help="how the ranks start: spawn (fresh interpreters), or fork (they inherit this process's "
                        "imports: seconds faster where torch and bitsandbytes are already loaded, e.g. under pytest)")
    return p.parse_args(argv)


def _ring_sent(kind: str, payload: int, world: int) -> float:
    return payload * (2 if kind == "all_reduce" else 1) * (world - 1) / world


@contextlib.contextmanager
def counting_collectives(counted: dict):
    """Add to counted[kind] the full-buffer bytes of each collective called through torch.distributed's
    module functions (how FSDP2 and the row-sharded optimizer call them; DDP and the whole-matrix sharded
    optimizer are counted by their own hooks, outside this)."""
    import torch.distributed as dist

    from optim.nbytes import tensor_bytes

    # name -> (kind, position and keyword of the full-size buffer)
    watched = {"all_gather_single": ("all_gather", 0, "output_tensor"),
               "reduce_scatter_single": ("reduce_scatter", 1, "input"), "all_reduce": ("all_reduce", 0, "tensor")}
    originals = {name: getattr(dist, name) for name in watched}

    def counting(name):
        kind, position, keyword = watched[name]

        def call(*args, **kwargs):
            buffer = kwargs[keyword] if keyword in kwargs else args[position]
            counted[kind] = counted.get(kind, 0) + tensor_bytes(buffer)
            return originals[name](*args, **kwargs)
        return call

    for name in watched:
        setattr(dist, name, counting(name))
    try:
        yield counted
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _run_setup(setup, args, rank, world):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from models.sizes import build_model
    from optim.factory import OptimConfig
    from optim.nbytes import tensor_bytes
    from optim.sharded import build_sharded_optimizer
    from pretrain.config import RunConfig, TrainConfig
    from pretrain.distributed import DistInfo
    from pretrain.memory import state_tensor_bytes
    from pretrain.strategies import STRATEGIES, Zero

    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    mode, name, extra, count_at_torch = SETUPS[setup]
    cfg = RunConfig(optim=OptimConfig(name=name, rank=args.rank, update_interval=args.update_interval, **extra),
                    train=TrainConfig(micro_batch_size=args.batch_size, total_batch_size=args.batch_size * world))
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    if mode not in STRATEGIES:  # ddp+sharded, no strategy of the loop: DDP averages, then zero's clip and sharded step
        strategy = Zero(cfg, info)
        strategy.bind(model, build_sharded_optimizer(model, cfg.optim, reduce_gradients=False))
        opt, forward = strategy.optimizer, DistributedDataParallel(model)
    else:
        strategy = STRATEGIES[mode](cfg, info)
        model = strategy.parallelize(model)
        opt = strategy.build_optimizer(model)
        forward = strategy.bind(model, opt)
    counted = {"all_reduce": 0}
    if isinstance(forward, DistributedDataParallel):
        def counting_hook(state, bucket):
            counted["all_reduce"] += tensor_bytes(bucket.buffer())
            return allreduce_hook(state, bucket)

        forward.register_comm_hook(None, counting_hook)

    def moved():  # bytes handed to collectives so far, by kind (DDP's hook + the sharded optimizer + FSDP2)
        out = dict(getattr(opt, "comm_bytes", {}))
        for kind, nbytes in counted.items():
            out[kind] = out.get(kind, 0) + nbytes
        return out

    gen = torch.Generator().manual_seed(rank)
    times, bytes_per_step = [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
        before = moved()
        dist.barrier()
        start = time.perf_counter()
        with counting_collectives(counted) if count_at_torch else contextlib.nullcontext():
            with strategy.accumulating(last=True):
                logits = forward(tokens[:, :-1])
                strategy.backward(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))
            strategy.step(1.0)  # reduce, clip at 1.0, step
        held = tensor_bytes([(p, p.grad) for p in model.parameters()])  # a DTensor counts its local shard
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        after = moved()
        if step >= args.warmup:
            times.append(elapsed)
            bytes_per_step.append({k: after[k] - before.get(k, 0) for k in after})
    per_kind = {k: statistics.mean(b[k] for b in bytes_per_step) for k in bytes_per_step[0]}
    per_kind = {k: v for k, v in per_kind.items() if v}
    state = opt.state_bytes() if hasattr(opt, "state_bytes") else state_tensor_bytes(opt)
    return {
        "setup": setup,
        "params": sum(p.numel() for p in model.parameters()),
        "payload_bytes": per_kind,
        "sent_per_rank_bytes": {k: _ring_sent(k, v, world) for k, v in per_kind.items()},
        "sent_per_rank": sum(_ring_sent(k, v, world) for k, v in per_kind.items()),
        "step_s": statistics.median(times),
        "state_bytes": state,
        "held_bytes": held + state,  # weights + gradients + optimizer state on this rank
    }


def _rank_main(rank, world, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [_run_setup(s, args, rank, world) for s in args.setups.split(",")]
        states = [None] * world
        dist.all_gather_object(states, [(r["state_bytes"], r["held_bytes"]) for r in results])
        for i, r in enumerate(results):
            r["state_bytes_per_rank"] = [s[i][0] for s in states]
            r["held_bytes_per_rank"] = [s[i][1] for s in states]
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(results, args) -> str:
    base = results[0]
    mb = 1 / 2 ** 20
    lines = [f"comm benchmark: model {args.model} ({base['params'] / 1e6:.1f}M params, vocab {args.vocab_size}), "
             f"{args.world_size} ranks (gloo, CPU, 1 thread each), {args.batch_size} x {args.seq_len} tokens per rank, "
             f"median of {args.steps} steps after {args.warmup} warm-up",
             f"{'setup':22s} {'sent/rank MB/step':>18s} {'x':>6s} {'step ms':>9s} {'x':>6s} "
             f"{'opt state MB/rank':>18s} {'x':>6s} {'w+g+state MB/rank':>18s} {'x':>6s}"]
    for r in results:
        state, held = max(r["state_bytes_per_rank"]), max(r["held_bytes_per_rank"])
        lines.append(f"{r['setup']:22s} {r['sent_per_rank'] * mb:18.1f} "
                     f"{r['sent_per_rank'] / base['sent_per_rank']:6.2f} {r['step_s'] * 1e3:9.0f} "
                     f"{r['step_s'] / base['step_s']:6.2f} {state * mb:18.1f} "
                     f"{state / max(base['state_bytes_per_rank']):6.2f} {held * mb:18.1f} "
                     f"{held / max(base['held_bytes_per_rank']):6.2f}")
    lines.append("x: ratio to the first row. sent/rank by collective (MB): " + "; ".join(
        f"{r['setup']}: " + ", ".join(f"{k} {v * mb:.2f}" for k, v in r["sent_per_rank_bytes"].items())
        for r in results))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args.setups.split(",")) - set(SETUPS)
    if unknown:
        print(f"comm: unknown setups {sorted(unknown)}; choose from {', '.join(SETUPS)}", file=sys.stderr)
        return 2
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.json")
        mp.start_processes(_rank_main, args=(args.world_size, _free_port(), args, out_path),
                           nprocs=args.world_size, start_method=args.start_method)
        with open(out_path) as f:
            results = json.load(f)
    print(format_table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
