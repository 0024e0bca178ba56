"""Launch scripts (launch/): syntax, --help, a missing config, the commands they build, and the
SLURM script's preemption path (SIGUSR1 forwarded to srun, then requeue) with stand-in
`srun` / `scontrol` programs on PATH."""
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/torchrun.sh", "launch/deepspeed.sh", "launch/tensorboard.sh", "launch/slurm/pretrain.sbatch"]
CONFIG = "configs/deepspeed/zero0.json"  # any file that exists stands in for a run config here


def run(script, *args, env=None, timeout=30):
    return subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_prints_usage_on_help(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
    out = run(script, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_config_fails_clearly(script):
    out = run(script, "configs/no_such_run.yaml", env={"SLURM_JOB_ID": "1"})
    assert out.returncode == 2
    assert "'configs/no_such_run.yaml' not found" in out.stderr


def test_deepspeed_script_refuses_a_missing_deepspeed_config():
    out = run("launch/deepspeed.sh", CONFIG, env={"DS_CONFIG": "configs/deepspeed/nope.json"})
    assert out.returncode == 2 and "'configs/deepspeed/nope.json' not found" in out.stderr


def test_torchrun_script_builds_single_and_multi_node_commands():
    single = run("launch/torchrun.sh", CONFIG, "--set", "train.max_steps=5", env={"DRY_RUN": "1", "NGPU": "2"})
    assert single.stdout.split() == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                                     "--nproc_per_node", "2", "--signals-to-handle",
                                     "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", "pretrain", "--config", CONFIG,
                                     "--set", "train.max_steps=5"]
    multi = run("launch/torchrun.sh", CONFIG, env={"DRY_RUN": "1", "NGPU": "8", "NNODES": "2", "NODE_RANK": "1",
                                                   "MASTER_ADDR": "node0"}).stdout
    assert "--nnodes 2 --node_rank 1 --master_addr node0 --master_port 29500 --nproc_per_node 8" in multi


def test_deepspeed_and_tensorboard_scripts_pass_arguments_through(tmp_path):
    ds = run("launch/deepspeed.sh", CONFIG, "--resume", "auto", env={"DRY_RUN": "1", "NGPU": "4"}).stdout.split()
    assert ds == ["deepspeed", "--num_gpus", "4", "--module", "pretrain", "--config", CONFIG,
                  "--deepspeed", "configs/deepspeed/zero0.json", "--resume", "auto"]
    tb = run("launch/tensorboard.sh", str(tmp_path), env={"DRY_RUN": "1"}).stdout.split()
    assert tb[tb.index("--host") + 1] == "127.0.0.1" and tb[tb.index("--logdir") + 1] == str(tmp_path)


FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" > "$FAKE_DIR/srun.args"
trap 'echo USR1 > "$FAKE_DIR/srun.signal"; exit 0' USR1
[[ "${FAKE_SRUN_EXIT:-}" != "" ]] && exit "$FAKE_SRUN_EXIT"
for _ in $(seq 300); do sleep 0.1; done
exit 9
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node7\\nnode8\\n'; exit 0; fi
echo "$@" >> "$FAKE_DIR/scontrol.args"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    return tmp_path, env


def test_sbatch_forwards_sigusr1_to_the_ranks_then_requeues(fake_slurm):
    tmp, env = fake_slurm
    job = subprocess.Popen(["bash", "launch/slurm/pretrain.sbatch", CONFIG, "--set", "train.max_steps=9"], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not (tmp / "srun.args").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # let the fake srun install its trap
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
        out, err = job.communicate(timeout=20)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, err
    args = (tmp / "srun.args").read_text().split()
    assert args[args.index("--rdzv_endpoint") + 1] == "node7:29500"
    assert args[args.index("--rdzv_id") + 1] == "4242" and args[args.index("--nproc_per_node") + 1] == "8"
    assert "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args
    assert args[-8:] == ["-m", "pretrain", "--config", CONFIG, "--resume", "auto", "--set", "train.max_steps=9"]
    assert (tmp / "srun.signal").read_text().strip() == "USR1"
    assert (tmp / "scontrol.args").read_text().split() == ["requeue", "4242"]


def test_sbatch_without_preemption_returns_the_training_exit_code_and_does_not_requeue(fake_slurm):
    tmp, env = fake_slurm
    job = subprocess.run(["bash", "launch/slurm/pretrain.sbatch", CONFIG], cwd=ROOT, env={**env, "FAKE_SRUN_EXIT": "3"},
                         capture_output=True, text=True, timeout=20)
    assert job.returncode == 3
    assert not (tmp / "scontrol.args").exists()
