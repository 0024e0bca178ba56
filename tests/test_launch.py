"""Launch scripts (launch/): syntax, --help, a missing config, the commands they build, and the
SLURM script's preemption path (SIGUSR1 forwarded to srun, then requeue) with stand-in
`srun` / `scontrol` programs on PATH."""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/torchrun.sh", "launch/deepspeed.sh", "launch/tensorboard.sh", "launch/slurm/pretrain.sbatch"]
CONFIG = "configs/deepspeed/zero0.json"  # any file that exists stands in for a run config here
RUN_CONFIG = "configs/tiny_sample.yaml"  # a real one, where the script checks it before starting the ranks
# PYTHON for the scripts: `-m pretrain --check` runs the real check; anything else (the launcher) is recorded
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ " $* " == *" --check "* ]]; then exec "$REAL_PYTHON" "$@"; fi
echo "$@" > "$FAKE_DIR/launched.args"
"""


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


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return tmp_path, {"PYTHON": str(path), "REAL_PYTHON": sys.executable, "FAKE_DIR": str(tmp_path),
                      "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/deepspeed.sh"])
def test_scripts_check_the_config_once_before_starting_the_ranks(fake_python, script):
    tmp, env = fake_python
    env = {**env, "NGPU": "2", "DEEPSPEED": str(tmp / "python")}
    refused = run(script, RUN_CONFIG, env=env)  # the demo's batch of 16 sequences at micro batch 16 on 2 processes
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("pretrain: config error: train.total_batch_size = 16 is not divisible by ")
    assert "lower train.micro_batch_size to 8" in refused.stderr
    assert not (tmp / "launched.args").exists()  # no rank was started
    ok = run(script, RUN_CONFIG, "--set", "train.micro_batch_size=8", env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"pretrain: config {RUN_CONFIG} is valid for 2 process(es)")
    launched = (tmp / "launched.args").read_text()  # then the launcher, once
    assert ("-m torch.distributed.run" in launched) == (script == "launch/torchrun.sh")
    assert launched.rstrip().endswith("pretrain --config configs/tiny_sample.yaml " + (
        "--deepspeed configs/deepspeed/zero0.json " if "deepspeed" in script else "") + "--set train.micro_batch_size=8")


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


FITS_TWO = ["train.max_steps=90", "train.micro_batch_size=8"]  # the demo's batch on the fake job's 2 x 1 GPU


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1",
           "PYTHON": sys.executable, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}  # the real config check
    return tmp_path, env


def test_sbatch_forwards_sigusr1_to_the_ranks_then_requeues(fake_slurm):
    tmp, env = fake_slurm
    job = subprocess.Popen(["bash", "launch/slurm/pretrain.sbatch", RUN_CONFIG, "--set", *FITS_TWO], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 40  # the config check first
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
    assert args[args.index("--rdzv_id") + 1] == "4242" and args[args.index("--nproc_per_node") + 1] == "1"
    assert "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args
    assert args[-9:] == ["-m", "pretrain", "--config", RUN_CONFIG, "--resume", "auto", "--set", *FITS_TWO]
    assert (tmp / "srun.signal").read_text().strip() == "USR1"
    assert (tmp / "scontrol.args").read_text().split() == ["requeue", "4242"]


def test_sbatch_without_preemption_returns_the_training_exit_code_and_does_not_requeue(fake_slurm):
    tmp, env = fake_slurm
    job = subprocess.run(["bash", "launch/slurm/pretrain.sbatch", RUN_CONFIG, "--set", *FITS_TWO], cwd=ROOT,
                         env={**env, "FAKE_SRUN_EXIT": "3"}, capture_output=True, text=True, timeout=60)
    assert job.returncode == 3
    assert not (tmp / "scontrol.args").exists()


def test_sbatch_checks_the_config_before_srun_starts_any_rank(fake_slurm):
    tmp, env = fake_slurm  # 2 nodes x 1 GPU: the demo's batch of 16 at micro batch 16 cannot split over 2
    job = subprocess.run(["bash", "launch/slurm/pretrain.sbatch", RUN_CONFIG], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert job.returncode == 2 and len(job.stderr.splitlines()) == 1, job.stderr
    assert job.stderr.startswith("pretrain: config error: train.total_batch_size = 16 is not divisible by ")
    assert not (tmp / "srun.args").exists()
