"""SIGTERM / SIGUSR1 (SLURM preemption): checkpoint at the next step boundary, exit 0, resume continues."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pretrain import train as train_module
from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pretrain.config import load_config
from pretrain.stop import StopRequest
from tests.nano import nano_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NANO = nano_yaml(optim={"lr": 1.0e-3}, train={"total_batch_size": 2, "max_steps": 100000, "eval_batches": 1})


def metric_steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f.read().splitlines()) if "train/loss" in r]


def signal_a_training_run(tmp_path, signum):
    """`python -m pretrain` on the nano config, sent `signum` once it is stepping: (process, stdout,
    stderr, run dir, the command and its environment)."""
    config = tmp_path / "nano.yaml"
    config.write_text(NANO)
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "pretrain", "--config", str(config), "--set", f"log.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(metric_steps(run_dir)) < 2:  # it is stepping
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, out, err, run_dir, cmd, env


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc, out, err, run_dir, cmd, env = signal_a_training_run(tmp_path, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out

    last = metric_steps(run_dir)[-1]
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step_{last:08d}"  # saved at the step it stopped
    assert load_checkpoint(checkpoint)["trainer"]["step"] == last

    resumed = subprocess.run([*cmd, "train.steps_per_run=2", "--resume", "auto"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {last}" in resumed.stdout
    assert metric_steps(run_dir)[-2:] == [last + 1, last + 2]
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{last + 2:08d}"


def test_ctrl_c_saves_like_sigterm_and_exits_130_without_a_traceback(tmp_path):
    proc, out, err, run_dir, _, _ = signal_a_training_run(tmp_path, signal.SIGINT)
    assert proc.returncode == 130, err  # 128 + SIGINT, as a shell reports Ctrl-C
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped by SIGINT" in out
    last = metric_steps(run_dir)[-1]
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step_{last:08d}"


def test_sigusr1_in_process_stops_at_next_step_boundary(tmp_path, monkeypatch):
    """The handler only sets a flag: the step that was running finishes, then a checkpoint is saved."""
    config = tmp_path / "nano.yaml"
    config.write_text(NANO)
    cfg = load_config(config, [f"log.run_dir={tmp_path / 'run'}"], world_size=1)

    class SignalDuringStep3(train_module.MetricsLogger):
        def log(self, step, scalars):
            super().log(step, scalars)
            if step == 3 and "train/loss" in scalars:
                os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train_module, "MetricsLogger", SignalDuringStep3)
    previous = signal.getsignal(signal.SIGUSR1)
    summary = train_module.train(cfg)
    assert summary["stopped_by"] == "SIGUSR1" and summary["step"] == 3
    assert summary["checkpoint"].endswith("step_00000003")
    assert signal.getsignal(signal.SIGUSR1) == previous  # the handler is removed after training


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_request_records_signal_and_restores_handlers(signum):
    before = signal.getsignal(signum)
    with StopRequest() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signum)
        assert stop.signum == signum
    assert signal.getsignal(signum) == before


def test_ranks_agree_on_the_reduced_value_when_a_signal_lands_after_the_reduce():
    """With several ranks the stop decision is the all-reduced flag alone: a signal that reaches this
    rank after the reduce returned (its peers saw no stop) waits for the next check, else this rank
    would leave the loop while its peers train on and both hang in mismatched collectives."""
    def reduce_then_signal(values):  # the peers' flags are 0; the signal lands just after
        os.kill(os.getpid(), signal.SIGUSR1)
        return values

    with StopRequest(world_size=2, check_every=5) as stop:
        assert stop.agreed(5, reduce_then_signal) is None  # the peers did not see it: neither does this rank, yet
        assert stop.signum == signal.SIGUSR1
        assert stop.agreed(6, lambda values: values.fill_(99.0)) is None  # not a check step: no collective
        assert stop.agreed(10, lambda values: values) == signal.SIGUSR1  # the next check carries it to every rank
        stop.signum = None  # a peer's signal alone stops this rank too
        assert stop.agreed(15, lambda values: values.fill_(float(signal.SIGTERM))) == signal.SIGTERM
    with StopRequest(world_size=1, check_every=5) as alone:
        assert alone.agreed(3, None) is None  # one process: its own flag every step, no collective
        os.kill(os.getpid(), signal.SIGTERM)
        assert alone.agreed(3, None) == signal.SIGTERM