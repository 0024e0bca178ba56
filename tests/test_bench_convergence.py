"""`python -m pretrain.bench convergence`: methods side by side at their best lr, on the smallest
settings (nano model, a few steps). The table's best lr is the argmin of the runs' own final eval
losses, the gap column is measured against the best AdamW, and every run leaves TensorBoard events."""
import json
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


def test_lr_grid_defaults_per_method_and_overrides():
    adamw, galore = convergence.Method.parse("adamw"), convergence.Method.parse("galore")
    assert convergence.lr_grid(adamw, []) == [1e-3, 2e-3, 5e-3]
    assert convergence.lr_grid(galore, []) == [2.5e-3, 5e-3, 1e-2, 2e-2]
    assert convergence.lr_grid(galore, ["1e-2", "2e-2"]) == [1e-2, 2e-2]
    assert convergence.lr_grid(galore, ["1e-2", "adamw=3e-3"]) == [1e-2]
    assert convergence.lr_grid(adamw, ["1e-2", "adamw=3e-3,4e-3"]) == [3e-3, 4e-3]


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
    runs = [convergence.Run(convergence.Method.parse("galore"), lr, 0, None, {"final_eval_loss": loss})
            for lr, loss in ((1e-2, float("nan")), (5e-3, 4.9), (2e-3, 5.1))]
    assert convergence.best_runs(runs, runs[0].method)[0] == 5e-3


def test_plot_is_optional(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert convergence.plot([], tmp_path / "curves.png", "t") is False


def test_three_runs_side_by_side_pick_each_methods_best_lr(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--methods", "adamw", "rank2=subtrack++,geodesic_rank=2", "--lrs", "adamw=1e-3,5e-3", "rank2=5e-3",
            "--size", "nano", "--steps", "4", "--out", str(out), "--jobs", "2",
            "--set", "train.eval_every=2", "train.warmup_steps=1", "optim.update_interval=2", "train.eval_batches=1"]
    assert convergence.main(argv) == 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("[") and "/3] " in line for line in printed.splitlines()) == 3  # one line per run
    summaries = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}
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
    table = (out / "results.md").read_text()
    assert "| adamw |" in table and "| rank2 |" in table and "Command: `python -m pretrain.bench convergence" in table
    assert (out / "curves.png").is_file() or convergence.PLOT_HINT in printed
