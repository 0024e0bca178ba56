"""The training loop end to end on the nano model and the bundled sample corpus (CPU, float32)."""
import math
import os
import subprocess
import sys

import pytest
import torch

from pretrain import __main__ as cli
from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from pretrain.config import load_config
from pretrain.train import train
from tests.nano import assert_identical, nano_config, nano_yaml, read_metrics, run_cli, train_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resume_equals_uninterrupted(tmp_path):
    config = nano_config(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_cli("--config", config, "--set", f"log.run_dir={straight}")
    assert result.returncode == 0, result.stderr
    result = run_cli("--config", config, "--set", f"log.run_dir={resumed}", "train.steps_per_run=10")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step_00000010"]
    result = run_cli("--config", config, "--set", f"log.run_dir={resumed}", "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "resume: from" in result.stdout and "at step 10" in result.stdout

    losses_a, losses_b = train_losses(straight), train_losses(resumed)
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, 21))
    assert losses_a == losses_b  # bit-identical per-step losses, JSON round trip included
    a = load_checkpoint(latest_checkpoint(straight / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))
    assert a["trainer"]["step"] == b["trainer"]["step"] == 20
    for part in ("model", "optimizer"):
        assert_identical(a[part], b[part], part)
    for part in ("scheduler", "data"):
        assert_identical(a["trainer"][part], b["trainer"][part], part)


def test_short_run_lowers_eval_loss_and_writes_tensorboard_jsonl_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "log.tensorboard=true", "train.max_steps=30",
                                              "train.eval_every=15", "checkpoint.every=10", "checkpoint.keep_last=2",
                                              "checkpoint.resume=auto"], world_size=1)
    summary = train(cfg)
    assert "no complete checkpoint" in capsys.readouterr().out  # --resume auto on a fresh run says so

    evals = dict(summary["evals"])
    assert sorted(evals) == [0, 15, 30]  # step 0, every eval_every, the end
    assert evals[30] < evals[0] - 0.5, evals
    assert summary["step"] == 30 and summary["stopped_by"] is None

    records = read_metrics(run_dir)
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time", "model_tflops"):
        assert all(r[key] > 0 for r in steps), key
    eval_records = [r for r in records if "eval/loss" in r]
    assert [r["eval/perplexity"] for r in eval_records] == pytest.approx([torch.exp(torch.tensor(r["eval/loss"])).item()
                                                                          for r in eval_records], rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "eval/perplexity", "lr", "grad_norm", "tokens_per_s", "step_time"} <= tags
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 15, 30]
    assert events.Scalars("train/loss")[-1].value == pytest.approx(steps[-1]["train/loss"])

    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_00000020", "step_00000030"]
    final = load_checkpoint(run_dir / "checkpoints" / "step_00000030")  # weights_only=True inside
    from data.loader import build_tokenizer

    vocab = build_tokenizer(cfg.data).vocab_size
    assert final["model_config"]["vocab_size"] == -(-vocab // 64) * 64 and final["model_config"]["max_seq_len"] == 32
    assert (run_dir / "config.yaml").read_text() == final["config_yaml"]


def test_tokenizer_larger_than_model_vocab_is_refused_before_any_step(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "model.vocab_size=1000"], world_size=1)
    with pytest.raises(ValueError, match="vocab_size"):
        train(cfg)
    assert not (run_dir / "metrics.jsonl").exists()


def test_cli_config_error_exits_2_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(["--config", str(nano_config(tmp_path)), "--set", f"log.run_dir={run_dir}", "train.max_step=5"])
    assert code == 2
    assert "max_step" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize("case", ["tokenizer", "data_glob", "yaml", "run_dir"])
def test_cli_user_errors_are_one_line_with_exit_2_and_no_traceback(tmp_path, case):
    config, overrides = nano_config(tmp_path), [f"log.run_dir={tmp_path / 'run'}"]
    (tmp_path / "a_file").write_text("")
    if case == "tokenizer":
        overrides.append(f"data.tokenizer={tmp_path / 'none.model'}")
        words = ["data.tokenizer", "none.model", "SentencePiece"]
    elif case == "data_glob":
        overrides.append(f"data.source={tmp_path / 'c4' / 'c4-train.*.json.gz'}")
        words = ["data.source", "c4-train.*.json.gz", "matches no file"]
    elif case == "yaml":
        broken = nano_yaml().replace("  seq_len: 32", "  seq_len: [32")
        config = nano_config(tmp_path, "broken.yaml", broken)
        line = broken.splitlines().index("  seq_len: [32") + 2  # 1-based; the parser stops on the next line
        words = ["broken.yaml", f"invalid YAML at line {line}", "fix the YAML"]
    else:  # as root no permission stops a write, but no directory can be made under a file
        overrides.append(f"log.run_dir={tmp_path / 'a_file' / 'run'}")
        words = ["log.run_dir", "a_file' is a file", "set log.run_dir"]
    result = run_cli("--config", config, "--set", *overrides, "train.max_steps=2")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain: config error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "run").exists()


QUIET_PROBE = """
import sys
import optim.subtrack
assert "bitsandbytes" not in sys.modules, "importing the optimizers imported bitsandbytes"
from pretrain.__main__ import main
code = main(sys.argv[1:])
print("imported:", [m for m in ("bitsandbytes", "deepspeed") if m in sys.modules])
sys.exit(code)
"""


def test_a_32_bit_run_prints_only_our_lines_and_imports_neither_bitsandbytes_nor_deepspeed(tmp_path):
    # bitsandbytes prints "Failed to load CPU gemm_4bit_forward from kernels-community ..." when imported
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", QUIET_PROBE, "--config", nano_config(tmp_path), "--set",
                             f"log.run_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_batches=1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout
    output = result.stdout + result.stderr
    assert "kernels" not in output and "gemm_4bit" not in output
    assert result.stderr == ""


def test_loading_a_config_does_not_import_dtensor():
    """torch.distributed.tensor takes about a second to import; a config refusal (or --check) must not pay it
    unless the run shards with FSDP2."""
    probe = ("import sys; from pretrain.config import load_config; import pretrain.train; "
             "load_config('configs/tiny_sample.yaml'); print('torch.distributed.tensor' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr


class FailingLoader:
    """The real train loader, raising at its micro-batch `fail_at` (0-based), as a lost disk would."""

    def __init__(self, loader, fail_at):
        self.loader, self.fail_at = loader, fail_at

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.fail_at:
                raise OSError("shard vanished")
            yield batch

    def __getattr__(self, name):  # state_dict, load_state_dict, stats
        return getattr(self.loader, name)


def test_a_failure_between_steps_saves_the_last_completed_step_and_resume_continues(tmp_path, monkeypatch,
                                                                                    capsys):
    import data.loader

    build = data.loader.build_train_loader
    # 2 micro-batches per step: batch 5 is the second of step 3, so step 3 had already read one batch
    monkeypatch.setattr(data.loader, "build_train_loader", lambda *a, **k: FailingLoader(build(*a, **k), 5))
    run_dir, overrides = tmp_path / "run", ["train.max_steps=4", "train.eval_batches=1"]
    with pytest.raises(OSError, match="shard vanished"):
        train(load_config(nano_config(tmp_path), overrides + [f"log.run_dir={run_dir}"], world_size=1))
    err = capsys.readouterr().err
    assert "step 3 failed (OSError('shard vanished'))" in err and "saved checkpoint" in err and "of step 2" in err
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]  # checkpoint.every is 0

    monkeypatch.undo()
    resumed = train(load_config(nano_config(tmp_path), overrides + [f"log.run_dir={run_dir}",
                                                                     "checkpoint.resume=auto"], world_size=1))
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    straight = train(load_config(nano_config(tmp_path), overrides + [f"log.run_dir={tmp_path / 'straight'}"],
                                 world_size=1))
    assert resumed["train_losses"] == straight["train_losses"][2:]  # the failed step's batch is read again


def test_when_the_save_after_a_failure_fails_too_the_original_error_is_raised(tmp_path, monkeypatch, capsys):
    import data.loader

    build = data.loader.build_train_loader
    monkeypatch.setattr(data.loader, "build_train_loader", lambda *a, **k: FailingLoader(build(*a, **k), 5))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("")  # no checkpoint directory can be made here
    with pytest.raises(OSError, match="shard vanished"):
        train(load_config(nano_config(tmp_path), ["train.max_steps=4", "train.eval_batches=1",
                                                  f"log.run_dir={run_dir}"], world_size=1))
    assert "step 3 failed (OSError('shard vanished')); saving step 2 failed too" in capsys.readouterr().err


def test_a_failure_in_the_optimizer_step_saves_nothing(tmp_path, monkeypatch, capsys):
    import optim.factory

    build, calls = optim.factory.build_optimizer, []

    def failing_optimizer(model, cfg):  # the third step fails; its weights may be half updated
        optimizer = build(model, cfg)

        def pre_step(*args):
            calls.append(1)
            if len(calls) == 3:
                raise FloatingPointError("update is not finite")

        optimizer.register_step_pre_hook(pre_step)
        return optimizer

    monkeypatch.setattr(optim.factory, "build_optimizer", failing_optimizer)
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError):
        train(load_config(nano_config(tmp_path), ["train.max_steps=4", "train.eval_batches=1",
                                                  f"log.run_dir={run_dir}"], world_size=1))
    assert not (run_dir / "checkpoints").exists() and "saved checkpoint" not in capsys.readouterr().err


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """micro 2 x 2 accumulation steps and micro 4 x 1 see the same 4 sequences: same update."""
    runs = {}
    for micro in (2, 4):
        cfg = load_config(nano_config(tmp_path), [f"log.run_dir={tmp_path / str(micro)}", "train.max_steps=3",
                                                  f"train.micro_batch_size={micro}", "train.eval_batches=0"],
                          world_size=1)
        runs[micro] = train(cfg)
    assert runs[2]["train_losses"] == pytest.approx(runs[4]["train_losses"], rel=1e-5)
    a = load_checkpoint(runs[2]["checkpoint"])["model"]
    b = load_checkpoint(runs[4]["checkpoint"])["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def _collectives_job():
    """On each of 2 gloo ranks: all_gather_objects on a tiny model, then the replica check twice:
    identical weights, and after rank 1 moved one weight by one ulp (the second check's
    RuntimeError message is returned, None if it did not raise)."""
    import torch.distributed as dist

    from pretrain import distributed

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    out = {"gathered": distributed.all_gather_objects({"rank": rank}, world),
           "checksum": distributed.check_replicas(model, world, step=6), "mismatch": None}
    if rank == 1:
        with torch.no_grad():
            model.weight[1, 2] = torch.nextafter(model.weight[1, 2], torch.tensor(math.inf))
    try:
        distributed.check_replicas(model, world, step=7)
    except RuntimeError as e:
        out["mismatch"] = str(e)
    return out


@pytest.fixture(scope="module")
def two_rank_collectives():
    from tests.distributed import run_distributed

    return run_distributed(_collectives_job, 2)  # one spawn for the tests below


def test_all_gather_objects_gives_every_rank_every_object(two_rank_collectives):
    for out in two_rank_collectives:
        assert out["gathered"] == [{"rank": 0}, {"rank": 1}]


def test_replica_check_raises_on_every_rank_when_one_rank_weight_differs_by_one_ulp(two_rank_collectives):
    first, second = two_rank_collectives
    assert first["checksum"] == second["checksum"]  # identical replicas pass
    for message in (first["mismatch"], second["mismatch"]):  # both ranks raise: the check is collective
        assert message is not None and "step 7" in message and "weights differ" in message
        assert f"[{first['checksum']}, " in message  # rank 0 kept its checksum ...
        assert f", {first['checksum']}]" not in message  # ... rank 1's moved with one ulp


def test_two_ranks_checkpoint_each_data_position_and_resume(tmp_path):
    from tests.distributed import check_ok, run_module

    run_dir = tmp_path / "run"
    # checkpoint.every=2 also saves at the end step: every rank must agree not to save twice (collective)
    argv = ["--config", str(nano_config(tmp_path)), "--set", f"log.run_dir={run_dir}", "train.max_steps=4",
            "train.steps_per_run=2", "checkpoint.every=2"]
    check_ok(run_module("pretrain", argv, world_size=2))
    trainer = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["trainer"]
    assert trainer["step"] == 2 and trainer["world_size"] == 2
    assert [d["rank"] for d in trainer["data"]] == [0, 1]  # each rank's own stream position
    done = check_ok(run_module("pretrain", argv + ["--resume", "auto"], world_size=2))
    assert "at step 2" in done[0].stdout and done[1].stdout == ""  # only rank 0 prints
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_autocasts():
    from pretrain.train import autocast_context

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("auto", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    with autocast_context("float32", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    with autocast_context("bfloat16", torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8, 1)),  # torchrun / DeepSpeed launcher
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (9, 16, 1)),  # srun
])
def test_ranks_come_from_torchrun_deepspeed_or_slurm_environment(monkeypatch, env, expected):
    from pretrain import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.env_ranks() == expected


def test_deepspeed_local_rank_argument_sets_local_rank(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    code = cli.main(["--local_rank=3", "--config", str(nano_config(tmp_path)), "--set", "train.max_step=1"])
    assert code == 2 and os.environ["LOCAL_RANK"] == "3"


def test_subtrack_run_logs_subspace_movement_at_the_update_steps(tmp_path):
    """update_interval 2: the first step sets the subspaces up, then every projected matrix
    (q, k, v, o, gate, up, down of each layer) moves at steps 3 and 5, and at no other step."""
    from models.sizes import SIZES

    run_dir = tmp_path / "run"
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "optim.name=subtrack++", "optim.rank=8",
                                              "optim.update_interval=2", "train.max_steps=6", "train.eval_batches=0"],
                      world_size=1)
    summary = train(cfg)
    assert all(math.isfinite(loss) for loss in summary["train_losses"])
    moved = {r["step"]: r for r in read_metrics(run_dir) if "subspace/count" in r}
    projected = 7 * SIZES["nano"].num_layers
    assert {step: r["subspace/count"] for step, r in moved.items()} == {3: projected, 5: projected}
    for r in moved.values():  # a real rotation: some basis turned by a positive angle
        assert r["subspace/angle_max"] > 0 and 0 < r["subspace/angle_mean"] <= r["subspace/angle_max"]


def test_metrics_are_read_only_at_log_steps_and_train_losses_stay_complete(tmp_path):
    """log.log_every=4 over 7 steps: metrics at step 4 and the last (7), each with the values of its
    step; the subspaces move at steps 3, 5 and 7 (update_interval 2), so step 7's record sums the
    movement of steps 5 and 7; summary["train_losses"] still has every step, equal to the
    log_every=1 run's."""
    from models.sizes import SIZES

    runs = {}
    for every in (1, 4):
        run_dir = tmp_path / str(every)
        cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "optim.name=subtrack++", "optim.rank=8",
                                                  "optim.update_interval=2", "train.max_steps=7",
                                                  "train.eval_batches=0", f"log.log_every={every}"], world_size=1)
        runs[every] = (train(cfg), read_metrics(run_dir))
    (every_step, per_step), (summary, records) = runs[1], runs[4]
    assert summary["train_losses"] == every_step["train_losses"] and len(summary["train_losses"]) == 7
    logged = {r["step"]: r for r in records if "train/loss" in r}
    assert sorted(logged) == [4, 7]
    by_step = {r["step"]: r for r in per_step if "train/loss" in r}
    for step, r in logged.items():
        assert r["train/loss"] == by_step[step]["train/loss"] and r["grad_norm"] == by_step[step]["grad_norm"]
    moved = {r["step"]: r["subspace/count"] for r in records if "subspace/count" in r}
    projected = 7 * SIZES["nano"].num_layers
    assert moved == {4: projected, 7: 2 * projected}


def test_bfloat16_weights_train_with_float32_optimizer_state(tmp_path):
    """train.param_dtype=bfloat16: weights and gradients in bf16 (GaLore's 7B setting), SubTrack++
    bases and low-rank moments of the projected weights in float32; the loss still falls (CPU has
    no fast bf16: tiny run). The non-projected weights' Adam moments follow the weight dtype, as
    torch's AdamW does (optim/subtrack.py's choice)."""
    run_dir = tmp_path / "run"
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "train.param_dtype=bfloat16",
                                              "optim.name=subtrack++", "optim.rank=8", "optim.update_interval=3",
                                              "train.max_steps=10", "train.eval_batches=1"], world_size=1)
    summary = train(cfg)
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 0.1, summary["evals"]
    final = load_checkpoint(summary["checkpoint"])
    assert {t.dtype for t in final["model"].values() if t.is_floating_point()} == {torch.bfloat16}
    projected = [s for s in final["optimizer"]["state"].values() if "basis" in s]
    assert projected
    for s in projected:
        assert {s[key].dtype for key in ("basis", "exp_avg", "exp_avg_sq")} == {torch.float32}


PER_LAYER_RUN = ["optim.name=subtrack++", "optim.rank=8", "optim.update_interval=2", "train.max_steps=4",
                 "train.micro_batch_size=4", "train.grad_clip=0", "train.eval_batches=0"]


def test_per_layer_updates_train_exactly_like_the_normal_step(tmp_path):
    """optim.per_layer steps each weight in its gradient hook during backward; with one rank, no
    accumulation and no clipping that is the same update as optimizer.step() after backward."""
    runs = {}
    for per_layer in (False, True):
        cfg = load_config(nano_config(tmp_path), [f"log.run_dir={tmp_path / str(per_layer)}",
                                                  f"optim.per_layer={str(per_layer).lower()}", *PER_LAYER_RUN],
                          world_size=1)
        runs[per_layer] = train(cfg)
    assert runs[True]["mode"] == runs[False]["mode"] == "single"  # per-layer updates are an option of single
    assert "per-layer" in runs[True]["strategy"] and "per-layer" not in runs[False]["strategy"]
    assert runs[True]["train_losses"] == runs[False]["train_losses"]
    a = load_checkpoint(runs[True]["checkpoint"])
    b = load_checkpoint(runs[False]["checkpoint"])
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    norms = {k: [r["grad_norm"] for r in read_metrics(tmp_path / str(k)) if "grad_norm" in r] for k in runs}
    assert norms[True] == pytest.approx(norms[False], rel=1e-5)  # the hooks measure the same global norm


@pytest.mark.parametrize("overrides, world_size, words", [
    (["train.micro_batch_size=2"], 1, "accumulation"),
    ([], 2, "world size 2"),
    (["train.grad_clip=1.0"], 1, "grad_clip"),
    (["train.deepspeed=configs/deepspeed/zero0.json"], 1, "DeepSpeed"),
])
def test_per_layer_refusals_fire_when_the_config_is_loaded(tmp_path, overrides, world_size, words):
    from pretrain.config import ConfigError

    base = [o for o in PER_LAYER_RUN if not o.startswith("train.micro_batch_size")] + ["train.micro_batch_size=4"]
    if world_size == 2:
        base = [o for o in base if not o.startswith("train.micro_batch_size")] + ["train.micro_batch_size=2"]
    with pytest.raises(ConfigError, match=words):
        load_config(nano_config(tmp_path), [*base, "optim.per_layer=true", *overrides], world_size=world_size)


def test_per_layer_refusal_fires_at_build_before_any_step(tmp_path):
    """A config changed after load_config (train(cfg) from Python) is still checked before any work."""
    run_dir = tmp_path / "run"
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "optim.per_layer=true", *PER_LAYER_RUN],
                      world_size=1)
    cfg.train.grad_clip = 1.0
    with pytest.raises(ValueError, match="grad_clip"):
        train(cfg)
    assert not (run_dir / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- resume checks (CheckpointManager)

RESUMABLE = ["optim.name=subtrack++", "optim.rank=8", "optim.update_interval=2", "train.max_steps=4",
             "train.eval_batches=0", "checkpoint.every=2", "log.tensorboard=true"]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished nano run of 4 steps with checkpoints at steps 2 and 4 (copied by each test that damages it)."""
    base = tmp_path_factory.mktemp("four_steps")
    config = nano_config(base)
    train(load_config(config, [f"log.run_dir={base / 'run'}", *RESUMABLE], world_size=1))
    return config, base / "run"


def copy_run(four_steps, tmp_path):
    import shutil

    config, run_dir = four_steps
    shutil.copytree(run_dir, tmp_path / "run")
    return config, tmp_path / "run"


def truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("damage, named", [
    (lambda c: truncate(c / "model.pt"), "model.pt: size"),
    (lambda c: truncate(c / "optimizer" / "rank00000.pt"), "optimizer/rank00000.pt: size"),
    (lambda c: (c / "trainer.pt").unlink(), "trainer.pt: missing"),
    (lambda c: (c / "model_config.json").write_text("{not json" + " " * 400), "model_config.json: size"),
])
def test_resume_auto_falls_back_past_a_damaged_checkpoint_with_one_warning(four_steps, tmp_path, capsys, damage, named):
    config, run_dir = copy_run(four_steps, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000004"
    damage(newest)
    cfg = load_config(config, [f"log.run_dir={run_dir}", *RESUMABLE, "train.max_steps=5", "checkpoint.resume=auto"],
                      world_size=1)
    summary = train(cfg)
    assert summary["start_step"] == 2 and summary["step"] == 5
    warnings = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and f"{newest} is damaged ({named}" in warnings[0]
    assert warnings[0].endswith(f"using {run_dir / 'checkpoints' / 'step_00000002'}")


def test_resume_from_a_damaged_path_is_one_error_line_and_exit_2(four_steps, tmp_path, capsys):
    config, run_dir = copy_run(four_steps, tmp_path)
    damaged = run_dir / "checkpoints" / "step_00000004"
    truncate(damaged / "model.pt")
    code = cli.main(["--config", str(config), "--set", f"log.run_dir={run_dir}", *RESUMABLE, "train.max_steps=6",
                     "--resume", str(damaged)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"pretrain: resume: checkpoint {damaged} is damaged (model.pt: size ")


@pytest.mark.parametrize("override, key", [("optim.rank=4", "optim.rank"), ("optim.name=galore", "optim.name"),
                                           ("model.hidden_size=128", "model.hidden_size")])
def test_resume_refuses_a_setting_that_cannot_change_before_writing_anything(four_steps, tmp_path, capsys, override, key):
    config, run_dir = copy_run(four_steps, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code = cli.main(["--config", str(config), "--set", f"log.run_dir={run_dir}", *RESUMABLE, "train.max_steps=6",
                     override, "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"pretrain: resume: {key} cannot change on resume" in err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: b for p, b in before.items() if p.name != ".lock"}  # config.yaml, metrics: untouched


def test_resume_with_a_new_lr_and_update_interval_takes_effect_and_metrics_restart_at_the_resumed_step(
        four_steps, tmp_path, capsys):
    from pretrain.schedule import lr_multiplier

    config, run_dir = copy_run(four_steps, tmp_path)
    resume = run_dir / "checkpoints" / "step_00000002"
    cfg = load_config(config, [f"log.run_dir={run_dir}", *RESUMABLE, "optim.lr=0.05", "optim.update_interval=3",
                               "train.max_steps=6", f"checkpoint.resume={resume}", "train.steps_per_run=1"],
                      world_size=1)
    summary = train(cfg)
    out = capsys.readouterr().out
    assert "resume: optim.lr 0.003 -> 0.05 (takes effect)" in out
    assert "resume: optim.update_interval 2 -> 3 (takes effect)" in out
    assert "resume: train.max_steps 4 -> 6 (takes effect)" in out
    records = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]  # the first run's steps 3 and 4 are gone
    assert records[-1]["lr"] == pytest.approx(0.05 * lr_multiplier(2, 2, 6, 0.1))  # new lr, new schedule length
    groups = load_checkpoint(summary["checkpoint"])["optimizer"]["param_groups"]
    assert {g["update_proj_gap"] for g in groups if "update_proj_gap" in g} == {3}
    assert {g["initial_lr"] for g in groups} == {0.05}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]  # purge_step hid the old 3 and 4
    assert (run_dir / "config.yaml").read_text() == load_checkpoint(summary["checkpoint"])["config_yaml"]


def test_second_job_on_a_locked_run_dir_is_one_line_naming_the_holder_and_exit_2(tmp_path, capsys):
    from pretrain.rundir import locked_run_dir

    run_dir = tmp_path / "run"
    with locked_run_dir(run_dir):  # the first job
        code = cli.main(["--config", str(nano_config(tmp_path)), "--set", f"log.run_dir={run_dir}", "train.max_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"pretrain: run dir {run_dir} is in use by pid {os.getpid()} on ")
    assert not (run_dir / "config.yaml").exists()


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import errno

    run_dir = tmp_path / "run"
    real_save = torch.save
    saved = []

    def disk_full_at_step_2(obj, f, *a, **k):
        if "step_00000002" in getattr(f, "name", "") and f.name.endswith("trainer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    code = cli.main(["--config", str(nano_config(tmp_path)), "--set", f"log.run_dir={run_dir}", "train.max_steps=2",
                     "checkpoint.every=1", "train.eval_batches=0"])
    err = capsys.readouterr().err
    first = run_dir / "checkpoints" / "step_00000001"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err == (f"pretrain: checkpoint: no space left on device while writing {run_dir / 'checkpoints'}/"
                   f".tmp-step_00000002/trainer.pt; the previous checkpoint {first} is intact\n")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]
