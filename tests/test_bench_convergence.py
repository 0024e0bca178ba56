"""`python -m pretrain.bench convergence`: methods side by side at their best lr, on the smallest
settings (nano model, a few steps). The table's best lr is the argmin of the runs' own final eval
losses, the gap column is measured against the best AdamW, and every run leaves TensorBoard events."""
import json
import math
import sys

import pytest

from pretrain.bench import convergence


def test_method_spec_parses_preset_and_optim_options():
    plain = convergence.Method.parse("galore")
    assert (plain.label, plain.preset, plain.options) == ("galore", "galore", {})
    variant = convergence.Method.parse("rank8=subtrack++,geodesic_rank=8,scale_recovery=true")
    assert (variant.label, variant.preset) == ("rank8", "subtrack++")
    assert variant.overrides() == ["optim.name=subtrack++", "optim.geodesic_rank=8", "optim.scale_recovery=true"]
    with pytest.raises(ValueError, match="not key=value"):
        convergence.Method.parse("x=subtrack++,geodesic_rank")


def test_lr_and_ratio_grids_default_per_method_and_overrides():
    adamw, galore = convergence.Method.parse("adamw"), convergence.Method.parse("galore")
    assert convergence.lr_grid(adamw, []) == list(convergence.GRIDS["adamw"].lrs)
    assert convergence.lr_grid(galore, []) == list(convergence.DEFAULT_GRID.lrs)
    assert convergence.lr_grid(galore, ["1e-2", "2e-2"]) == [1e-2, 2e-2]
    assert convergence.lr_grid(galore, ["1e-2", "adamw=3e-3"]) == [1e-2]
    assert convergence.lr_grid(adamw, ["1e-2", "adamw=3e-3,4e-3"]) == [3e-3, 4e-3]
    assert convergence.ratio_grid(adamw, []) == list(convergence.GRIDS["adamw"].ratios)
    assert convergence.ratio_grid(galore, ["galore=0.5", "1"]) == [0.5]
    assert convergence.ratio_grid(adamw, ["galore=0.5", "1"]) == [1.0]
    # every method a user compares with has a declared grid, both knobs with more than one value
    for name in convergence.FRONTIER:
        grid = convergence.GRIDS.get(name, convergence.DEFAULT_GRID)
        assert len(grid.lrs) > 1 and len(grid.ratios) > 1, name


def fake_runs(method, losses):
    """Runs of `method` with final eval losses {(lr, ratio): loss}."""
    return [convergence.Run(method, lr, 0, None, {"final_eval_loss": loss}, ratio=ratio)
            for (lr, ratio), loss in losses.items()]


def test_a_best_pair_at_the_edge_of_its_grid_extends_it_one_step_outwards():
    m = convergence.Method.parse("muon")
    inside = fake_runs(m, {(1e-2, 0.5): 5.0, (2e-2, 0.5): 4.0, (4e-2, 0.5): 4.5,
                           (2e-2, 0.25): 4.2, (2e-2, 1.0): 4.3})
    assert convergence.best_pair(inside, m) == (2e-2, 0.5)
    assert convergence.extensions(inside, m) == []
    edge = fake_runs(m, {(1e-2, 0.5): 5.0, (2e-2, 0.5): 4.5, (4e-2, 0.5): 4.0, (4e-2, 0.25): 4.1, (4e-2, 1.0): 4.2})
    assert convergence.extensions(edge, m) == [(8e-2, 0.5)]  # lr at the top; the ratio is inside
    low = fake_runs(m, {(1e-2, 0.25): 4.0, (2e-2, 0.25): 4.5, (1e-2, 0.5): 4.4})
    assert convergence.extensions(low, m) == [(5e-3, 0.25), (1e-2, 0.125)]


def test_pareto_keeps_the_methods_no_other_beats_on_both_state_and_loss():
    rows = [{"method": name, "matrix_state_bytes": state, "final_eval_loss": loss}
            for name, state, loss in (("adamw", 400, 5.3), ("muon", 200, 4.5), ("subtrack++", 150, 4.6),
                                      ("adafactor", 10, 4.4), ("apollo-mini", 5, 5.0), ("diverged", 1, float("nan")))]
    assert convergence.pareto(rows) == ["adafactor", "apollo-mini"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "lion"], "preset 'lion' is unknown"),
    (["--size", "huge"], "--size 'huge' is unknown"),
    (["--config", "nope.yaml"], "does not exist"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path, argv, message):
    assert convergence.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_diverged_lr_is_never_the_best():
    runs = fake_runs(convergence.Method.parse("galore"), {(1e-2, 1.0): float("nan"), (5e-3, 1.0): 4.9,
                                                          (2e-3, 1.0): 5.1})
    assert convergence.best_runs(runs, runs[0].method)[0] == 5e-3


def test_a_run_the_divergence_guard_stops_is_a_grid_point_ranked_last_not_a_failed_sweep(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--methods", "adamw", "--lrs", "1e-3,1e30", "--ratios", "1", "--time-steps", "0", "--size", "nano",
            "--steps", "10", "--out", str(out), "--jobs", "2",
            "--set", "train.warmup_steps=1", "train.eval_batches=1", "train.eval_every=5"]
    assert convergence.main(argv) == 0
    printed = capsys.readouterr().out
    assert "adamw_lr1e+30_seed0: diverged at step" in printed
    diverged = json.loads((out / "adamw_lr1e+30_seed0" / "summary.json").read_text())
    assert diverged["stopped_by"] == "diverged" and math.isnan(diverged["final_eval_loss"])
    [row] = json.loads((out / "results.json").read_text())
    assert row["best_lr"] == 1e-3 and math.isfinite(row["final_eval_loss"])


def test_reuse_keeps_a_finished_run_with_the_same_settings_even_from_a_moved_directory(tmp_path, monkeypatch):
    args = convergence.parse_args(["--methods", "adamw", "--out", str(tmp_path), "--reuse"])
    run = convergence.Run(convergence.Method.parse("adamw"), 1e-2, 0, tmp_path / "adamw_lr0.01_seed0")
    overrides = convergence.run_overrides(args, run)
    moved = [o if not o.startswith("log.run_dir=") else "log.run_dir=elsewhere/adamw_lr0.01_seed0" for o in overrides]
    run.directory.mkdir()
    (run.directory / "summary.json").write_text(json.dumps({"final_eval_loss": 4.5, "bench_overrides": moved}))
    monkeypatch.setattr(convergence.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was run again"))
    assert convergence.execute(args, run, threads=1).summary["final_eval_loss"] == 4.5
    other = convergence.Run(run.method, 1e-2, 1, run.directory)  # another seed: not the same settings
    with pytest.raises(pytest.fail.Exception, match="run again"):
        convergence.execute(args, other, threads=1)


def test_plot_is_optional(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert convergence.plot([], tmp_path / "curves.png", "t") is False


def test_three_runs_side_by_side_pick_each_methods_best_lr(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--methods", "adamw", "rank2=subtrack++,geodesic_rank=2", "--lrs", "adamw=1e-3,5e-3", "rank2=5e-3",
            "--ratios", "1", "--time-steps", "1",  # the timing path runs; one timed step is enough for it
            "--size", "nano", "--steps", "4", "--out", str(out), "--jobs", "2",
            "--set", "train.eval_every=2", "train.warmup_steps=1", "optim.update_interval=2", "train.eval_batches=1"]
    assert convergence.main(argv) == 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("[") and "/3] " in line for line in printed.splitlines()) == 3  # one line per run
    summaries = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}
    assert not list(out.glob("*/checkpoints"))  # the bench never resumes: checkpoints are deleted
    assert set(summaries) == {"adamw_lr0.001_seed0", "adamw_lr0.005_seed0", "rank2_lr0.005_seed0"}
    for name, s in summaries.items():
        assert s["step"] == 4 and [step for step, _ in s["evals"]] == [0, 2, 4]
        assert list((out / name / "tensorboard").glob("events.out.tfevents.*"))  # overlaid by --logdir out
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())}
    finals = {name: s["final_eval_loss"] for name, s in summaries.items()}
    best_adamw = min(finals["adamw_lr0.001_seed0"], finals["adamw_lr0.005_seed0"])
    assert rows["adamw"]["best_lr"] == (1e-3 if finals["adamw_lr0.001_seed0"] == best_adamw else 5e-3)
    assert rows["adamw"]["final_eval_loss"] == best_adamw and rows["adamw"]["gap_to_adamw"] == 0.0
    assert rows["rank2"]["gap_to_adamw"] == pytest.approx(finals["rank2_lr0.005_seed0"] - best_adamw)
    assert 0 < rows["rank2"]["optimizer_state_bytes"] < rows["adamw"]["optimizer_state_bytes"]
    assert 0 < rows["rank2"]["matrix_state_bytes"] < rows["adamw"]["matrix_state_bytes"]
    assert rows["adamw"]["step_time_vs_adamw"] == 1.0 and rows["rank2"]["step_time_vs_adamw"] > 0
    assert "rank2" in convergence.pareto(list(rows.values()))
    table = (out / "results.md").read_text()
    assert "| adamw |" in table and "| rank2 |" in table and "Command: `python -m pretrain.bench convergence" in table
    assert (out / "curves.png").is_file() or convergence.PLOT_HINT in printed


def test_apollo_is_skipped_in_one_line_when_apollo_torch_is_not_installed(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "apollo_torch" else real(name, *a))
    argv = ["--methods", "apollo", "--size", "nano", "--steps", "2", "--out", str(tmp_path), "--lrs", "1e-3",
            "--ratios", "1", "--set", "train.warmup_steps=1", "train.eval_batches=1", "optim.rank=8"]
    assert convergence.main(argv) == 2  # nothing left to run once apollo is skipped
    captured = capsys.readouterr()
    assert "skipping apollo: optim.name 'apollo' runs through the apollo-torch package" in captured.out
    assert captured.err.strip() == "bench convergence: no method left to run"
