"""Bad input is one line and exit status 2, never a traceback, and no checkpoint can run code: the
command line (`python -m pretrain`, `python -m pretrain.export`) on the nano model, each case a few steps."""
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch

from pretrain.checkpoint import write_manifest
from pretrain.config import load_config
from pretrain.train import train
from tests.distributed import LAUNCHER_KEYS, start_ranks
from tests.nano import nano_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NANO = nano_yaml(optim={"name": "adamw", "lr": 3.0e-3}, train={"max_steps": 2, "warmup_steps": 0, "eval_batches": 1})


def run(module, *args, env=None, timeout=120):
    """`python -m module ARGS` in a fresh process, outside any launcher (no RANK, no MASTER_ADDR)."""
    base = {k: v for k, v in os.environ.items()
            if k not in LAUNCHER_KEYS and not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})})


def assert_one_line(result, *words, status=2):
    """Exit `status`, and stderr is exactly one line holding every word (no traceback)."""
    lines = result.stderr.splitlines()
    assert result.returncode == status and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "nano.yaml"
    path.write_text(NANO)
    return path


# ----------------------------------------------------------------------------- no checkpoint runs code

class RunsCode:
    """Unpickled, calls os.system: what a crafted dcp/.metadata would do to whoever loads it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def crafted(config, tmp_path_factory):
    """An fsdp (DCP) checkpoint of 2 nano steps whose dcp/.metadata was replaced by a pickle that runs
    code, its manifest rewritten to match (whoever crafts the file rewrites it too)."""
    tmp = tmp_path_factory.mktemp("crafted")
    summary = train(load_config(config, [f"log.run_dir={tmp / 'run'}", "train.parallelism=fsdp"], world_size=1))
    checkpoint = tmp / "run" / "checkpoints" / "step_00000002"
    assert summary["checkpoint"] == str(checkpoint)
    marker = tmp / "code_ran"
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    pickle.loads(pickle.dumps(RunsCode(tmp / "probe")))  # the pickle does run code when plainly unpickled
    assert (tmp / "probe").exists()
    return tmp, checkpoint, marker


def test_a_dcp_checkpoint_whose_metadata_runs_code_is_refused_by_export(crafted):
    tmp, checkpoint, marker = crafted
    result = run("pretrain.export", checkpoint, tmp / "hf")
    assert_one_line(result, f"{checkpoint}/dcp/.metadata", "posix.system", "would run code")
    assert not marker.exists()


def test_a_dcp_checkpoint_whose_metadata_runs_code_is_refused_on_resume(crafted, config):
    tmp, checkpoint, marker = crafted
    result = run("pretrain", "--config", config, "--set", f"log.run_dir={tmp / 'run'}", "train.parallelism=fsdp",
                 "train.max_steps=3", "--resume", "auto")
    line = assert_one_line(result, f"{checkpoint}/dcp/.metadata", "posix.system", "would run code")
    assert line.startswith("pretrain: checkpoint file ")
    assert not marker.exists()


def test_metadata_unpickler_allows_what_dcp_writes_and_nothing_else(config, tmp_path):
    from pretrain.dcp_state import UnsafeCheckpoint, read_metadata

    # A real checkpoint's metadata (bfloat16 weights too) reads back; every global it names is allowed.
    summary = train(load_config(config,
                                [f"log.run_dir={tmp_path / 'run'}", "train.parallelism=fsdp", "train.max_steps=1",
                                 "train.param_dtype=bfloat16", "train.eval_batches=0"], world_size=1))
    metadata = read_metadata(os.path.join(summary["checkpoint"], "dcp"))
    dtypes = {md.properties.dtype for md in metadata.state_dict_metadata.values() if hasattr(md, "properties")}
    assert torch.bfloat16 in dtypes and len(metadata.state_dict_metadata) > 20
    for payload in (pickle.dumps(print), b"not a pickle", pickle.dumps({"a": 1})):
        (tmp_path / ".metadata").write_bytes(payload)
        with pytest.raises(UnsafeCheckpoint, match=f"checkpoint file {tmp_path}/.metadata "):
            read_metadata(tmp_path)


# ----------------------------------------------------------------------------- one line, exit 2

def write_c4(directory, texts):
    from data.c4 import write_shard

    os.makedirs(directory, exist_ok=True)
    for split in ("train", "validation"):
        write_shard(os.path.join(directory, f"c4-{split}.00000-of-00001.json.gz"),
                    [{"text": t, "timestamp": "", "url": ""} for t in texts])


@pytest.mark.parametrize("case", ["garbage_tokenizer", "empty_tokenizer", "tokenizer_too_large", "no_documents",
                                  "strict", "unreachable_hub", "slurm_without_master_addr", "batch_on_two"])
def test_user_errors_are_one_line_and_exit_2(config, tmp_path, case):
    args, env = ["--set", f"log.run_dir={tmp_path / 'run'}"], {}
    if case in ("garbage_tokenizer", "empty_tokenizer"):
        (tmp_path / "t.model").write_bytes(b"garbage" if case == "garbage_tokenizer" else b"")
        args.append(f"data.tokenizer={tmp_path / 't.model'}")
        words = ["pretrain: config error: tokenizer ", "t.model' is not a SentencePiece model", "'sample'"]
    elif case == "tokenizer_too_large":
        from data.sample import sample_tokenizer_path

        shutil.copy(sample_tokenizer_path(), tmp_path / "t.model")
        args += [f"data.tokenizer={tmp_path / 't.model'}", "model.vocab_size=1000"]
        words = ["pretrain: config error: tokenizer ", "has 8192 pieces but the model's vocab_size is 1000"]
    elif case == "no_documents":
        write_c4(tmp_path / "c4", ["", "  "])
        args.append(f"data.source={tmp_path / 'c4'}")
        words = ["pretrain: rank 0 stream 0", "received no documents from 1 local shard(s)", "or more data"]
    elif case == "strict":
        write_c4(tmp_path / "c4", ["fine text"] * 50)
        shard = tmp_path / "c4" / "c4-train.00000-of-00001.json.gz"
        import gzip

        lines = gzip.decompress(shard.read_bytes()).splitlines()
        shard.write_bytes(gzip.compress(b"\n".join(lines[:3] + [b"[" * 200000] + lines[3:]) + b"\n"))
        args += [f"data.source={tmp_path / 'c4'}", "data.strict=true"]
        words = ["pretrain: ", "c4-train.00000-of-00001.json.gz:4: malformed C4 line: RecursionError",
                 "set data.strict=false"]
    elif case == "unreachable_hub":
        args.append("data.source=allenai/c4")
        env = {"HF_HUB_OFFLINE": "1"}  # refused at once, as an unreachable hub is after datasets' retries
        words = ["pretrain: data.source = 'allenai/c4' (en, validation) cannot be opened on the hub",
                 "a local directory of C4 shards"]
    elif case == "slurm_without_master_addr":
        env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
        words = ["pretrain: MASTER_ADDR is not set", "export MASTER_ADDR="]
    else:  # the demo's batch on 2 processes
        args += ["train.micro_batch_size=16", "train.total_batch_size=16"]
        env = {"WORLD_SIZE": "2"}
        words = ["pretrain: config error: train.total_batch_size = 16 is not divisible by micro_batch_size x "
                 "world_size = 16 x 2 = 32", "lower train.micro_batch_size to 8 (--set train.micro_batch_size=8)"]
    start = time.perf_counter()
    result = run("pretrain", "--config", config, *args, env=env)
    assert_one_line(result, *words)
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def one_rank_checkpoint(config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    train(load_config(config, [f"log.run_dir={tmp / 'run'}"], world_size=1))
    return tmp / "run"


@pytest.mark.parametrize("case", ["micro_batch", "world_size"])
def test_a_resume_the_data_position_cannot_follow_is_one_line_before_any_takes_effect_line(
        one_rank_checkpoint, config, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_checkpoint, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    args = ["optim.lr=1e-3", "train.max_steps=3"]  # a change that takes effect, and is not printed
    if case == "micro_batch":
        args.append("train.micro_batch_size=1")
        words = ["pretrain: resume: train.micro_batch_size cannot change at the same number of processes",
                 f"checkpoint {checkpoint} has 2, this run 1", "set it back to 2"]
    else:  # as if written by 2 ranks (the manifest rewritten to match)
        trainer = torch.load(checkpoint / "trainer.pt", weights_only=True)
        torch.save({**trainer, "world_size": 2}, checkpoint / "trainer.pt")
        (checkpoint / "manifest.json").unlink()
        write_manifest(checkpoint)
        words = [f"pretrain: resume: checkpoint {checkpoint} was written by 2 rank(s); this run has 1",
                 "checkpoint.allow_world_size_change=true"]
    result = run("pretrain", "--config", config, "--set", f"log.run_dir={run_dir}", *args, "--resume", "auto")
    assert_one_line(result, *words)
    assert "takes effect" not in result.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]


def test_check_validates_in_one_process_and_exits(config, tmp_path):
    ok = run("pretrain", "--check", "--config", config, "--set", f"log.run_dir={tmp_path / 'run'}",
             env={"WORLD_SIZE": "2"})
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert ok.stdout == f"pretrain: config {config} is valid for 2 process(es); run dir {tmp_path / 'run'}\n"
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    bad = run("pretrain", "--check", "--config", config, "--set", "train.max_step=5")
    assert_one_line(bad, "pretrain: config error: unknown key 'max_step' in section 'train'")


def test_a_config_error_under_torchrun_is_printed_by_rank_0_alone(config):
    from tests.distributed import run_module

    done = run_module("pretrain", ["--config", str(config), "--set", "train.max_step=5"], world_size=2, timeout=60)
    assert [d.returncode for d in done] == [2, 2]
    assert_one_line(done[0], "pretrain: config error: unknown key 'max_step'")
    assert done[1].stderr == "" and done[1].stdout == ""


# ----------------------------------------------------------------------------- a hung peer

STUCK_RANK_1 = """
import contextlib, os, sys, time
import pretrain.train
if os.environ["RANK"] == "1":  # joins the group, then never reaches the first collective
    @contextlib.contextmanager
    def stuck(*args, **kwargs):
        time.sleep(120)
        yield
    pretrain.train.locked_run_dir = stuck
from pretrain.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_whose_peer_never_enters_a_collective_ends_after_collective_timeout_s(config, tmp_path):
    procs = start_ranks(["-c", STUCK_RANK_1, "--config", str(config), "--set", f"log.run_dir={tmp_path / 'run'}",
                         "train.collective_timeout_s=3"], 2)
    try:
        start = time.perf_counter()
        out, err = procs[0].communicate(timeout=60)
        waited = time.perf_counter() - start
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    result = subprocess.CompletedProcess(procs[0].args, procs[0].returncode, out, err)
    assert_one_line(result, "pretrain: rank 0: a collective failed", "train.collective_timeout_s = 3", status=1)
    assert waited < 25  # start-up and 3 s, not torch's default of 30 minutes
