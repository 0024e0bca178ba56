"""The DeepSpeed engine path (pretrain/ds_engine.py) on 2 CPU ranks against the torchrun path.

DS_ACCELERATOR=cpu, gloo; DeepSpeed's shared-memory comm op is switched off so it is not
JIT-built (55 s). The engine averages gradients and the ShardedOptimizer (reduce_gradients=
False) steps each rank's matrices; the torchrun path has the ShardedOptimizer reduce-scatter
the gradients itself. Both must give the same weights.
"""
import glob
import hashlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.sizes import build_model
from optim.factory import OptimConfig
from optim.sharded import build_sharded_optimizer
from pretrain import ds_engine
from tests.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO0 = os.path.join(ROOT, "configs", "deepspeed", "zero0.json")
ZERO0_TB = os.path.join(ROOT, "configs", "deepspeed", "zero0_tensorboard.json")
VOCAB, SEQ, MICRO, STEPS, GAP = 256, 16, 2, 10, 3
RUNS = {  # preset -> (optimizer config, gradient clipping: 1.0 is active from the first step; 0 is off)
    "adamw": (dict(name="adamw", lr=3e-3, weight_decay=0.1), 1.0),
    "subtrack++": (dict(name="subtrack++", lr=3e-3, rank=8, update_interval=GAP), 0.0),
    "muon": (dict(name="muon", lr=3e-3, matrix_lr_ratio=0.5), 1.0),
    "adafactor": (dict(name="adafactor", lr=3e-3), 0.0),
    "adamw8bit": (dict(name="adamw8bit", lr=3e-3), 0.0),
}
TOL = dict(rtol=1e-5, atol=1e-6)  # float32; both paths average the same gradients and clip alike


def make_model():
    torch.manual_seed(0)
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ)


def micro_batch(step, rank):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (2 * MICRO, SEQ + 1), generator=g)[rank * MICRO:(rank + 1) * MICRO]
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(forward, step, rank):
    x, y = micro_batch(step, rank)
    return F.cross_entropy(forward(x).reshape(-1, VOCAB), y.reshape(-1))


def checksum(model):
    flat = torch.cat([p.detach().reshape(-1) for _, p in sorted(model.named_parameters())])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def ds_job(tensorboard_dir):
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank = dist.get_rank()
    out = {}
    for preset, (cfg, clip) in RUNS.items():
        model = make_model()
        opt = build_sharded_optimizer(model, OptimConfig(**cfg))
        engine = ds_engine.initialize(model, opt, ZERO0_TB if preset == "adamw" else ZERO0, micro_batch_size=MICRO,
                                      gradient_clipping=clip, tensorboard_dir=tensorboard_dir)
        assert engine.optimizer is opt and engine.zero_optimization_stage() == 0
        sums, norms = [], []
        for step in range(STEPS):
            engine.backward(loss_of(engine, step, rank))
            engine.step()
            sums.append(checksum(model))
            norms.append(float(engine.get_global_grad_norm() or 0.0))
        counters = {n: int(opt.inner.state[opt._params[n]]["subspace_updates"])
                    for n in opt.owned if "subspace_updates" in opt.inner.state[opt._params[n]]}
        engine_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

        model = make_model()  # the torchrun path: the wrapper reduce-scatters the gradients itself
        opt = build_sharded_optimizer(model, OptimConfig(**cfg), reduce_gradients=True)
        torchrun_norms = []
        for step in range(STEPS):
            loss_of(model, step, rank).backward()
            torchrun_norms.append(float(opt.clip_grad_norm_(clip if clip else float("inf"))))
            opt.step()
            opt.zero_grad()
        out[preset] = {"checksums": sums, "engine": engine_weights, "counters": counters,
                       "norms": norms, "torchrun_norms": torchrun_norms,
                       "torchrun": {n: p.detach().clone() for n, p in model.named_parameters()}}
    return out


@pytest.fixture(scope="module")
def ds_ranks(tmp_path_factory):
    board = str(tmp_path_factory.mktemp("tensorboard"))
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return run_distributed(ds_job, 2, board, timeout=150, env=env), board


@pytest.mark.parametrize("preset", list(RUNS))
def test_deepspeed_engine_matches_torchrun_path_on_two_ranks(ds_ranks, preset):
    ranks, _ = ds_ranks
    assert ranks[0][preset]["checksums"] == ranks[1][preset]["checksums"]  # bit-identical every step
    # norms above 1.0 (so clipping at 1.0 acts); DeepSpeed reports the optimizer's true global
    # norm, with clipping on or off
    assert max(ranks[0][preset]["norms"]) > 1.0
    torch.testing.assert_close(ranks[0][preset]["norms"], ranks[0][preset]["torchrun_norms"], **TOL)
    for name, w in ranks[0][preset]["torchrun"].items():
        torch.testing.assert_close(ranks[0][preset]["engine"][name], w, **TOL, msg=lambda m: f"{name}: {m}")


def test_deepspeed_engine_runs_subspace_updates_and_tensorboard_monitor(ds_ranks):
    ranks, board = ds_ranks
    owned = [r["subtrack++"]["counters"] for r in ranks]
    assert all(owned) and set(owned[0]).isdisjoint(owned[1])
    assert all(c == 1 + (STEPS - 1) // GAP for o in owned for c in o.values())  # SVD + steps 3, 6, 9
    assert glob.glob(os.path.join(board, "deepspeed", "events.out.tfevents.*"))


def write_config(tmp_path, **changes):
    with open(ZERO0) as f:
        config = json.load(f)
    config.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    ({"zero_optimization": {"stage": 1}}, r"stage = 1 hands the client optimizer one flattened 1-D partition.*"
                                          r"use ZeRO stage 0 .* with the sharded optimizer"),
    ({"zero_optimization": {"stage": 2}}, r"stage = 2 .*use ZeRO stage 0"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled is true.*torch.autocast.*flattens"),
    ({"optimizer": {"type": "AdamW"}}, r"remove the \"optimizer\" section"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps = 4 disagrees with the run config \(1\)"),
])
def test_config_that_would_flatten_weights_or_disagree_is_refused(tmp_path, changes, message):
    model = make_model()
    opt = build_sharded_optimizer(model, OptimConfig(name="adamw"))
    with pytest.raises(ValueError, match=message):
        ds_engine.initialize(model, opt, write_config(tmp_path, **changes), micro_batch_size=MICRO)


def test_missing_config_and_self_reducing_optimizer_are_refused(tmp_path):
    model = make_model()
    with pytest.raises(FileNotFoundError, match=r"nope.json not found.*configs/deepspeed"):
        ds_engine.initialize(model, None, str(tmp_path / "nope.json"), micro_batch_size=MICRO)
    opt = build_sharded_optimizer(model, OptimConfig(name="adamw"), reduce_gradients=True)
    with pytest.raises(ValueError, match="reduce_gradients=False"):
        ds_engine.initialize(model, opt, ZERO0, micro_batch_size=MICRO)
