"""A used run dir is never silently restarted (pretrain/rundir.py): without --resume it is refused in one
line naming the newest checkpoint and the three ways on; --restart moves the old contents aside."""
import pytest

from pretrain import __main__ as cli
from pretrain.checkpoint import list_checkpoints
from pretrain.config import load_config
from pretrain.train import train
from tests.nano import nano_config, read_metrics

SHORT = ["train.max_steps=3", "train.eval_batches=1"]


def first_run(tmp_path, tensorboard="false"):
    run_dir = tmp_path / "run"
    train(load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", f"log.tensorboard={tensorboard}", *SHORT],
                      world_size=1))
    return run_dir


def argv(tmp_path, run_dir, *extra):
    return ["--config", str(nano_config(tmp_path)), "--set", f"log.run_dir={run_dir}", *SHORT, *extra]


def test_rerunning_the_same_command_is_refused_in_one_line_and_changes_nothing(tmp_path, capsys):
    run_dir = first_run(tmp_path, tensorboard="true")
    before = {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".lock"}
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(argv(tmp_path, run_dir, "log.tensorboard=true")) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pretrain: run dir {run_dir} holds an earlier run"), err
    for words in (f"newest checkpoint {run_dir / 'checkpoints' / 'step_00000003'}", "--resume auto",
                  "log.run_dir", "--restart"):
        assert words in lines[0]
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # nothing appended
    after = {p.relative_to(run_dir): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".lock"}
    assert after == before  # no second event file, no checkpoint renamed abandoned-*


def test_restart_moves_the_old_run_aside_says_where_and_starts_fresh(tmp_path, capsys):
    run_dir = first_run(tmp_path)
    capsys.readouterr()
    assert cli.main(argv(tmp_path, run_dir, "--restart")) == 0
    out = capsys.readouterr().out
    moved = [line for line in out.splitlines() if line.startswith("pretrain: --restart: moved")]
    assert len(moved) == 1, out
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and str(old[0]) in moved[0]
    assert [p.name for p in list_checkpoints(old[0] / "checkpoints")] == ["step_00000003"]
    assert [r["step"] for r in read_metrics(old[0]) if "train/loss" in r] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3]  # once, not twice
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]


def test_restart_with_resume_is_refused_and_resume_auto_continues(tmp_path, capsys):
    run_dir = first_run(tmp_path)
    capsys.readouterr()
    assert cli.main(argv(tmp_path, run_dir, "--restart", "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--restart and --resume auto contradict each other" in err[0]
    assert cli.main(argv(tmp_path, run_dir, "train.max_steps=4", "--resume", "auto")) == 0
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("leftover", ["config.yaml", ".lock"])
def test_a_run_dir_without_checkpoints_or_metrics_starts_fresh(tmp_path, leftover):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / leftover).write_text("from a run that died during set-up\n")
    assert cli.main(argv(tmp_path, run_dir)) == 0
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3]


def test_restart_outranks_a_recipe_that_resumes_by_default(tmp_path, capsys):
    """The C4 recipes set checkpoint.resume: auto; --restart still starts over (an explicit --resume does not)."""
    run_dir = first_run(tmp_path)
    config = nano_config(tmp_path, "resuming.yaml", checkpoint={"resume": "auto"})
    assert cli.main(["--config", str(config), "--set", f"log.run_dir={run_dir}", *SHORT, "--restart"]) == 0
    assert "pretrain: --restart: moved" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3]
