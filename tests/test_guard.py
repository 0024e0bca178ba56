"""The divergence guard (pretrain/guard.py): a non-finite step moves nothing and is counted, repeated
ones stop the run naming the last good checkpoint, no checkpoint holds non-finite state, and keep_last
spares the checkpoints from before the trouble. Nano model, a few steps, CPU."""
import contextlib
import math
import os

import pytest
import torch

from pretrain import guard as guard_module
from pretrain import train as train_module
from pretrain.checkpoint import list_checkpoints, load_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.strategies import base
from tests.nano import nano_config, read_metrics, run_cli

LOG_EVERY_3 = ["log.log_every=3", "train.max_steps=8", "train.eval_batches=1"]


def local(t):
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def snapshot(strategy) -> dict:
    """This rank's weights and optimizer state tensors, copied."""
    optimizer = getattr(strategy.optimizer, "inner", strategy.optimizer)
    state = {i: {k: local(v) for k, v in s.items() if torch.is_tensor(v)}
             for i, s in enumerate(optimizer.state.values())}
    return {"weights": {k: local(v) for k, v in strategy.model.state_dict().items()}, "state": state}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def bitwise_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(bitwise_equal(a[k], b[k]) if isinstance(a[k], dict) else
               (a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])))
               for k in a)


def same_losses(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


@contextlib.contextmanager
def poisoned_loss(at_step: int, rank: int | None = None):
    """lm_loss returns NaN for the first micro-batch of step `at_step` (on `rank` only, if given), and the
    weights and optimizer state are recorded around that step: yields {"before", "after"}."""
    import torch.distributed as dist

    seen = {"calls": 0}
    strategies = []
    original_loss, original_attach = train_module.lm_loss, base.Strategy.attach_guard
    original_begin, original_end = guard_module.DivergenceGuard.begin, guard_module.DivergenceGuard.end

    def attach(self, guard):
        strategies.append(self)
        return original_attach(self, guard)

    def begin(self, step, loss_sum):
        seen["step"], seen["first_micro"] = step, True
        if step == at_step:
            seen["before"] = snapshot(strategies[-1])
        return original_begin(self, step, loss_sum)

    def end(self, grad_norm):
        out = original_end(self, grad_norm)
        if seen["step"] == at_step:
            seen["after"] = snapshot(strategies[-1])
        return out

    def loss(logits, labels, reduction="mean"):
        value = original_loss(logits, labels, reduction)
        mine = rank is None or (dist.is_initialized() and dist.get_rank() == rank)
        if reduction == "mean" and seen.get("step") == at_step and seen.pop("first_micro", False) and mine:
            return value * math.nan
        return value

    patches = [(base.Strategy, "attach_guard", attach), (guard_module.DivergenceGuard, "begin", begin),
               (guard_module.DivergenceGuard, "end", end), (train_module, "lm_loss", loss)]
    olds = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield seen
    finally:
        for obj, name, old in olds:
            setattr(obj, name, old)


@pytest.mark.parametrize("optim", [["optim.name=adamw"], ["optim.name=subtrack++", "optim.rank=8",
                                                           "optim.update_interval=2"]])
def test_one_nan_step_moves_neither_weights_nor_optimizer_state_and_the_run_goes_on(tmp_path, optim):
    run_dir = tmp_path / "run"
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", *LOG_EVERY_3, *optim], world_size=1)
    with poisoned_loss(at_step=4) as seen:
        summary = train_module.train(cfg)
    assert bitwise_equal(seen["before"], seen["after"])  # step 4 changed nothing
    assert summary["step"] == 8 and summary["stopped_by"] is None and summary["skipped_steps"] == 1
    assert math.isnan(summary["train_losses"][3]) and all(math.isfinite(x) for x in summary["train_losses"][4:])
    skipped = {r["step"]: r["train/skipped_steps"] for r in read_metrics(run_dir) if "train/skipped_steps" in r}
    assert skipped == {3: 0, 6: 1, 8: 1}  # read at the log steps
    final = load_checkpoint(run_dir / "checkpoints" / "step_00000008")
    assert all(torch.isfinite(v).all() for v in final["model"].values())


def test_the_device_gate_skips_a_fused_adamw_step_without_reading_the_flag():
    """torch's fused AdamW takes the verdict on the device (GradScaler's found_inf): no host read."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.randn(4, 4)
    optimizer.step()
    guard = guard_module.DivergenceGuard(max_skipped=5, spike_factor=None, device=torch.device("cpu"), world=1)
    before = (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
    for step, loss in ((2, math.nan), (3, 1.0)):
        guard.begin(step, torch.tensor(loss))
        with guard.gated(torch.tensor(1.0), optimizer) as go:
            assert go  # the kernel decides
            optimizer.step()
        assert not guard.read_now  # nothing was read on the host
        if step == 2:
            assert torch.equal(p, before[0])
            assert all(torch.equal(v, optimizer.state[p][k]) for k, v in before[1].items())
    assert not torch.equal(p, before[0]) and int(optimizer.state[p]["step"]) == 2  # the good step counted
    assert guard.read(3) is None and guard.skipped == 1


def test_the_issue_repro_stops_in_one_line_and_keeps_the_good_checkpoints(tmp_path):
    """Train 30 steps (a checkpoint every 5, keep_last 2), then resume with optim.lr=1e30 and a checkpoint
    every step: the weights of step 31 are finite but ruined, every later step is skipped."""
    run_dir = tmp_path / "run"
    config = nano_config(tmp_path)
    common = [f"log.run_dir={run_dir}", "checkpoint.keep_last=2", "train.eval_batches=1", "log.log_every=10"]
    train_module.train(load_config(config, common + ["train.max_steps=30", "checkpoint.every=5"], world_size=1))
    done = run_cli("--config", config, "--set", *common, "train.max_steps=40", "checkpoint.every=1",
                   "optim.lr=1e30", "--resume", "auto")
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("pretrain")]
    assert "Traceback" not in done.stderr and len(lines) == 1 and lines[0].startswith("pretrain: diverged: step 36 skipped (loss nan"), done.stderr
    assert f"--resume {run_dir / 'checkpoints' / 'step_00000030'} with a lower optim.lr" in lines[0]
    assert "5 steps in a row since step 32" in lines[0]
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_00000025", "step_00000030", "step_00000031"]  # 31's next step was skipped
    for path in list_checkpoints(run_dir / "checkpoints"):
        saved = load_checkpoint(path)
        tensors = [*saved["model"].values(), *(v for s in saved["optimizer"]["state"].values() for v in s.values())]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path
    assert [r["train/skipped_steps"] for r in read_metrics(run_dir) if "train/skipped_steps" in r][-1] == 5


def test_a_checkpoint_is_never_written_with_non_finite_state(tmp_path, monkeypatch, capsys):
    """Weights the guard could not hold back (here: set to NaN behind its back after step 3) are not saved."""
    run_dir = tmp_path / "run"
    original = base.Strategy.step

    def corrupting_step(self, max_norm):
        norm = original(self, max_norm)
        if self.optimizer.state and int(next(iter(self.optimizer.state.values()))["step"]) == 3:
            next(self.model.parameters()).data.fill_(math.nan)
        return norm

    monkeypatch.setattr(base.Strategy, "step", corrupting_step)
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "checkpoint.every=1", "train.max_steps=12",
                                              "train.eval_batches=1", "train.max_skipped_steps=2"], world_size=1)
    summary = train_module.train(cfg)
    assert summary["stopped_by"] == "diverged" and summary["step"] == 5
    assert "checkpoint: step 3 not written: the weights or optimizer state hold non-finite values" in \
        capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000001", "step_00000002"]


def test_the_loss_spike_rule_skips_a_spike_and_is_off_by_default(tmp_path, monkeypatch):
    original = train_module.lm_loss
    calls = {"n": 0}

    def spiking(logits, labels, reduction="mean"):
        calls["n"] += reduction == "mean"  # training micro-batches only (evaluation sums)
        return original(logits, labels, reduction) * (100.0 if calls["n"] in (29, 30) else 1.0)  # step 15

    monkeypatch.setattr(train_module, "lm_loss", spiking)
    skipped = {}
    for factor in ("null", "3"):
        calls["n"] = 0
        cfg = load_config(nano_config(tmp_path), [f"log.run_dir={tmp_path / factor}", "train.max_steps=16",
                                                  "train.eval_batches=1", f"train.loss_spike_factor={factor}"],
                          world_size=1)
        skipped[factor] = train_module.train(cfg)["skipped_steps"]
    assert skipped == {"null": 0, "3": 1}


@pytest.mark.parametrize("override, words", [("train.max_skipped_steps=0", "must be >= 1"),
                                             ("train.loss_spike_factor=0.5", "must be a number > 1")])
def test_guard_settings_are_checked(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(nano_config(tmp_path), [override], world_size=1)


# ----------------------------------------------------------------------------- several ranks

MODES = ["zero", "replicate", "fsdp", "deepspeed"]


def nan_on_rank_1_in_rank(config: str, overrides_by_mode: dict[str, list[str]]) -> dict:
    """On each rank of run_distributed: for each mode in turn, train 6 steps, the loss of step 3 NaN on
    rank 1 only. {mode: what the test checks}."""
    out = {}
    for mode, overrides in overrides_by_mode.items():
        if any(o.startswith("train.deepspeed=") for o in overrides):  # skip DeepSpeed's JIT build of its shm op
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        with poisoned_loss(at_step=3, rank=1) as seen:
            summary = train_module.train(load_config(config, overrides, world_size=2))
        out[mode] = {"unchanged": bitwise_equal(seen["before"], seen["after"]), "skipped": summary["skipped_steps"],
                     "step": summary["step"], "losses": summary["train_losses"]}
    return out


@pytest.fixture(scope="module")
def nan_on_rank_1(tmp_path_factory):
    """Every mode's run, one after another in one spawn of 2 ranks (the spawn and its imports cost more
    than a 6-step nano run): {"tmp": the directory, mode: rank 0's and rank 1's results}."""
    from tests.distributed import run_distributed

    tmp = tmp_path_factory.mktemp("nan_on_rank_1")
    overrides_by_mode = {}
    for mode in MODES:
        overrides = [f"log.run_dir={tmp / mode / 'run'}", "train.max_steps=6", "train.eval_batches=1",
                     "train.total_batch_size=4", "train.micro_batch_size=2"]
        overrides += (["train.deepspeed=configs/deepspeed/zero0.json", "train.micro_batch_size=1"]
                      if mode == "deepspeed" else [f"train.parallelism={mode}"])
        if mode != "fsdp":
            overrides.append("train.replica_check_every=1")  # raises if the ranks' weights ever differ
        overrides_by_mode[mode] = overrides
    ranks = run_distributed(nan_on_rank_1_in_rank, 2, str(nano_config(tmp)), overrides_by_mode,
                            env={"DS_ACCELERATOR": "cpu"}, timeout=480)
    return {"tmp": tmp, **{mode: [r[mode] for r in ranks] for mode in MODES}}


@pytest.mark.parametrize("mode", MODES)
def test_every_rank_skips_the_step_one_rank_found_non_finite(nan_on_rank_1, mode):
    """The loss is summed over ranks before the verdict, so both ranks skip step 3 (under DeepSpeed inside
    the engine's step, with 2 micro-batches of which the first is NaN)."""
    ranks = nan_on_rank_1[mode]
    for r in ranks:
        assert r["unchanged"] and r["skipped"] == 1 and r["step"] == 6
    assert same_losses(ranks[0]["losses"], ranks[1]["losses"])  # the same global loss on both, NaN at step 3
    assert math.isnan(ranks[0]["losses"][2]) and math.isfinite(ranks[0]["losses"][-1])
    assert os.path.isdir(nan_on_rank_1["tmp"] / mode / "run" / "checkpoints" / "step_00000006")


def test_per_layer_updates_count_a_nan_step_stop_and_keep_it_out_of_checkpoints(tmp_path, capsys):
    """optim.per_layer steps each weight inside backward: the bad step cannot be held back, but it is
    counted, the run stops, and its non-finite weights are never saved."""
    run_dir = tmp_path / "run"
    cfg = load_config(nano_config(tmp_path), [f"log.run_dir={run_dir}", "optim.per_layer=true",
                                              "train.grad_clip=0", "train.total_batch_size=2",
                                              "train.max_steps=10", "train.eval_batches=1", "checkpoint.every=1",
                                              "train.max_skipped_steps=2"], world_size=1)
    with poisoned_loss(at_step=3):
        summary = train_module.train(cfg)
    assert summary["stopped_by"] == "diverged" and summary["step"] == 4 and summary["skipped_steps"] == 2
    assert "checkpoint: step 3 not written: the weights or optimizer state hold non-finite values" not in \
        capsys.readouterr().err  # step 3 itself was skipped: nothing is written for it at all
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_00000001", "step_00000002"]
    for path in list_checkpoints(run_dir / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values())
