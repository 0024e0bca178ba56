"""8-bit SubTrack++ (state_bits=8) under the matrix-granular sharded optimizer (optim/sharded.py)
on 2 gloo ranks: the same weights as one process with the unsharded 8-bit optimizer, and a
sharded checkpoint that keeps the uint8 codes and absmax as they are (resume is bit-exact).

One 2-rank job trains the nano Llama 12 steps (rank 16, subspace moves at steps 5 and 10, so the
8-bit moments are rotated and re-quantized), saves the shards at step 8 and resumes from them.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.sizes import build_model
from optim import quant8
from optim.factory import OptimConfig, build_optimizer
from optim.sharded import build_sharded_optimizer
from tests.distributed import run_distributed

VOCAB, SEQ, BATCH, STEPS, SAVE_AT = 256, 16, 4, 12, 8
# 8-bit from 256 elements on, so the nano model's rank-16 moments (1024 and 2816 elements) and
# most plain weights are quantized (the default 4096 would leave the projected moments float32).
MIN_8BIT_NUMEL = 256
CFG = dict(name="subtrack++", lr=3e-3, weight_decay=0.1, rank=16, update_interval=5, step_size="auto", state_bits=8)


def make_model():
    torch.manual_seed(0)
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train(model, opt, start, stop, rank=0, world=1, save_dir=None):
    """Steps [start, stop): each rank takes its half of the batch (one process accumulates both
    halves, scaled by 1/2, so its gradient is the ranks' average bit for bit)."""
    for step in range(start, stop):
        x, y = batch(step)
        for micro in range(rank, 2, world):
            rows = slice(micro * BATCH // 2, (micro + 1) * BATCH // 2)
            loss = F.cross_entropy(model(x[rows]).reshape(-1, VOCAB), y[rows].reshape(-1))
            (loss * (world / 2)).backward()
        opt.step()
        opt.zero_grad()
        if save_dir is not None and step + 1 == SAVE_AT:
            opt.save_sharded(save_dir)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rank_job(tmp):
    quant8.MIN_8BIT_NUMEL = MIN_8BIT_NUMEL  # spawned processes do not see the test's monkeypatch
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = os.path.join(tmp, "optimizer")
    model = make_model()
    opt = build_sharded_optimizer(model, OptimConfig(**CFG), reduce_gradients=True)
    train(model, opt, 0, SAVE_AT, rank, world, save_dir=ckpt)
    live = {n: {k: v.clone() for k, v in opt.inner.state[opt._params[n]].items()} for n in opt.owned}
    train(model, opt, SAVE_AT, STEPS, rank, world)
    out = {"weights": weights(model), "live_state": live, "owned": list(opt.owned)}

    resumed = make_model()
    resumed.load_state_dict(torch.load(os.path.join(tmp, "model.pt"), weights_only=True))
    resumed_opt = build_sharded_optimizer(resumed, OptimConfig(**CFG), reduce_gradients=True)
    resumed_opt.load_sharded(ckpt)
    out["loaded_state"] = {n: {k: v.clone() for k, v in resumed_opt.inner.state[resumed_opt._params[n]].items()}
                          for n in resumed_opt.owned}
    train(resumed, resumed_opt, SAVE_AT, STEPS, rank, world)
    out["resumed_weights"] = weights(resumed)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("quant8_sharded"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: same kernels, same rounding
    mp = pytest.MonkeyPatch()
    mp.setattr(quant8, "MIN_8BIT_NUMEL", MIN_8BIT_NUMEL)
    try:
        model = make_model()
        opt = build_optimizer(model, OptimConfig(**CFG))
        train(model, opt, 0, SAVE_AT)
        torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))  # the ranks hold the same weights
        train(model, opt, SAVE_AT, STEPS)
        single = {"weights": weights(model), "optimizer": opt}
        ranks = run_distributed(rank_job, 2, tmp, timeout=120)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return single, ranks


def test_sharded_8bit_subtrack_equals_single_process_8bit_bit_exactly(runs):
    single, ranks = runs
    opt = single["optimizer"]
    projected = [s for s in opt.state.values() if "basis" in s]
    assert projected and all(s["exp_avg"].dtype == torch.uint8 and int(s["subspace_updates"]) == 3
                             for s in projected)  # 8-bit moments, 1 SVD + 2 rotations
    assert sorted(ranks[0]["owned"] + ranks[1]["owned"]) == sorted(single["weights"])
    for r in ranks:
        for name, w in single["weights"].items():
            assert torch.equal(r["weights"][name], w), name


def test_sharded_8bit_checkpoint_keeps_codes_and_absmax_and_resumes_bit_exactly(runs):
    _, ranks = runs
    n_codes = 0
    for r in ranks:
        for name, live in r["live_state"].items():
            loaded = r["loaded_state"][name]
            assert set(loaded) == set(live), name
            for key, value in live.items():
                assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), f"{name}.{key}"
            n_codes += sum(v.dtype == torch.uint8 for v in live.values())
        for name, w in r["weights"].items():
            assert torch.equal(r["resumed_weights"][name], w), name
    assert n_codes > 0
