"""train.parallelism fsdp (torch FSDP2, gloo, CPU, float32, nano model): adamw, galore, subtrack++ and
subtrack++ 8-bit follow the trajectory of the replicate (DDP) strategy on the same ranks with the same
right projection, at 2 and at 3 processes (uneven shards); DCP checkpoints resume exactly at the same
world size and load every tensor exactly at others; activation checkpointing; a failed save;
`python -m pretrain.export` of a DCP checkpoint.

`run_loops(world_size, jobs)` runs several training runs in one spawn of `world_size` ranks (the
imports dominate a nano run; the fixtures `two` and `others` make three spawns in all). Each run
returns per-step losses and the final full weights gathered from the live model.

Replicate and fsdp both average the gradients over ranks (all-reduce vs reduce-scatter of the same
two or three partial sums) and accumulate micro-batches locally first, so they agree up to the
order of float additions (clipping's norm is a sum of shard norms): LOSS_TOL, WEIGHT_TOL.
"""
import errno

import pytest
import torch

from tests.distributed import run_distributed
from tests.nano import nano_yaml

NANO_ADAMW = nano_yaml(optim={"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.01},
                       train={"micro_batch_size": 1, "total_batch_size": 6, "max_steps": 10, "eval_batches": 1},
                       checkpoint={"every": 5})
LOSS_TOL = 1e-5  # relative, per step
WEIGHT_TOL = 1e-5  # relative, elementwise after 10 steps, plus WEIGHT_ATOL absolute: Adam's 1/sqrt(v) magnifies
WEIGHT_ATOL = 3e-5  # rounding where v is tiny (rare embedding rows); measured max 4.4e-6 at 2 ranks, 1.5e-5 at 3
# (1 of 1.15M elements above 1e-5), as tests/test_distributed_training.py's WEIGHT_TOL
STEP5 = "step_00000005"


def _full(t):
    # clone: on one rank full_tensor() is the live shard itself, which the next step changes in place
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_state(model, optimizer=None) -> dict:
    """Collective: {"model.<name>": full tensor, "optim.state.<name>.<key>": full tensor}, the names
    of a DCP checkpoint (pretrain.dcp_state.load_full)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {f"model.{k}": _full(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        _, optim_sd = get_state_dict(model, optimizer)
        out.update({f"optim.state.{name}.{key}": _full(v) for name, state in optim_sd["state"].items()
                    for key, v in state.items() if torch.is_tensor(v)})
    return out


def loops_in_rank(config_text: str, jobs: list[dict]) -> list[dict]:
    """On each rank: train(config + job["overrides"]) for every job in turn. Returns per job the
    summary (or the error's text with job["expect_error"]), the full weights of the live model at
    the end, and with job["capture_load"] the full model and optimizer state just after a resume's load."""
    import os
    import tempfile

    import torch.distributed as dist

    import pretrain.strategies
    from pretrain.checkpoint import CheckpointManager
    from pretrain.config import load_config
    from pretrain.train import train

    world = dist.get_world_size()
    path = os.path.join(tempfile.mkdtemp(), "nano_adamw.yaml")
    with open(path, "w") as f:
        f.write(config_text)
    build, load = pretrain.strategies.build_strategy, CheckpointManager.load
    results = []
    for job in jobs:
        built, loaded = [], {}

        def build_strategy(cfg, d):
            built.append(build(cfg, d))
            return built[-1]

        def capture_load(self, path, *, model, optimizer, **kwargs):
            out = load(self, path, model=model, optimizer=optimizer, **kwargs)
            loaded.update(full_state(model, optimizer))
            return out

        pretrain.strategies.build_strategy = build_strategy
        CheckpointManager.load = capture_load if job.get("capture_load") else load
        if job.get("fail_dcp_write_on_rank") == dist.get_rank():
            from torch.distributed.checkpoint.filesystem import FileSystemWriter

            write, calls = FileSystemWriter.write_data, []

            def write_data(self, plan, planner):  # the second save fails, on this rank only
                calls.append(1)
                if len(calls) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device", "dcp/__1_0.distcp")
                return write(self, plan, planner)

            FileSystemWriter.write_data = write_data  # this process only; its last job
        try:
            summary, error = train(load_config(path, job["overrides"], world_size=world)), None
        except Exception as e:  # noqa: BLE001 - the test asserts on it
            if not job.get("expect_error"):
                raise
            summary, error = None, f"{e.__class__.__name__}: {e}"
        finally:
            pretrain.strategies.build_strategy, CheckpointManager.load = build, load
        results.append({"summary": summary, "error": error, "loaded": loaded,
                        "weights": {k[6:]: v for k, v in full_state(built[-1].model).items()}})
    return results


def run_loops(world_size: int, jobs: list[dict], config_text: str = NANO_ADAMW) -> list[dict]:
    """run `jobs` (each {"overrides": [...], ...}, see loops_in_rank) on `world_size` gloo ranks; rank
    0's results, with "losses" (the all-reduced loss of every step) added."""
    results = run_distributed(loops_in_rank, world_size, config_text, jobs, timeout=240)[0]
    for r in results:
        r["losses"] = r["summary"]["train_losses"] if r["summary"] else None
    return results


def job(parallelism: str, run_dir, *overrides, **flags) -> dict:
    return {"overrides": [f"train.parallelism={parallelism}", f"log.run_dir={run_dir}", *overrides], **flags}


def assert_same_trajectory(a: dict, b: dict, code_flips: bool = False):
    """code_flips (8-bit state): a gradient that differs in its last bit (reduce-scatter vs all-reduce) can
    move an 8-bit moment to the neighbouring code; Adam then moves that element up to ~1e-3 apart (measured:
    9 of 524288 embedding elements, 8.8e-4; 225 of lm_head's). Those (< 1e-3 of the elements) get 2e-3; the
    rest WEIGHT_TOL. (With bit-identical gradients the 8-bit AdamW shards are bit-identical:
    tests/test_fsdp_optimizer.py.)"""
    assert len(a["losses"]) == 10
    assert a["losses"] == pytest.approx(b["losses"], rel=LOSS_TOL, abs=0)
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        got, want = a["weights"][name], b["weights"][name]
        if code_flips:
            far = ~torch.isclose(got, want, rtol=WEIGHT_TOL, atol=WEIGHT_ATOL)
            assert far.sum() <= 1e-3 * far.numel() and (got - want).abs().max() <= 2e-3, \
                (name, int(far.sum()), float((got - want).abs().max()))
        else:
            torch.testing.assert_close(got, want, rtol=WEIGHT_TOL, atol=WEIGHT_ATOL, msg=lambda m: f"{name}: {m}")


RIGHT = ["optim.proj_type=right", "optim.rank=8", "optim.update_interval=3"]  # subspace updates at steps 0, 3, 6, 9
PRESETS = {  # low-rank presets on the row shards, each against replicate with the same right projection
    "galore": ["optim.name=galore", *RIGHT],
    "subtrack++": ["optim.name=subtrack++", *RIGHT],
    # rank 32: the MLP's low-rank moments (176 x 32) are 8-bit; at 2 ranks each shard (88 x 32) is 11 whole blocks
    "subtrack++8bit": ["optim.name=subtrack++", "optim.state_bits=8", *RIGHT[:1], "optim.rank=32", RIGHT[2]],
}
RESUME_ANYWHERE = ["checkpoint.allow_world_size_change=true", "train.max_steps=6", "capture"]


def _jobs(tmp, spec: dict) -> tuple[list, list]:
    """spec: label -> (parallelism, overrides); "capture" in overrides: capture the state a resume loads."""
    jobs = [job(mode, tmp / label, *[o for o in overrides if o != "capture"], capture_load="capture" in overrides)
            for label, (mode, overrides) in spec.items()]
    return list(spec), jobs


def _spawn(world_size: int, tmp, spec: dict) -> dict:
    labels, jobs = _jobs(tmp, spec)
    return dict(zip(labels, run_loops(world_size, jobs)))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """At 2 ranks, in one spawn: adamw under fsdp and replicate, fsdp resumed from its step 5, with activation
    checkpointing, a run whose second save fails on rank 1; each low-rank preset under fsdp and replicate,
    and subtrack++ resumed from its fsdp step 5."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    spec = {"fsdp": ("fsdp", []), "ddp": ("replicate", []),
            "resumed": ("fsdp", [f"checkpoint.resume={tmp / 'fsdp' / 'checkpoints' / STEP5}"]),
            "ac": ("fsdp", ["model.activation_checkpointing=true"])}
    for name, overrides in PRESETS.items():
        spec.update({f"{name}-fsdp": ("fsdp", overrides), f"{name}-replicate": ("replicate", overrides)})
    spec["subtrack++-resumed"] = ("fsdp", [*PRESETS["subtrack++"],
                                           f"checkpoint.resume={tmp / 'subtrack++-fsdp' / 'checkpoints' / STEP5}"])
    labels, jobs = _jobs(tmp, spec)
    jobs.append(job("fsdp", tmp / "crash", "train.max_steps=4", "checkpoint.every=2", "train.warmup_steps=1",
                    fail_dcp_write_on_rank=1, expect_error=True))
    return {**dict(zip([*labels, "crash"], run_loops(2, jobs))), "tmp": tmp}


@pytest.fixture(scope="module")
def others(two, tmp_path_factory):
    """At 1 rank (one spawn) and at 3 ranks (another: uneven shards, nano's 64 / 176 / 8192 rows): the 2-rank
    step-5 checkpoints of adamw and subtrack++ resumed, capturing what they load; at 3 ranks also adamw,
    galore, subtrack++ and subtrack++ 8-bit under fsdp and replicate."""
    tmp = tmp_path_factory.mktemp("fsdp13")
    resumes = {"adamw-resumed": ("fsdp", [f"checkpoint.resume={two['tmp'] / 'fsdp' / 'checkpoints' / STEP5}",
                                          *RESUME_ANYWHERE]),
               "subtrack++-resumed": ("fsdp", [*PRESETS["subtrack++"], *RESUME_ANYWHERE, "checkpoint.resume="
                                               f"{two['tmp'] / 'subtrack++-fsdp' / 'checkpoints' / STEP5}"])}
    three = {"adamw-fsdp": ("fsdp", []), "adamw-replicate": ("replicate", [])}
    for name in ("galore", "subtrack++", "subtrack++8bit"):
        three.update({f"{name}-fsdp": ("fsdp", PRESETS[name]), f"{name}-replicate": ("replicate", PRESETS[name])})
    return {1: _spawn(1, tmp / "one", resumes), 3: _spawn(3, tmp / "three", {**three, **resumes})}


def saved_full(checkpoint) -> dict:
    """Every tensor of a DCP checkpoint, whole, named as full_state names them."""
    from pretrain.dcp_state import load_full

    saved = {f"model.{k}": v for k, v in load_full(checkpoint / "dcp", "model.").items()}
    saved.update({f"optim.{k}": v for k, v in load_full(checkpoint / "dcp", "optim.").items()})
    return saved


def test_fsdp_adamw_equals_replicate_on_two_ranks(two):
    assert two["fsdp"]["summary"]["mode"] == "fsdp" and two["ddp"]["summary"]["mode"] == "replicate"
    assert_same_trajectory(two["fsdp"], two["ddp"])
    evals = [[loss for _, loss in run["summary"]["evals"]] for run in (two["fsdp"], two["ddp"])]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=LOSS_TOL, abs=0)  # steps 0 and 10


def test_fsdp_checkpoint_is_dcp_verified_and_resumes_the_same_losses(two):
    from pretrain.checkpoint import MANIFEST, verify_checkpoint

    checkpoint = two["tmp"] / "fsdp" / "checkpoints" / STEP5
    assert not (checkpoint / "model.pt").exists() and (checkpoint / "dcp" / ".metadata").is_file()
    assert verify_checkpoint(checkpoint) is None
    manifest = (checkpoint / MANIFEST).read_text()
    assert "dcp/.metadata" in manifest and ".distcp" in manifest  # the shards are covered
    resumed = two["resumed"]["summary"]
    assert resumed["start_step"] == 5 and resumed["step"] == 10
    assert two["resumed"]["losses"] == pytest.approx(two["fsdp"]["losses"][5:], rel=LOSS_TOL, abs=0)
    for name, w in two["fsdp"]["weights"].items():
        torch.testing.assert_close(two["resumed"]["weights"][name], w, rtol=WEIGHT_TOL, atol=WEIGHT_ATOL)


def test_activation_checkpointing_under_fsdp_gives_the_same_losses(two):
    assert two["ac"]["losses"] == pytest.approx(two["fsdp"]["losses"], rel=1e-6, abs=0)


def test_failed_dcp_write_on_one_rank_keeps_the_previous_checkpoint(two):
    from pretrain.checkpoint import latest_checkpoint, verify_checkpoint

    error = two["crash"]["error"]
    assert error.startswith("CheckpointWriteError: checkpoint: rank 1: no space left on device"), error
    assert "step_00000002 is intact" in error
    root = two["tmp"] / "crash" / "checkpoints"
    assert latest_checkpoint(root).name == "step_00000002" and verify_checkpoint(root / "step_00000002") is None
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # no staging directory left


@pytest.mark.parametrize("name", ["adamw", "subtrack++"])
def test_fsdp_checkpoint_loads_every_tensor_exactly_at_one_and_three_ranks(two, others, name):
    """Resumed at 1 and at 3 ranks (checkpoint.allow_world_size_change), the 2-rank step-5 checkpoint's weights
    and optimizer state (AdamW moments; SubTrack++'s row moments, bases, limiter norms and counters) load
    exactly: gathered from the shards each rank holds after the load, against the checkpoint's full tensors."""
    from pretrain.checkpoint import load_checkpoint

    checkpoint = two["tmp"] / ("fsdp" if name == "adamw" else f"{name}-fsdp") / "checkpoints" / STEP5
    saved = saved_full(checkpoint)
    assert any(k.endswith("exp_avg_sq") for k in saved)
    if name == "subtrack++":
        assert any(k.endswith(".basis") for k in saved) and any(k.endswith(".limiter_norm") for k in saved)
    assert load_checkpoint(checkpoint, with_optimizer=False)["model"].keys() == {k[6:] for k in saved
                                                                                  if k.startswith("model.")}
    for world in (1, 3):
        run = others[world][f"{name}-resumed"]
        assert run["summary"]["mode"] == "fsdp" and run["loaded"].keys() == saved.keys()
        bad = {k: (t - saved[k]).abs().max().item() for k, t in run["loaded"].items() if not torch.equal(t, saved[k])}
        assert not bad, (world, bad)


@pytest.mark.parametrize("name", ["adamw", "galore", "subtrack++"])
def test_fsdp_equals_replicate_at_three_ranks_with_uneven_shards(others, name):
    assert_same_trajectory(others[3][f"{name}-fsdp"], others[3][f"{name}-replicate"])


def test_8bit_state_at_three_ranks_follows_replicate_within_its_block_quantization(others):
    """Uneven shards with 8-bit state: each rank quantizes blockwise within its own rows (nano's 8192 / 3 and
    176 / 3 rows cut the 256-element blocks elsewhere than the whole tensor's), so a block's absmax, and with
    it the code of a small moment, differs from replicate's: no 1e-5 equality is possible without moving
    moments between ranks. It runs, never hangs, and stays within that quantization's reach: measured 3.5e-4
    relative on the losses; weights apart by at most 3e-4 in the blocks and norms, and by 6e-3 / 1.2e-2 in the
    embedding / output head, whose rows of rarely-seen tokens have moments near zero (8-bit AdamW there)."""
    fsdp, ddp = others[3]["subtrack++8bit-fsdp"], others[3]["subtrack++8bit-replicate"]
    assert fsdp["summary"]["step"] == 10 and "RowShardedSubTrack" in fsdp["summary"]["strategy"]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-3, abs=0)
    for name, want in ddp["weights"].items():
        vocab_rows = name in ("embed_tokens.weight", "lm_head.weight")
        assert (fsdp["weights"][name] - want).abs().max() <= (2e-2 if vocab_rows else 1e-3), name
    assert fsdp["losses"] != ddp["losses"]  # the block cuts do differ (else the 1e-5 test above would apply)


@pytest.mark.parametrize("name", list(PRESETS))
def test_low_rank_presets_under_fsdp_equal_replicate_with_right_projection(two, name):
    fsdp, ddp = two[f"{name}-fsdp"], two[f"{name}-replicate"]
    assert fsdp["summary"]["mode"] == "fsdp" and "RowShardedSubTrack" in fsdp["summary"]["strategy"]
    assert_same_trajectory(fsdp, ddp, code_flips=name.endswith("8bit"))


def test_low_rank_fsdp_resume_at_two_ranks_continues_the_losses(two):
    run, resumed = two["subtrack++-fsdp"], two["subtrack++-resumed"]
    assert resumed["summary"]["start_step"] == 5
    assert resumed["losses"] == pytest.approx(run["losses"][5:], rel=LOSS_TOL, abs=0)


def test_pretrain_export_of_a_dcp_checkpoint_gives_the_model_weights(two, tmp_path):
    from safetensors.torch import load_file

    from models.hf import from_hf_name
    from pretrain.export import main

    checkpoint = two["tmp"] / "fsdp" / "checkpoints" / "step_00000010"
    assert main([str(checkpoint), str(tmp_path / "hf")]) == 0
    exported = {from_hf_name(k): v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    live = two["fsdp"]["weights"]
    assert exported.keys() == live.keys()
    for name, w in live.items():
        assert torch.equal(exported[name], w), name


def test_resuming_across_checkpoint_formats_is_refused_naming_both(two, tmp_path):
    from pretrain.dcp_state import DCPState
    from pretrain.resume import ResumeError, check_format
    from pretrain.state_io import PlainState

    dcp_checkpoint = two["tmp"] / "fsdp" / "checkpoints" / STEP5
    plain_checkpoint = two["tmp"] / "ddp" / "checkpoints" / STEP5
    with pytest.raises(ResumeError, match=r"written by train.parallelism fsdp \(DCP shards in dcp/\), which this "
                                          r"run's train.parallelism replicate cannot read.*parallelism=fsdp"):
        check_format(dcp_checkpoint, {"train": {"parallelism": "fsdp"}}, PlainState.reads, "replicate")
    with pytest.raises(ResumeError, match=r"written by train.parallelism replicate \(model.pt, optimizer/rank00000.pt"
                                          r"\), which this run's train.parallelism fsdp cannot read.*=replicate"):
        check_format(plain_checkpoint, {"train": {"parallelism": "replicate"}}, DCPState.reads, "fsdp")


# ----------------------------------------------------------------------------- config checks (in-process)

def _load(*overrides, world_size=2):
    from pretrain.config import load_config

    return load_config(None, ["model.size=nano", "data.seq_len=32", "train.total_batch_size=8",
                              "train.micro_batch_size=2", *overrides], world_size=world_size)


def test_fsdp_config_checks():
    from pretrain.config import ConfigError

    from pretrain.strategies import strategy_class

    assert strategy_class(_load("train.parallelism=fsdp"), 2).name == "fsdp"
    assert strategy_class(_load("train.parallelism=fsdp", world_size=1), 1).name == "fsdp"  # DCP reader
    low_rank = ["train.parallelism=fsdp", "optim.name=subtrack++", "optim.rank=8", "optim.update_interval=5"]
    with pytest.raises(ConfigError, match=r"proj_type = 'std' under train.parallelism fsdp.*by rows.*"
                                          r"--set optim.proj_type=right"):
        _load(*low_rank)
    assert _load(*low_rank, "optim.proj_type=right").optim.proj_type == "right"
    with pytest.raises(ConfigError, match="optim.per_layer.*set optim.per_layer: false"):
        _load("train.parallelism=fsdp", "optim.per_layer=true", "train.total_batch_size=2", world_size=1)
    with pytest.raises(ConfigError, match="replica_check_every.*fsdp"):
        _load("train.parallelism=fsdp", "train.replica_check_every=1")
    with pytest.raises(ConfigError, match="optim.proj_type 'up' is not supported"):
        _load("optim.proj_type=up")


def test_proj_type_reaches_the_projected_group_and_cannot_change_on_resume():
    from models.sizes import build_model
    from optim.factory import OptimConfig, build_optimizer
    from pretrain.resume import FIXED_ON_RESUME

    cfg = OptimConfig(name="subtrack++", rank=4, update_interval=5, proj_type="right")
    groups = build_optimizer(build_model("nano", vocab_size=64, max_seq_len=32), cfg).param_groups
    assert [g["proj_type"] for g in groups if "rank" in g] == ["right"]
    assert OptimConfig().proj_type == "std" and "optim.proj_type" in FIXED_ON_RESUME


def test_fsdp_in_one_process_without_a_launcher_trains_evaluates_and_saves_dcp(tmp_path):
    """`python -m pretrain` with train.parallelism fsdp and no launcher: the strategy joins a one-rank
    group of its own (and leaves it at the end); evaluation runs the sharded model; the checkpoint is DCP."""
    import torch.distributed as dist

    from pretrain.checkpoint import is_dcp_checkpoint, load_checkpoint
    from pretrain.config import load_config
    from pretrain.train import train

    config = tmp_path / "nano.yaml"
    config.write_text(NANO_ADAMW)
    summary = train(load_config(str(config), ["train.parallelism=fsdp", "train.max_steps=2", 
                                              f"log.run_dir={tmp_path / 'run'}"], world_size=1))
    assert summary["mode"] == "fsdp" and len(summary["evals"]) == 2 and not dist.is_initialized()
    assert summary["optimizer_state_bytes"] > 0
    assert is_dcp_checkpoint(summary["checkpoint"])
    state = load_checkpoint(summary["checkpoint"])
    assert state["trainer"]["step"] == 2 and any(k.endswith("exp_avg") for k in state["optimizer"])



def test_a_one_process_fsdp_run_that_fails_leaves_no_process_group(tmp_path, monkeypatch):
    """The strategy's own one-rank group is left on an error too (train's exit stack closes the strategy),
    so a later run in the same process starts clean."""
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.strategies.fsdp import FSDP
    from pretrain.train import train

    def failing_step(self, max_norm):
        raise RuntimeError("planted failure in the step")

    monkeypatch.setattr(FSDP, "step", failing_step)
    config = tmp_path / "nano.yaml"
    config.write_text(NANO_ADAMW)
    with pytest.raises(RuntimeError, match="planted failure"):
        train(load_config(str(config), ["train.parallelism=fsdp", f"log.run_dir={tmp_path / 'run'}"], world_size=1))
    assert not dist.is_initialized()
