"""``python -m pretrain.bench memory``: analytic memory of a training step, and the measured
peak beside it on a GPU.

    python -m pretrain.bench memory --model 7b --optim subtrack++ --state-bits 8 --per-layer --batch 1 --seq 256
    python -m pretrain.bench memory --table --batch 1 --seq 256     # AdamW / 8-bit / GaLore / SubTrack++, 1b and 7b
    python -m pretrain.bench memory --model 7b --optim subtrack++ --state-bits 8 --shards 8 --no-measure  # FSDP2, per process
    python -m pretrain.bench memory --frontier --model 7b          # every method of the convergence frontier, per GPU

--table also prints the FSDP2 figures per process, over --shards processes (8 unless given).

Figures are GB (10^9 bytes). The formulas and their assumptions are in pretrain/memory.py.
"""
from __future__ import annotations

import argparse

import torch

from models.sizes import PAPER_RANK, count_parameters, get_config
from optim.factory import PRESETS
from pretrain import memory

GB = 1e9
LINES = [  # (label, key) of the breakdown, in print order
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("optimizer state", "optimizer_state"),
    ("  low-rank bases", "state_basis"),
    ("  low-rank moments", "state_moments"),
    ("  AdamW moments (other weights)", "state_adamw"),
    ("  counters", "state_scalars"),
    ("activations (saved by forward)", "activations"),
    ("  + one block recomputed", "activations_recompute"),
    ("  + loss gradients (backward start)", "loss_backward"),
    ("autocast weight copies", "autocast_cache"),
    ("optimizer step temporaries", "step_temporaries"),
    ("FSDP all-gathered blocks (2, full weights)", "gathered_weights"),
    ("FSDP one block's full gradient", "gathered_gradient"),
    ("total: weights+grads+state+activations", "total"),
    ("estimated peak", "peak"),
]
TABLE_ROWS = [  # (label, optimizer, state_bits)
    ("AdamW", "adamw", 32),
    ("AdamW 8-bit", "adamw", 8),
    ("GaLore 8-bit", "galore", 8),
    ("SubTrack++ 8-bit", "subtrack++", 8),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pretrain.bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="7b", help="a size of models.SIZES (default 7b)")
    parser.add_argument("--optim", default="subtrack++", choices=sorted(PRESETS))
    parser.add_argument("--rank", type=int, default=None, help="low-rank r (default: the paper's for the size)")
    parser.add_argument("--state-bits", type=int, default=32, choices=(32, 8))
    parser.add_argument("--per-layer", action="store_true", help="step each weight in its gradient hook")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size B")
    parser.add_argument("--seq", type=int, default=256, help="sequence length T")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="weights and gradients")
    parser.add_argument("--autocast", action="store_true", help="fp32 weights under bf16 autocast (use --dtype fp32)")
    parser.add_argument("--basis-dtype", default="fp32", choices=("bf16", "fp32"))
    parser.add_argument("--shards", type=int, default=1,
                        help="FSDP2 over this many processes: figures per process (default 1, no FSDP)")
    parser.add_argument("--table", action="store_true", help="the comparison tables for 1b and 7b")
    parser.add_argument("--frontier", action="store_true",
                        help="optimizer state and peak of every frontier method at --model, per GPU")
    parser.add_argument("--steps", type=int, default=3, help="steps measured on a GPU (after one warm-up step)")
    parser.add_argument("--no-measure", action="store_true", help="skip the GPU measurement")
    parser.add_argument("--measure-cpu", action="store_true",
                        help="measure on the CPU instead (tensor bytes; small models only; CPU step temporaries)")
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    # one line each, no usage dump: these are values, not a misspelt command line
    if args.shards < 1:
        raise SystemExit(f"--shards must be a number of processes >= 1, got {args.shards}")
    if args.shards > 1 and args.per_layer:
        raise SystemExit("--per-layer runs on one process (optim/per_layer.py); drop it or use --shards 1")
    return args


def paper_rank(size: str, rank: int | None) -> int:
    if rank is not None:
        return rank
    if size not in PAPER_RANK:
        raise SystemExit(f"no paper rank for size {size!r}; pass --rank (paper sizes: {', '.join(PAPER_RANK)})")
    return PAPER_RANK[size][0]


def describe(args, rank) -> str:
    cfg = get_config(args.model)
    optim = args.optim if args.optim == "adamw" else f"{args.optim} rank {rank}"
    return (f"{args.model} ({count_parameters(cfg) / 1e9:.2f}B parameters), {optim}, {args.state_bits}-bit state, "
            f"{'per-layer updates' if args.per_layer else 'one optimizer step'}, "
            f"{'activation checkpointing' if args.checkpointing else 'no checkpointing'}, "
            f"batch {args.batch} x {args.seq} tokens, {args.dtype}{' + autocast' if args.autocast else ''}"
            + (f", FSDP2 over {args.shards} processes (per process; right-side projection)" if args.shards > 1 else ""))


def breakdown(args) -> int:
    rank = paper_rank(args.model, args.rank) if args.optim != "adamw" else None
    est = memory.estimate(args.model, args.optim, rank=rank, state_bits=args.state_bits, per_layer=args.per_layer,
                          checkpointing=args.checkpointing, batch=args.batch, seq=args.seq, dtype=args.dtype,
                          autocast=args.autocast, basis_dtype=args.basis_dtype,
                          device="cpu" if args.measure_cpu else "cuda", shards=args.shards)
    print(f"memory of one training step: {describe(args, rank)}")
    print(f"{'':42s} {'GB':>8s}")
    for label, key in LINES:
        if key in ("autocast_cache", "activations_recompute", "gathered_weights", "gathered_gradient") and not est[key]:
            continue
        print(f"{label:42s} {est[key] / GB:8.2f}")
    device = torch.device("cuda") if torch.cuda.is_available() and not args.measure_cpu else torch.device("cpu")
    if args.no_measure or (device.type == "cpu" and not args.measure_cpu):
        return 0
    if args.shards > 1:  # the measurement below is one process's whole model
        print(f"(not measured: FSDP over {args.shards} processes is not measured here)")
        return 0
    try:
        measured = measure_peak(args, rank, device)
    except NotImplementedError as err:  # e.g. an optimizer setting the factory does not offer yet
        print(f"(not measured: {err})")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu tensors"
    label = f"measured peak ({name}, {args.steps} steps)"
    print(f"{label:42s} {measured / GB:8.2f}   (estimate / measured = {est['peak'] / measured:.3f})")
    return 0


def table(args) -> int:
    print(f"Estimated peak memory (GB) of one training step, batch {args.batch} x {args.seq} tokens, {args.dtype} "
          f"weights, float32 bases; rank {PAPER_RANK['1b'][0]} (1b) and {PAPER_RANK['7b'][0]} (7b).\n")
    settings = [("", False, False), ("per-layer", True, False), ("checkpointing", False, True),
                ("per-layer + checkpointing", True, True)]
    print("| model | optimizer | updates / activations | weights | gradients | optimizer state | activations | peak |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for size in ("1b", "7b"):
        for label, optim, bits in TABLE_ROWS:
            for setting, per_layer, checkpointing in settings:
                est = memory.estimate(size, optim, rank=PAPER_RANK[size][0], state_bits=bits, per_layer=per_layer,
                                      checkpointing=checkpointing, batch=args.batch, seq=args.seq, dtype=args.dtype,
                                      basis_dtype=args.basis_dtype)
                cells = [est[k] / GB for k in ("weights", "gradients", "optimizer_state", "activations", "peak")]
                print(f"| {size} | {label} | {setting or 'plain'} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    shards = args.shards if args.shards > 1 else 8
    print(f"\nFSDP2 over {shards} processes, per process: weights, gradients and AdamW / low-rank moments by "
          f"rows (/ {shards}); low-rank bases P (right side, r x n) and counters whole on every process; "
          "all-gathered: 2 blocks' full weights + 1 block's full gradient. Per-layer updates are single-process.\n")
    print("| model | optimizer | setting | weights | gradients | optimizer state | (of which bases) "
          "| activations | all-gathered | peak |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in ("1b", "7b"):
        for label, optim, bits in TABLE_ROWS:
            for setting, checkpointing in (("plain", False), ("checkpointing", True)):
                est = memory.estimate(size, optim, rank=PAPER_RANK[size][0], state_bits=bits,
                                      checkpointing=checkpointing, batch=args.batch, seq=args.seq, dtype=args.dtype,
                                      basis_dtype=args.basis_dtype, shards=shards)
                cells = [est["weights"], est["gradients"], est["optimizer_state"], est["state_basis"],
                         est["activations"], est["gathered_weights"] + est["gathered_gradient"], est["peak"]]
                print(f"| {size} | {label} | {setting} | " + " | ".join(f"{c / GB:.2f}" for c in cells) + " |")
    return 0


FRONTIER_ROWS = [  # (label, optimizer, state_bits): the methods of `pretrain.bench convergence --frontier`
    ("AdamW", "adamw", 32), ("AdamW 8-bit (adamw8bit)", "adamw8bit", 8), ("Muon", "muon", 32),
    ("Adafactor", "adafactor", 32), ("APOLLO", "apollo", 32), ("APOLLO-Mini", "apollo-mini", 32),
    ("GaLore", "galore", 32), ("Fira", "fira", 32), ("SubTrack++", "subtrack++", 32),
    ("SubTrack++ 8-bit", "subtrack++", 8), ("subtrack-adafactor", "subtrack-adafactor", 32),
    ("subtrack-muon", "subtrack-muon", 32),
]


def frontier(args) -> int:
    """Per GPU at --model: one process (the state whole), and `zero` over 8 ranks (state split by whole
    matrices, about 1/8 each: optim/sharding balances the shards)."""
    rank = paper_rank(args.model, args.rank)
    print(f"Optimizer state and estimated peak (GB) per GPU at {args.model}, batch {args.batch} x {args.seq}, "
          f"{args.dtype} weights, rank {rank} where a method projects; `zero` over 8 ranks divides the state "
          "by whole matrices.\n")
    print("| optimizer | state: matrices | state: total | peak, one GPU | state per GPU, zero x 8 |")
    print("|---|---:|---:|---:|---:|")
    for label, optim, bits in FRONTIER_ROWS:
        est = memory.estimate(args.model, optim, rank=rank, state_bits=bits, batch=args.batch, seq=args.seq,
                              dtype=args.dtype, basis_dtype=args.basis_dtype)
        cells = (est["state_matrices"], est["optimizer_state"], est["peak"], est["optimizer_state"] / 8)
        print(f"| {label} | " + " | ".join(f"{c / GB:.2f}" for c in cells) + " |")
    return 0


def measure_peak(args, rank, device: torch.device) -> int:
    """Peak bytes allocated over `args.steps` steps after a warm-up step.

    CUDA: the caching allocator's max_memory_allocated. CPU (--measure-cpu, small models):
    live tensor storage from the profiler (pretrain.memory.measure_cpu_peak). Pure `dtype`
    weights as the estimate assumes (fp32 + autocast with --autocast), the optimizer of
    optim.factory (bitsandbytes' AdamW8bit for AdamW 8-bit), per-layer updates through
    post-accumulate-grad hooks, the loss of pretrain/train.py without keeping the logits.
    """
    import torch.nn.functional as F

    from models.sizes import build_model

    dtype = torch.float32 if args.dtype == "fp32" or args.autocast else torch.bfloat16
    with torch.device("meta"):  # allocate once, in the final dtype, on the final device
        model = build_model(args.model, activation_checkpointing=args.checkpointing).to(dtype)
    model = model.to_empty(device=device)
    model.init_weights()
    optimizer = _build_optimizer(model, args, rank)
    if args.per_layer:
        def hook(p):
            optimizer.step()  # only p has a gradient at this moment
            p.grad = None

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(hook)
    vocab = model.cfg.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast)

    def step():
        with autocast:
            logits = model(ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        del logits
        loss.backward()
        if not args.per_layer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def steps():
        for _ in range(args.steps):
            step()

    step()
    if device.type == "cpu":
        return memory.measure_cpu_peak(steps)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    steps()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _build_optimizer(model, args, rank):
    from optim.factory import OptimConfig, build_optimizer

    cfg = OptimConfig(name=args.optim, rank=rank or 128, update_interval=10**6, state_bits=args.state_bits)
    if args.optim == "adamw" and args.state_bits == 8:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return build_optimizer(model, cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.frontier:
        return frontier(args)
    return table(args) if args.table else breakdown(args)
