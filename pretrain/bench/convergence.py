"""Methods side by side on loss: same model, data, seeds and steps, each at its own best learning rate.

    python -m pretrain.bench convergence [--methods adamw galore fira subtrack subtrack++] [--size 9m]
        [--steps 300] [--seeds 0 1 2] [--lrs 5e-3 1e-2 | --lrs galore=5e-3,1e-2 ...] [--jobs 2]
        [--out runs/convergence] [--ablation] [--set section.key=value ...]

Every (method, lr, seed) is one `python -m pretrain` run of --config (default the README's main job,
configs/tiny_sample.yaml) in its own process, written under --out as a run directory
(`<method>_lr<lr>_seed<seed>/` with metrics.jsonl and TensorBoard events), so
`tensorboard --logdir OUT` overlays every curve. A method's best lr is the one with the lowest
final eval loss averaged over the seeds. The results go to OUT/results.md (the table below),
OUT/results.json and OUT/curves.png (eval loss against step at each method's best lr; needs
matplotlib: `pip install -c constraints.txt -e ".[bench]"`).

A method is a preset name (`galore`) or `LABEL=PRESET[,key=value...]` with optim keys, e.g.
`rank1=subtrack++,geodesic_rank=1`. `--ablation` compares SubTrack++'s parts the way the paper does:
tracking alone (subtrack), + rotation, + recovery, both (subtrack++), with GaLore and the
published recovery at the full lr (subtrack++paper) beside them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_METHODS = ("adamw", "galore", "fira", "subtrack", "subtrack++")
ADAMW_LRS = (1e-3, 2e-3, 5e-3)
LOW_RANK_LRS = (2.5e-3, 5e-3, 1e-2, 2e-2)
# The paper's ablation (tracking alone, + rotation, + recovery, both) with recovery scaled as our
# subtrack++ preset does, plus the published recovery at the full lr (subtrack++paper) and GaLore.
ABLATION = ("galore", "tracking=subtrack", "tracking+rotation=subtrack,moments=rotate",
            "tracking+recovery=subtrack,residual=recover,scale_recovery=true", "subtrack++paper", "subtrack++")
PLOT_HINT = 'the plot needs matplotlib: pip install -c constraints.txt -e ".[bench]"'


@dataclass
class Method:
    label: str
    preset: str
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Method":
        """`galore` or `LABEL=PRESET,key=value,...` (keys of the optim section)."""
        label, sep, spec = text.partition("=")
        spec = spec if sep else label
        preset, *pairs = spec.split(",")
        options = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise ValueError(f"method {text!r}: {pair!r} is not key=value (e.g. rank1=subtrack++,geodesic_rank=1)")
            options[key.strip()] = value.strip()
        return cls(label.strip(), preset.strip(), options)

    def overrides(self) -> list[str]:
        return [f"optim.name={self.preset}"] + [f"optim.{k}={v}" for k, v in self.options.items()]


@dataclass
class Run:
    method: Method
    lr: float
    seed: int
    directory: Path
    summary: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.method.label}_lr{self.lr:g}_seed{self.seed}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain.bench convergence", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny_sample.yaml", help="base run config (default: the main job)")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--ablation", action="store_true", help=f"methods: {' '.join(ABLATION)}")
    p.add_argument("--lrs", nargs="+", default=[],
                   help="learning rates for every method, or METHOD=lr,lr,... for one; default AdamW "
                        f"{','.join(map(str, ADAMW_LRS))}, low-rank {','.join(map(str, LOW_RANK_LRS))}")
    p.add_argument("--size", default=None, help="model size (default: the config's); optim.rank becomes hidden/4")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the config's)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (model init); default 0")
    p.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores/jobs threads")
    p.add_argument("--out", default="runs/convergence", help="directory for the runs and results")
    p.add_argument("--reuse", action="store_true", help="keep runs already finished in --out (same settings)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run")
    return p.parse_args(argv)


def lr_grid(method: Method, lrs: list[str]) -> list[float]:
    """--lrs entries for this method (METHOD=a,b), else the global ones, else the defaults."""
    mine = [x.partition("=")[2] for x in lrs if x.partition("=")[0] == method.label and "=" in x]
    common = [x for x in lrs if "=" not in x]
    chosen = ",".join(mine) or ",".join(common)
    if chosen:
        return [float(x) for x in chosen.split(",") if x]
    return list(ADAMW_LRS if method.preset == "adamw" else LOW_RANK_LRS)


def run_overrides(args, run: Run) -> list[str]:
    overrides = run.method.overrides() + [
        f"optim.lr={run.lr}", f"train.seed={run.seed}", "checkpoint.every=0", "checkpoint.keep_last=1",
        f"log.run_dir={run.directory}", 'log.progress_bar="off"']
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.size is not None:
        from models.sizes import SIZES

        if args.size not in SIZES:
            raise ValueError(f"--size {args.size!r} is unknown; choose one of {list(SIZES)}")
        overrides += [f"model.size={args.size}", f"optim.rank={SIZES[args.size].hidden_size // 4}"]
    return overrides + list(args.overrides)


def execute(args, run: Run, threads: int) -> Run:
    """One training run in its own process; its summary is read back from JSON."""
    summary_path = run.directory / "summary.json"
    overrides = run_overrides(args, run)
    if args.reuse and summary_path.is_file():
        saved = json.loads(summary_path.read_text())
        if saved.get("bench_overrides") == overrides:
            run.summary = saved
            return run
    if run.directory.exists():  # a stale run of the same name would add its records to this one's curves
        shutil.rmtree(run.directory)
    run.directory.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pretrain", "--config", args.config, "--summary-json", str(summary_path),
           "--set", *overrides]
    with open(run.directory / "stdout.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = (run.directory / "stdout.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"run {run.name} failed (exit {done.returncode}): {' '.join(tail)}; "
                           f"log: {run.directory / 'stdout.log'}")
    run.summary = json.loads(summary_path.read_text())
    run.summary["bench_overrides"] = overrides
    summary_path.write_text(json.dumps(run.summary, indent=1))
    return run


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def finite_or_inf(value: float) -> float:
    """A diverged run's loss (NaN) ranks last, not wherever NaN comparisons leave it."""
    return value if math.isfinite(value) else math.inf


def best_runs(runs: list[Run], method: Method) -> tuple[float, list[Run]]:
    """(best lr, its runs over the seeds): lowest mean final eval loss."""
    by_lr: dict[float, list[Run]] = {}
    for run in runs:
        if run.method.label == method.label:
            by_lr.setdefault(run.lr, []).append(run)
    lr = min(by_lr, key=lambda x: finite_or_inf(mean([r.summary["final_eval_loss"] for r in by_lr[x]])))
    return lr, by_lr[lr]


def summarise(methods: list[Method], runs: list[Run]) -> list[dict]:
    rows = []
    for method in methods:
        lr, chosen = best_runs(runs, method)
        finals = [r.summary["final_eval_loss"] for r in chosen]
        grid = {f"{r.lr:g}": [] for r in runs if r.method.label == method.label}
        for r in runs:
            if r.method.label == method.label:
                grid[f"{r.lr:g}"].append(r.summary["final_eval_loss"])
        rows.append({
            "method": method.label, "preset": method.preset, "options": method.options, "best_lr": lr,
            "final_eval_loss": mean(finals), "final_eval_spread": max(finals) - min(finals),
            "per_seed": finals, "best_eval_loss": mean([min(v for _, v in r.summary["evals"]) for r in chosen]),
            "wall_time_s": mean([r.summary["wall_time_s"] for r in chosen]),
            "optimizer_state_bytes": chosen[0].summary.get("optimizer_state_bytes"),
            "lr_grid": {k: mean(v) for k, v in grid.items()},
            "curve": mean_curve(chosen),
        })
    adamw = [finite_or_inf(row["final_eval_loss"]) for row in rows if row["preset"] == "adamw"]
    for row in rows:
        gap = row["final_eval_loss"] - min(adamw) if adamw else None
        row["gap_to_adamw"] = gap
        row["gap_to_adamw_pct"] = 100.0 * gap / min(adamw) if adamw else None
    return rows


def mean_curve(runs: list[Run]) -> list[tuple[int, float]]:
    steps = [step for step, _ in runs[0].summary["evals"]]
    return [(step, mean([dict(r.summary["evals"])[step] for r in runs])) for step in steps]


def markdown(rows: list[dict], args, seeds: list[int]) -> str:
    head = ("| method | best lr | final eval loss | best eval loss | gap to AdamW | wall time | optimizer state |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        spread = f" ± {row['final_eval_spread'] / 2:.3f}" if len(seeds) > 1 else ""
        gap = "-" if row["gap_to_adamw"] is None else \
            f"{row['gap_to_adamw']:+.3f} ({row['gap_to_adamw_pct']:+.1f}%)"
        state = row["optimizer_state_bytes"]
        lines.append(f"| {row['method']} | {row['best_lr']:g} | {row['final_eval_loss']:.3f}{spread} | "
                     f"{row['best_eval_loss']:.3f} | {gap} | {row['wall_time_s']:.0f} s | "
                     f"{'-' if state is None else f'{state / 2**20:.2f} MiB'} |")
    grid_lrs = sorted({float(lr) for row in rows for lr in row["lr_grid"]})
    grid = ["", "Final eval loss per lr (mean over seeds):", "",
            "| method | " + " | ".join(f"{lr:g}" for lr in grid_lrs) + " |",
            "|---|" + "---|" * len(grid_lrs)]
    for row in rows:
        cells = [f"{row['lr_grid'][f'{lr:g}']:.3f}" if f"{lr:g}" in row["lr_grid"] else "-" for lr in grid_lrs]
        grid.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    command = "python -m pretrain.bench convergence " + " ".join(sys.argv[2:] if args.argv is None else args.argv)
    return (f"Seeds {', '.join(map(str, seeds))}; final eval loss mean (± half the spread) at each method's best lr.\n"
            f"Command: `{command.strip()}`\n\n" + head + "\n".join(lines) + "\n" + "\n".join(grid) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps, losses = zip(*row["curve"])
        ax.plot(steps, losses, marker=".", label=f"{row['method']} (lr {row['best_lr']:g}): {row['final_eval_loss']:.3f}")
    finals = [row["final_eval_loss"] for row in rows if math.isfinite(row["final_eval_loss"])]
    if finals:
        ax.set_ylim(min(finals) - 0.3, min(finals) + 2.5)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    try:
        texts = list(ABLATION) if args.ablation else (args.methods or list(DEFAULT_METHODS))
        methods = [Method.parse(text) for text in texts]
        seeds = args.seeds or ([args.seed] if args.seed is not None else [0])
        out = Path(args.out)
        runs = [Run(m, lr, seed, out / f"{m.label}_lr{lr:g}_seed{seed}")
                for m in methods for lr in lr_grid(m, args.lrs) for seed in seeds]
        from optim.factory import PRESETS

        for m in methods:
            if m.preset not in PRESETS:
                raise ValueError(f"method {m.label!r}: preset {m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        if not Path(args.config).is_file():
            raise ValueError(f"--config {args.config!r} does not exist")
        run_overrides(args, runs[0])  # an unknown --size fails here, before any run
    except ValueError as e:
        print(f"bench convergence: {e}", file=sys.stderr)
        return 2
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"{len(runs)} runs ({len(methods)} methods, {len(seeds)} seed(s)), {jobs} at a time, {threads} thread(s) "
          f"each, in {out}", flush=True)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(execute, args, run, threads) for run in runs]
        for done, future in enumerate(as_completed(futures), 1):
            try:
                run = future.result()
            except RuntimeError as e:
                print(f"bench convergence: {e}", file=sys.stderr)
                pool.shutdown(cancel_futures=True)
                return 1
            s = run.summary
            print(f"[{done}/{len(runs)}] {run.name}: final eval loss {s['final_eval_loss']:.4f} "
                  f"(best {min(v for _, v in s['evals']):.4f}) in {s['wall_time_s']:.0f} s", flush=True)
    rows = summarise(methods, runs)
    table = markdown(rows, args, seeds)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)
    title = f"{args.size or 'config'} model, {args.steps or 'config'} steps, seeds {','.join(map(str, seeds))}"
    if plot(rows, out / "curves.png", title):
        print(f"plot: {out / 'curves.png'}")
    else:
        print(PLOT_HINT)
    print(f"curves of every run: tensorboard --logdir {out}  ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
