"""`python -m pretrain.bench optimizer`: step time, subspace-update time and state bytes, side by side.

For each model size, the projected weights of one transformer layer (q, k, v, o, gate, up,
down at that size's shapes, rank and update interval from models.sizes.PAPER_RANK) are
stepped by AdamW, GaLore, Fira and SubTrack++ in one process on random gradients:

    normal step     an optimizer step with no subspace update
    update step     a step that also moves the subspace (GaLore / Fira: SVD of the gradient;
                    SubTrack++: one rank-1 geodesic step); "cost" = update - normal
    amortised       normal + cost / update interval: the average step at the paper's interval
    state           optimizer-state bytes of these weights (bases included)

Ratios are to AdamW (step, state) and to GaLore (update cost). A second table times the subspace
update alone per distinct weight shape (SVD refresh vs geodesic step, the pure functions).
Bases start from a random orthonormal matrix (the initial SVD is not measured) and a warm-up
step precedes the timed ones.

    python -m pretrain.bench optimizer                        # 60m, 350m, 1b on this CPU
    python -m pretrain.bench optimizer --sizes 60m --repeats 5
    python -m pretrain.bench optimizer --threads 1 --clock cpu   # on a busy shared machine
    python -m pretrain.bench optimizer --device cuda --sizes 60m,350m,1b,7b
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from models.sizes import PAPER_RANK, SIZES
from optim import grassmann as gm
from optim.factory import PRESETS
from optim.nbytes import tensor_bytes
from optim.subtrack import SubTrackAdamW

METHODS = ("adamw", "galore", "fira", "subtrack++")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: robust on a shared machine
clock = CLOCKS["wall"]


def layer_shapes(size: str) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out, in)) of one layer's projected weights at `size`."""
    cfg = SIZES[size]
    d, ffn, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    return [("q_proj", (d, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, d)),
            ("gate_proj", (ffn, d)), ("up_proj", (ffn, d)), ("down_proj", (d, ffn))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(method: str, params: list[torch.Tensor], rank: int, interval: int) -> torch.optim.Optimizer:
    if method == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, eps=1e-6)
    choices = PRESETS[method]
    group = {"params": params, "rank": rank, "update_proj_gap": interval, "scale": 0.25, **choices}
    return SubTrackAdamW([group], lr=1e-3)


def timed_steps(opt: torch.optim.Optimizer, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` optimizer steps."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        opt.step()
        synchronize(device)
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the state's tensors, 0-d counters left out."""
    return tensor_bytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0])


def bench_size(size: str, method: str, repeats: int, update_repeats: int, device: torch.device) -> dict:
    rank, interval = PAPER_RANK[size]
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for _, shape in layer_shapes(size):
        p = torch.nn.Parameter(torch.randn(*shape, device=device, generator=g) * 0.02)
        p.grad = torch.randn(*shape, device=device, generator=g)
        params.append(p)
    opt = build(method, params, rank, interval)
    if method != "adamw":
        # Start from a random orthonormal basis instead of the initial SVD: only steady-state
        # steps are measured, and three SVDs fewer keep the run short.
        for p in params:
            state = opt.state[p]
            left = gm.projection_side(tuple(p.shape)) == gm.LEFT
            tall = state["basis"] if left else state["basis"].t()  # (m, r) or (n, r)
            Q = torch.linalg.qr(torch.randn(tall.shape, device=device, generator=g))[0]
            state["basis"] = gm.column_major(Q if left else Q.t())
            state["subspace_updates"].fill_(1)
    opt.step()  # warm-up (allocations), not timed
    row = {"normal": timed_steps(opt, repeats, device)}
    if method == "adamw":
        row["update"] = row["normal"]
    else:
        opt.param_groups[0]["update_proj_gap"] = 1  # every step now moves the subspace
        row["update"] = timed_steps(opt, update_repeats, device)
        opt.param_groups[0]["update_proj_gap"] = interval
    row["cost"] = max(row["update"] - row["normal"], 0.0)
    row["amortised"] = row["normal"] + row["cost"] / interval
    row["state"] = state_bytes(opt)
    row["interval"] = interval
    del opt, params
    gc.collect()
    return row


def bench_update_per_shape(size: str, repeats: int, device: torch.device) -> list[dict]:
    """Subspace update alone per distinct shape: SVD refresh (GaLore) vs geodesic step (SubTrack++)."""
    rank, _ = PAPER_RANK[size]
    rows = []
    for shape in sorted({shape for _, shape in layer_shapes(size)}):
        g = torch.Generator(device=device).manual_seed(1)
        G = torch.randn(*shape, device=device, generator=g)
        side = gm.projection_side(shape)
        basis = gm.initial_basis(G + torch.randn(*shape, device=device, generator=g), rank, side)

        def svd():
            gm.initial_basis(G, rank, side)

        def geodesic():
            gm.grassmann_update(basis, G, side, 10000.0)

        row = {"shape": shape, "rank": rank}
        geodesic()  # warm-up (the SVD needs none: it takes seconds)
        for name, fn in (("svd", svd), ("geodesic", geodesic)):
            times = []
            for _ in range(repeats):
                synchronize(device)
                start = clock()
                fn()
                synchronize(device)
                times.append(clock() - start)
            row[name] = sorted(times)[len(times) // 2]
        rows.append(row)
    return rows


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.bench optimizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60m,350m,1b", help="comma-separated model sizes (default 60m,350m,1b)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed normal steps per cell (median)")
    parser.add_argument("--update-repeats", type=int, default=1, help="timed subspace-update steps per cell")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or process CPU time (sums threads; steadier on a shared CPU)")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work only; use --clock wall with --device cuda")
    sizes = [s for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for size in sizes:
        if size not in PAPER_RANK:
            parser.error(f"size {size!r} has no paper rank; choose from {', '.join(PAPER_RANK)}")
    for method in methods:
        if method not in METHODS:
            parser.error(f"method {method!r} is unknown; choose from {', '.join(METHODS)}")
    if args.repeats < 1 or args.update_repeats < 1:
        parser.error("--repeats and --update-repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"optimizer benchmark: one layer's projected weights per size, float32, {where}, torch {torch.__version__}")
    print(f"median of {args.repeats} normal / {args.update_repeats} update steps; {args.clock} times in ms; "
          "ratios: step and state to AdamW, update cost to GaLore (GaLore cost / this)\n")

    header = (f"{'size':5} {'method':11} {'normal':>9} {'xAdamW':>7} {'update':>9} {'cost':>9} {'GaLore/x':>8} "
              f"{'amortised':>9} {'xAdamW':>7} {'state MB':>9} {'xAdamW':>7}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        rows = {m: bench_size(size, m, args.repeats, args.update_repeats, device) for m in methods}
        base, galore = rows.get("adamw"), rows.get("galore")
        for method, row in rows.items():
            x_adamw = f"{row['normal'] / base['normal']:.2f}" if base else "-"
            x_amort = f"{row['amortised'] / base['normal']:.2f}" if base else "-"
            x_state = f"{row['state'] / base['state']:.2f}" if base else "-"
            speedup = (f"{galore['cost'] / row['cost']:.1f}" if galore and method != "adamw" and row["cost"] > 0
                       else "-")
            print(f"{size:5} {method:11} {ms(row['normal']):>9} {x_adamw:>7} {ms(row['update']):>9} "
                  f"{ms(row['cost']):>9} {speedup:>8} {ms(row['amortised']):>9} {x_amort:>7} "
                  f"{row['state'] / 2**20:>9.1f} {x_state:>7}")
        print(f"{'':5} (update interval {rows[methods[0]]['interval']}, rank {PAPER_RANK[size][0]})")

    print(f"\nsubspace update alone, per weight shape (median of {args.update_repeats}):")
    header = (f"{'size':5} {'shape':>12} {'rank':>5} {'SVD (GaLore)':>13} {'geodesic (SubTrack++)':>22} "
              f"{'SVD/geodesic':>13}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        for row in bench_update_per_shape(size, args.update_repeats, device):
            shape = f"{row['shape'][0]}x{row['shape'][1]}"
            print(f"{size:5} {shape:>12} {row['rank']:>5} {ms(row['svd']):>13} {ms(row['geodesic']):>22} "
                  f"{row['svd'] / row['geodesic']:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
