"""Methods side by side on loss, memory and speed: same model, data, seeds and steps, each at its own best lrs.

    python -m pretrain.bench convergence [--methods adamw galore fira subtrack subtrack++ | --frontier]
        [--size 9m] [--steps 300] [--seeds 0 1 2] [--lrs 5e-3 1e-2 | --lrs galore=5e-3,1e-2 ...]
        [--ratios 0.25 0.5 | --ratios muon=0.25 ...] [--extend] [--time-steps 20] [--jobs 2]
        [--out runs/convergence] [--reuse] [--ablation] [--set section.key=value ...]

Every method is tuned on two knobs, the same for all: `optim.lr` (the plain group: embeddings, norms,
head) and `optim.matrix_lr_ratio` (the attention and MLP matrices' lr as a multiple of it), on the
grid declared for it in GRIDS (or --lrs / --ratios). Every (method, lr, ratio, seed) is one
`python -m pretrain` run of --config (default the README's main job, configs/tiny_sample.yaml) in
its own process, written under --out as a run directory (`<method>_lr<lr>[_mr<ratio>]_seed<seed>/`
with summary.json, metrics.jsonl and TensorBoard events; its checkpoint is deleted), so
`tensorboard --logdir OUT` overlays every curve. A method's best pair is the one with the lowest final
eval loss averaged over the seeds; with --extend a best lr or ratio at the edge of its grid adds the
next grid step beyond it (x2 or /2) until it is inside. --time-steps then runs each method's best
pair for that many steps, one method at a time on every core, for the step-time ratio to AdamW
measured in this invocation. The results go to OUT/results.md (the table below), OUT/results.json,
OUT/curves.png (eval loss against step at each best pair) and OUT/frontier.png (final eval loss
against the matrices' optimizer-state bytes, the Pareto frontier drawn); the plots need matplotlib:
`pip install -c constraints.txt -e ".[bench]"`, which also brings apollo-torch for `apollo`.

A method is a preset name (`galore`) or `LABEL=PRESET[,key=value...]` with optim keys, e.g.
`rank1=subtrack++,geodesic_rank=1`. `--ablation` compares SubTrack++'s parts the way the paper does:
tracking alone (subtrack), + rotation, + recovery, both (subtrack++), with GaLore and the
published recovery at the full lr (subtrack++paper) beside them.
"""
from __future__ import annotations

import argparse
import importlib.util
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


@dataclass(frozen=True)
class Grid:
    """One method's grid: plain-group lrs x matrices' lr ratios."""
    lrs: tuple[float, ...]
    ratios: tuple[float, ...] = (1.0,)


# Each preset's grid on the 9m demo, centred on the best pair the and our own probes found
# (the low-rank presets' updates are further multiplied by optim.scale, 0.25). --extend moves any
# best pair at an edge outwards, so the centre is a starting point, not a choice of winner.
_LOW_RANK_GRID = Grid((1e-2, 2e-2, 4e-2), (0.125, 0.25, 0.5))
GRIDS: dict[str, Grid] = {
    "adamw": Grid((5e-3, 1e-2, 2e-2), (0.125, 0.25, 0.5)),
    "adamw8bit": Grid((5e-3, 1e-2, 2e-2), (0.125, 0.25, 0.5)),
    "muon": Grid((2e-2, 4e-2, 8e-2), (0.0625, 0.125, 0.25)),
    "adafactor": Grid((2e-2, 4e-2, 8e-2), (1.0, 2.0, 4.0)),
    "subtrack-adafactor": Grid((2e-2, 4e-2, 8e-2), (1.0, 2.0, 4.0)),
    "subtrack-muon": Grid((2e-2, 4e-2, 8e-2), (0.0625, 0.125, 0.25)),  # Muon's
    "apollo": Grid((1e-2, 2e-2, 4e-2), (0.125, 0.25, 0.5)),
    "apollo-mini": Grid((1e-2, 2e-2, 4e-2), (0.125, 0.25, 0.5)),
}
DEFAULT_GRID = _LOW_RANK_GRID  # galore, fira, subtrack, subtrack++, subtrack++paper, ...
# The optimizers a user compares with (README, "Which optimizer when"), and ours beside them.
FRONTIER = ("adamw", "adamw8bit", "muon", "adafactor", "apollo", "apollo-mini", "galore", "fira", "subtrack++",
            "subtrack-adafactor", "subtrack-muon")
# The paper's ablation (tracking alone, + rotation, + recovery, both) with recovery scaled as our
# subtrack++ preset does, plus the published recovery at the full lr (subtrack++paper) and GaLore.
ABLATION = ("galore", "tracking=subtrack", "tracking+rotation=subtrack,moments=rotate",
            "tracking+recovery=subtrack,residual=recover,scale_recovery=true", "subtrack++paper", "subtrack++")
DIVERGED_EXIT = 3  # python -m pretrain's exit status when the divergence guard stops a run (summary written)
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
    directory: Path | None
    summary: dict | None = None
    ratio: float = 1.0

    @property
    def name(self) -> str:
        return run_name(self.method, self.lr, self.ratio, self.seed)


def run_name(method: Method, lr: float, ratio: float, seed: int) -> str:
    ratio_part = "" if ratio == 1.0 else f"_mr{ratio:g}"  # ratio 1: the names of one-knob runs
    return f"{method.label}_lr{lr:g}{ratio_part}_seed{seed}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pretrain.bench convergence", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny_sample.yaml", help="base run config (default: the main job)")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--ablation", action="store_true", help=f"methods: {' '.join(ABLATION)}")
    p.add_argument("--frontier", action="store_true", help=f"methods: {' '.join(FRONTIER)}")
    p.add_argument("--lrs", nargs="+", default=[],
                   help="plain-group lrs for every method, or METHOD=lr,lr,... for one; default: GRIDS")
    p.add_argument("--ratios", nargs="+", default=[],
                   help="matrices' lr ratios (optim.matrix_lr_ratio) for every method, or METHOD=r,r,...; "
                        "default: GRIDS")
    p.add_argument("--extend", action="store_true",
                   help="extend a grid whose best lr or ratio is at its edge by one step (x2, /2) until inside")
    p.add_argument("--time-steps", type=int, default=0,
                   help="after the grid, time each best pair for this many steps (one at a time) for the "
                        "step-time ratio to AdamW; 0: skip")
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


def _grid_values(method: Method, given: list[str], default: tuple[float, ...]) -> list[float]:
    """--lrs / --ratios entries for this method (METHOD=a,b), else the global ones, else `default`."""
    mine = [x.partition("=")[2] for x in given if x.partition("=")[0] == method.label and "=" in x]
    common = [x for x in given if "=" not in x]
    chosen = ",".join(mine) or ",".join(common)
    if chosen:
        return [float(x) for x in chosen.split(",") if x]
    return list(default)


def lr_grid(method: Method, lrs: list[str]) -> list[float]:
    return _grid_values(method, lrs, GRIDS.get(method.preset, DEFAULT_GRID).lrs)


def ratio_grid(method: Method, ratios: list[str]) -> list[float]:
    return _grid_values(method, ratios, GRIDS.get(method.preset, DEFAULT_GRID).ratios)


def run_overrides(args, run: Run) -> list[str]:
    overrides = run.method.overrides() + [
        f"optim.lr={run.lr}", f"train.seed={run.seed}", "checkpoint.every=0", "checkpoint.keep_last=1",
        f"log.run_dir={run.directory}", 'log.progress_bar="off"']
    if run.ratio != 1.0:
        overrides.append(f"optim.matrix_lr_ratio={run.ratio}")
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.size is not None:
        from models.sizes import SIZES

        if args.size not in SIZES:
            raise ValueError(f"--size {args.size!r} is unknown; choose one of {list(SIZES)}")
        overrides += [f"model.size={args.size}", f"optim.rank={SIZES[args.size].hidden_size // 4}"]
    return overrides + list(args.overrides)


def same_settings(saved: list[str], overrides: list[str]) -> bool:
    """A finished run's overrides equal these, wherever its directory was: a results directory may be moved or
    merged into another one (log.run_dir is where the run was written, not how it trained)."""
    def settings(values):
        return [v for v in values if not v.startswith("log.run_dir=")]
    return settings(saved) == settings(overrides)


def execute(args, run: Run, threads: int) -> Run:
    """One training run in its own process; its summary is read back from JSON."""
    summary_path = run.directory / "summary.json"
    overrides = run_overrides(args, run)
    if args.reuse and summary_path.is_file():
        saved = json.loads(summary_path.read_text())
        if same_settings(saved.get("bench_overrides") or [], overrides):
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
    diverged = done.returncode == DIVERGED_EXIT and summary_path.is_file()
    if done.returncode != 0 and not diverged:
        tail = (run.directory / "stdout.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"run {run.name} failed (exit {done.returncode}): {' '.join(tail)}; "
                           f"log: {run.directory / 'stdout.log'}")
    run.summary = json.loads(summary_path.read_text())
    if diverged:  # the guard stopped it: a point of the grid like any other, ranked last (its last eval is
        run.summary["final_eval_loss"] = float("nan")  # from before the trouble, so it must not count)
    run.summary["bench_overrides"] = overrides
    summary_path.write_text(json.dumps(run.summary, indent=1))
    shutil.rmtree(run.directory / "checkpoints", ignore_errors=True)  # never resumed; ~3x the model's bytes
    return run


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def finite_or_inf(value: float) -> float:
    """A diverged run's loss (NaN) ranks last, not wherever NaN comparisons leave it."""
    return value if math.isfinite(value) else math.inf


def by_pair(runs: list[Run], method: Method) -> dict[tuple[float, float], list[Run]]:
    """This method's runs grouped by (lr, ratio), over the seeds."""
    pairs: dict[tuple[float, float], list[Run]] = {}
    for run in runs:
        if run.method.label == method.label:
            pairs.setdefault((run.lr, run.ratio), []).append(run)
    return pairs


def seed_mean(runs: list[Run]) -> float:
    return finite_or_inf(mean([r.summary["final_eval_loss"] for r in runs]))


def best_pair(runs: list[Run], method: Method) -> tuple[float, float]:
    """(lr, ratio) with the lowest final eval loss averaged over the seeds; a diverged run ranks last."""
    pairs = by_pair(runs, method)
    return min(pairs, key=lambda pair: seed_mean(pairs[pair]))


def best_runs(runs: list[Run], method: Method) -> tuple[float, list[Run]]:
    """(best lr, its runs over the seeds) at the best pair."""
    lr, ratio = best_pair(runs, method)
    return lr, by_pair(runs, method)[(lr, ratio)]


def extensions(runs: list[Run], method: Method) -> list[tuple[float, float]]:
    """Pairs one grid step beyond a best lr or ratio that sits at the edge of what was run (x2 / 2)."""
    lr, ratio = best_pair(runs, method)
    pairs = by_pair(runs, method)
    lrs = sorted({l for l, r in pairs if r == ratio})
    ratios = sorted({r for l, r in pairs if l == lr})
    out = []
    for values, best, make in ((lrs, lr, lambda v: (v, ratio)), (ratios, ratio, lambda v: (lr, v))):
        if len(values) > 1 and best == values[0]:
            out.append(make(best / 2))
        elif len(values) > 1 and best == values[-1]:
            out.append(make(best * 2))
    return [pair for pair in out if pair not in pairs]


def summarise(methods: list[Method], runs: list[Run], step_times: dict[str, float] | None = None) -> list[dict]:
    rows = []
    for method in methods:
        (lr, ratio), pairs = best_pair(runs, method), by_pair(runs, method)
        chosen = pairs[(lr, ratio)]
        finals = [r.summary["final_eval_loss"] for r in chosen]
        rows.append({
            "method": method.label, "preset": method.preset, "options": method.options, "best_lr": lr,
            "best_ratio": ratio, "final_eval_loss": mean(finals), "final_eval_spread": max(finals) - min(finals),
            "per_seed": finals, "best_eval_loss": mean([min(v for _, v in r.summary["evals"]) for r in chosen]),
            "wall_time_s": mean([r.summary["wall_time_s"] for r in chosen]),
            "optimizer_state_bytes": chosen[0].summary.get("optimizer_state_bytes"),
            "matrix_state_bytes": chosen[0].summary.get("optimizer_state_bytes_matrices"),
            "lr_grid": {f"{l:g}" if r == 1.0 else f"{l:g} x{r:g}": seed_mean(v) for (l, r), v in sorted(pairs.items())},
            "pair_grid": [[l, r, seed_mean(v), len(v)] for (l, r), v in sorted(pairs.items())],
            "curve": mean_curve(chosen),
            "step_time_s": (step_times or {}).get(method.label),
        })
    adamw = [finite_or_inf(row["final_eval_loss"]) for row in rows if row["preset"] == "adamw"]
    adamw_time = next((row["step_time_s"] for row in rows if row["preset"] == "adamw" and row["step_time_s"]), None)
    for row in rows:
        gap = row["final_eval_loss"] - min(adamw) if adamw else None
        row["gap_to_adamw"] = gap
        row["gap_to_adamw_pct"] = 100.0 * gap / min(adamw) if adamw else None
        row["step_time_vs_adamw"] = row["step_time_s"] / adamw_time if adamw_time and row["step_time_s"] else None
    return rows


def mean_curve(runs: list[Run]) -> list[tuple[int, float]]:
    steps = [step for step, _ in runs[0].summary["evals"]]
    return [(step, mean([dict(r.summary["evals"])[step] for r in runs])) for step in steps]


def pareto(rows: list[dict]) -> list[str]:
    """Methods no other method beats on both the matrices' state bytes and the final eval loss (diverged
    ones are on no frontier)."""
    def point(row):
        return row["matrix_state_bytes"], finite_or_inf(row["final_eval_loss"])

    scored = [r for r in rows if r["matrix_state_bytes"] is not None and math.isfinite(r["final_eval_loss"])]
    return [r["method"] for r in scored
            if not any(point(o)[0] <= point(r)[0] and point(o)[1] <= point(r)[1] and point(o) != point(r)
                       for o in scored)]


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.2f} MiB"


def markdown(rows: list[dict], args, seeds: list[int]) -> str:
    head = ("| method | best lr | matrices' lr ratio | final eval loss | best eval loss | gap to AdamW | "
            "state: matrices | state: total | step time vs AdamW | on the frontier |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    front = set(pareto(rows))
    lines = []
    for row in rows:
        spread = f" ± {row['final_eval_spread'] / 2:.3f}" if len(seeds) > 1 else ""
        gap = "-" if row["gap_to_adamw"] is None else \
            f"{row['gap_to_adamw']:+.3f} ({row['gap_to_adamw_pct']:+.1f}%)"
        speed = "-" if row["step_time_vs_adamw"] is None else f"{row['step_time_vs_adamw']:.2f}x"
        lines.append(f"| {row['method']} | {row['best_lr']:g} | {row['best_ratio']:g} | "
                     f"{row['final_eval_loss']:.3f}{spread} | {row['best_eval_loss']:.3f} | {gap} | "
                     f"{_mib(row['matrix_state_bytes'])} | {_mib(row['optimizer_state_bytes'])} | {speed} | "
                     f"{'yes' if row['method'] in front else 'no'} |")
    grid = ["", "Final eval loss per (lr, matrices' lr ratio) (mean over the seeds run; n = seeds):", ""]
    for row in rows:
        cells = ", ".join(f"{l:g} x{r:g}: {loss:.3f}" + (f" (n={n})" if n != len(seeds) else "")
                          for l, r, loss, n in row["pair_grid"])
        grid.append(f"- {row['method']}: {cells}")
    command = "python -m pretrain.bench convergence " + " ".join(sys.argv[2:] if args.argv is None else args.argv)
    return (f"Seeds {', '.join(map(str, seeds))}; final eval loss mean (± half the spread) at each method's best "
            f"pair.\nCommand: `{command.strip()}`\n\n" + head + "\n".join(lines) + "\n" + "\n".join(grid) + "\n")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(rows: list[dict], path: Path, title: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps, losses = zip(*row["curve"])
        ax.plot(steps, losses, marker=".", label=f"{row['method']} (lr {row['best_lr']:g} x{row['best_ratio']:g}): "
                                                   f"{row['final_eval_loss']:.3f}")
    finals = [row["final_eval_loss"] for row in rows if math.isfinite(row["final_eval_loss"])]
    if finals:
        ax.set_ylim(min(finals) - 0.3, min(finals) + 2.5)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_frontier(rows: list[dict], path: Path, title: str) -> bool:
    """Final eval loss against the matrices' optimizer-state bytes; the Pareto frontier joined."""
    plt = _pyplot()
    if plt is None:
        return False
    scored = [r for r in rows if r["matrix_state_bytes"] and math.isfinite(r["final_eval_loss"])]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in scored:
        ax.errorbar(row["matrix_state_bytes"] / 2**20, row["final_eval_loss"], yerr=row["final_eval_spread"] / 2,
                    fmt="o", capsize=3)
        ax.annotate(row["method"], (row["matrix_state_bytes"] / 2**20, row["final_eval_loss"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((r for r in scored if r["method"] in pareto(rows)), key=lambda r: r["matrix_state_bytes"])
    if front:
        ax.step([r["matrix_state_bytes"] / 2**20 for r in front], [r["final_eval_loss"] for r in front],
                where="post", color="gray", alpha=0.6, label="Pareto frontier")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state of the attention and MLP matrices (MiB, log scale)")
    ax.set_ylabel("final eval loss (mean of the seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_all(pool, args, runs: list[Run], threads: int, total: list[int]) -> bool:
    """Execute `runs` on the pool, one printed line each; False after the first failure."""
    futures = [pool.submit(execute, args, run, threads) for run in runs]
    for future in as_completed(futures):
        try:
            run = future.result()
        except RuntimeError as e:
            print(f"bench convergence: {e}", file=sys.stderr)
            for other in futures:
                other.cancel()
            return False
        total[0] += 1
        s = run.summary
        outcome = (f"diverged at step {s['step']}" if s.get("stopped_by") == "diverged"
                   else f"final eval loss {s['final_eval_loss']:.4f}")
        best = min((v for _, v in s["evals"]), default=math.nan)
        print(f"[{total[0]}/{total[1]}] {run.name}: {outcome} (best {best:.4f}) in {s['wall_time_s']:.0f} s",
              flush=True)
    return True


def time_best_pairs(args, methods: list[Method], runs: list[Run], out: Path) -> dict[str, float]:
    """Median step time of each method's best pair over --time-steps steps, one method at a time on every
    core (the grid's runs share the cores, so their timings are not comparable)."""
    times = {}
    threads = os.cpu_count() or 1
    for method in methods:
        lr, ratio = best_pair(runs, method)
        run = Run(method, lr, 0, out / "timing" / method.label, ratio=ratio)
        timing = argparse.Namespace(**{**vars(args), "reuse": False, "steps": args.time_steps + 5,
                                       "overrides": list(args.overrides) + [
                                           "train.warmup_steps=1", "train.eval_every=0", "train.eval_batches=0",
                                           "log.log_every=1", "log.tensorboard=false"]})
        execute(timing, run, threads)
        records = [json.loads(line) for line in (run.directory / "metrics.jsonl").read_text().splitlines()]
        step_times = [r["step_time"] for r in records if "step_time" in r][5:]  # past the first steps' warm-up
        times[method.label] = statistics.median(step_times)
        print(f"timing {method.label}: {times[method.label] * 1e3:.0f} ms per step (median of {len(step_times)})",
              flush=True)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    try:
        texts = list(ABLATION) if args.ablation else list(FRONTIER) if args.frontier else \
            (args.methods or list(DEFAULT_METHODS))
        methods = [Method.parse(text) for text in texts]
        seeds = args.seeds or ([args.seed] if args.seed is not None else [0])
        out = Path(args.out)
        runs = [Run(m, lr, seed, out / run_name(m, lr, ratio, seed), ratio=ratio)
                for m in methods for lr in lr_grid(m, args.lrs) for ratio in ratio_grid(m, args.ratios)
                for seed in seeds]
        from optim.factory import APOLLO, APOLLO_HINT, PRESETS

        for m in methods:
            if m.preset not in PRESETS:
                raise ValueError(f"method {m.label!r}: preset {m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        if importlib.util.find_spec("apollo_torch") is None:  # an optional peer: run the others
            for m in [m for m in methods if m.preset in APOLLO]:
                print(f"bench convergence: skipping {m.label}: " + APOLLO_HINT.format(name=m.preset), flush=True)
            methods = [m for m in methods if m.preset not in APOLLO]
            runs = [r for r in runs if r.method.preset not in APOLLO]
        if not runs:
            raise ValueError("no method left to run")
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
    total = [0, len(runs)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        if not run_all(pool, args, runs, threads, total):
            return 1
        while args.extend:
            more = [Run(m, lr, seed, out / run_name(m, lr, ratio, seed), ratio=ratio)
                    for m in methods for lr, ratio in extensions(runs, m) for seed in seeds]
            if not more:
                break
            print(f"extending: {', '.join(sorted({f'{r.method.label} lr {r.lr:g} x{r.ratio:g}' for r in more}))}",
                  flush=True)
            total[1] += len(more)
            if not run_all(pool, args, more, threads, total):
                return 1
            runs += more
    step_times = time_best_pairs(args, methods, runs, out) if args.time_steps > 0 else None
    rows = summarise(methods, runs, step_times)
    table = markdown(rows, args, seeds)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table)
    title = (f"{args.size or Path(args.config).stem} model, {args.steps or 'the config' + chr(39) + 's'} steps, "
             f"seeds {','.join(map(str, seeds))}")
    if plot(rows, out / "curves.png", title) and plot_frontier(rows, out / "frontier.png", title):
        print(f"plots: {out / 'curves.png'}, {out / 'frontier.png'}")
    else:
        print(PLOT_HINT)
    print(f"curves of every run: tensorboard --logdir {out}  ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
