"""Matrix-granular ZeRO sharding (optim/sharded.py) on 2 gloo ranks against one process.

One 2-rank job (module fixture `two_ranks`) trains the nano Llama 20 steps with AdamW and with
SubTrack++ (update interval 5: the first SVD then geodesic updates at steps 5, 10, 15), in both
gradient modes, and resumes from checkpoints saved at step 10 by 2 ranks and by 1 process. The
tests compare what each rank returns with single-process runs of the unsharded optimizer.
"""
import contextlib
import hashlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.sizes import build_model
from optim import grassmann
from optim.factory import OptimConfig, build_optimizer
from optim.nbytes import tensor_bytes
from optim.sharded import ShardedOptimizer, assign_owners, build_sharded_optimizer
from optim.stats import SubspaceStats
from tests.distributed import run_distributed
from tests.state_helpers import consolidated_state_dict

VOCAB, SEQ, GLOBAL_BATCH, STEPS, SAVE_AT, CLIP = 256, 16, 4, 20, 10, 1.0
GAP = 5  # subspace update interval: updates at steps 0 (SVD), 5, 10, 15
CONFIGS = {
    "adamw": dict(name="adamw", lr=3e-3, weight_decay=0.1),
    "subtrack++": dict(name="subtrack++", lr=3e-3, weight_decay=0.1, rank=8, update_interval=GAP),
    # torch's own, on whole matrices: each owner orthogonalizes (Muon) or factors (Adafactor) its matrices
    "muon": dict(name="muon", lr=3e-3, weight_decay=0.1, matrix_lr_ratio=0.5),
    "adafactor": dict(name="adafactor", lr=3e-3, momentum=0.9),
    "subtrack-adafactor": dict(name="subtrack-adafactor", lr=3e-3, rank=8, update_interval=GAP),
    "subtrack-muon": dict(name="subtrack-muon", lr=3e-3, weight_decay=0.1, rank=8, update_interval=GAP),
}
# float32. The reference accumulates the two micro-batches the ranks take, so its averaged
# gradients match the reduced ones; only the clipping norm is summed in another order.
TOL = dict(rtol=1e-5, atol=1e-6)


def make_model():
    torch.manual_seed(0)
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ)


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def lr_at(step):
    return CONFIGS["adamw"]["lr"] * (1.0 - step / (2 * STEPS))  # a schedule the wrapper must pass on


def checksum(model):
    flat = torch.cat([p.detach().reshape(-1) for _, p in sorted(model.named_parameters())])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def count_subspace_calls():
    """Count first-basis SVDs and geodesic steps (the optimizer calls them through the module)."""
    calls = {"svd": 0, "geodesic": 0}
    real_svd, real_geo = grassmann.initial_basis, grassmann.grassmann_update_steps

    def svd(*a, **k):
        calls["svd"] += 1
        return real_svd(*a, **k)

    def geo(*a, **k):  # a generator of sums, as the one it wraps
        calls["geodesic"] += 1
        return (yield from real_geo(*a, **k))

    grassmann.initial_basis, grassmann.grassmann_update_steps = svd, geo
    try:
        yield calls
    finally:
        grassmann.initial_basis, grassmann.grassmann_update_steps = real_svd, real_geo


def train(model, opt, start, stop, *, rank=0, world=1, forward=None, clip=None, save_dir=None, stats=None):
    """Steps [start, stop) on this rank's rows of the global batch; returns per-step checksums."""
    forward = forward or model
    sums = []
    for step in range(start, stop):
        x, y = global_batch(step)
        # A rank takes its micro-batch (rows) of the global batch; one process accumulates both
        # micro-batches, as the training loop does, so both see the same global batch.
        for micro in range(rank, 2, world):
            rows = slice(micro * GLOBAL_BATCH // 2, (micro + 1) * GLOBAL_BATCH // 2)
            loss = F.cross_entropy(forward(x[rows]).reshape(-1, VOCAB), y[rows].reshape(-1))
            (loss * (world / 2)).backward()
        (clip or opt.clip_grad_norm_)(CLIP)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad()
        sums.append(checksum(model))
        if stats is not None and isinstance(opt, SubspaceStats):
            stats.append(opt.pop_subspace_stats())
        if save_dir is not None and step + 1 == SAVE_AT:
            opt.save_sharded(os.path.join(save_dir, "optimizer"))
            consolidated = consolidated_state_dict(opt)  # collective; the whole state on rank 0
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(save_dir, "model.pt"))
                torch.save(consolidated, os.path.join(save_dir, "consolidated.pt"))
    return sums


def resume(preset, ckpt, consolidated=False, **kwargs):
    model = make_model()
    model.load_state_dict(torch.load(os.path.join(ckpt, "model.pt"), weights_only=True))
    opt = build_sharded_optimizer(model, OptimConfig(**CONFIGS[preset]), **kwargs)
    if consolidated:
        opt.load_state_dict(torch.load(os.path.join(ckpt, "consolidated.pt"), weights_only=True))
    else:
        opt.load_sharded(os.path.join(ckpt, "optimizer"))
    return model, opt


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def subspace_counters(opt):
    return {n: int(opt.inner.state[opt._params[n]]["subspace_updates"])
            for n in opt.owned if "subspace_updates" in opt.inner.state[opt._params[n]]}


def rank_job(tmp, single_ckpt):
    """Runs on each of 2 ranks: every scenario, returns what the tests compare."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for preset, cfg in CONFIGS.items():
        res = out[preset] = {}
        # (b) the wrapper reduce-scatters the gradients itself; save at step 10.
        model = make_model()
        opt = build_sharded_optimizer(model, OptimConfig(**cfg), reduce_gradients=True, bucket_numel=20_000)
        stats = []
        with count_subspace_calls() as calls:
            res["checksums_b"] = train(model, opt, 0, STEPS, rank=rank, world=world,
                                       save_dir=os.path.join(tmp, f"{preset}-w2"), stats=stats)
        res.update(weights_b=weights(model), calls=dict(calls), counters=subspace_counters(opt),
                   owned=list(opt.owned), state_bytes=opt.state_bytes(), stats=stats,
                   buckets=len(opt._buckets), comm=dict(opt.comm_bytes))
        # (a) gradients averaged by DDP; the wrapper only steps its shard and gathers.
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = build_sharded_optimizer(model, OptimConfig(**cfg), reduce_gradients=False)
        res["checksums_a"] = train(model, opt, 0, STEPS, rank=rank, world=world, forward=ddp)
        res["weights_a"] = weights(model)
        # resume at world size 2 from 2 ranks and from 1 process
        for key, ckpt in (("resume_2to2", os.path.join(tmp, f"{preset}-w2")), ("resume_1to2", single_ckpt[preset])):
            model, opt = resume(preset, ckpt, reduce_gradients=True)
            res[key] = train(model, opt, SAVE_AT, STEPS, rank=rank, world=world)[-1], weights(model)
    return out


def single_process(preset, tmp):
    """The unsharded optimizer from optim.factory on the whole global batch, and a world-size-1
    ShardedOptimizer run that saves a checkpoint at step 10."""
    model = make_model()
    opt = build_optimizer(model, OptimConfig(**CONFIGS[preset]))
    with count_subspace_calls() as calls:
        train(model, opt, 0, STEPS, clip=lambda c: torch.nn.utils.clip_grad_norm_(model.parameters(), c))
    state_bytes = tensor_bytes(list(opt.state.values()))
    ref = {"weights": weights(model), "calls": dict(calls), "state_bytes": state_bytes,
           "projected": [n for g in opt.param_groups if "rank" in g for n in g["names"]]}
    ckpt = os.path.join(tmp, f"{preset}-w1")
    model = make_model()
    train(model, build_sharded_optimizer(model, OptimConfig(**CONFIGS[preset])), 0, SAVE_AT, save_dir=ckpt)
    return ref, ckpt


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("sharded"))
    refs, single_ckpt = {}, {}
    for preset in CONFIGS:
        refs[preset], single_ckpt[preset] = single_process(preset, tmp)
    ranks = run_distributed(rank_job, 2, tmp, single_ckpt, timeout=120)
    return refs, ranks, tmp


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_sharded_equals_single_process_in_both_gradient_modes(two_ranks, preset):
    refs, ranks, _ = two_ranks
    for mode in ("weights_b", "weights_a"):
        for r in ranks:
            for name, w in refs[preset]["weights"].items():
                torch.testing.assert_close(r[preset][mode][name], w, **TOL, msg=lambda m: f"{mode} {name}: {m}")


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_weights_bit_identical_across_ranks_after_every_step(two_ranks, preset):
    _, (r0, r1), _ = two_ranks
    for mode in ("checksums_b", "checksums_a"):
        assert len(r0[preset][mode]) == STEPS
        assert r0[preset][mode] == r1[preset][mode], f"{mode}: ranks diverged"


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_per_rank_state_is_about_half_and_shards_partition_the_model(two_ranks, preset):
    refs, (r0, r1), _ = two_ranks
    owned0, owned1 = set(r0[preset]["owned"]), set(r1[preset]["owned"])
    assert owned0.isdisjoint(owned1) and owned0 | owned1 == set(refs[preset]["weights"])
    single = refs[preset]["state_bytes"]
    assert r0[preset]["state_bytes"] + r1[preset]["state_bytes"] == single
    for r in (r0, r1):
        assert 0.35 * single <= r[preset]["state_bytes"] <= 0.65 * single
    assert r0[preset]["buckets"] > 1  # the small bucket cap forced several collectives


def test_every_owner_ran_its_subspace_updates_and_no_rank_computed_another_ranks(two_ranks):
    refs, (r0, r1), _ = two_ranks
    ref, projected = refs["subtrack++"]["calls"], set(refs["subtrack++"]["projected"])
    expected_updates = 1 + (STEPS - 1) // GAP  # the first SVD, then steps 5, 10, 15
    assert expected_updates >= 4 and ref == {"svd": len(projected), "geodesic": len(projected) * (expected_updates - 1)}
    for r in (r0, r1):
        res = r["subtrack++"]
        mine = projected & set(res["owned"])
        assert mine, "each rank should own some projected matrices"
        assert res["counters"] == {n: expected_updates for n in mine}
        # SVDs and geodesic steps only for the matrices this rank owns, once each
        assert res["calls"] == {"svd": len(mine), "geodesic": len(mine) * (expected_updates - 1)}
    # merged subspace stats count every rank's geodesic updates
    assert sum(s["count"] for s in r0["subtrack++"]["stats"]) == ref["geodesic"]
    assert r0["subtrack++"]["stats"] == r1["subtrack++"]["stats"]


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_resume_across_world_sizes_continues_the_same_trajectory(two_ranks, preset):
    refs, ranks, tmp = two_ranks
    ref = refs[preset]["weights"]
    for key in ("resume_2to2", "resume_1to2"):
        assert ranks[0][preset][key][0] == ranks[1][preset][key][0], f"{key}: ranks diverged"
        for name, w in ranks[0][preset][key][1].items():
            torch.testing.assert_close(w, ref[name], **TOL, msg=lambda m: f"{key} {name}: {m}")
    # 2 -> 1: this process loads both shards of the 2-rank checkpoint, or their consolidation
    for consolidated in (False, True):
        model, opt = resume(preset, os.path.join(tmp, f"{preset}-w2"), consolidated=consolidated)
        train(model, opt, SAVE_AT, STEPS)
        for name, w in weights(model).items():
            torch.testing.assert_close(w, ref[name], **TOL, msg=lambda m: f"resume_2to1 {consolidated=} {name}: {m}")


def test_assign_owners_is_deterministic_balanced_and_order_independent():
    shapes = {f"w{i}": torch.Size([i + 1, 7]) for i in range(23)}
    shapes["big"] = torch.Size([40, 40])
    owners = assign_owners(shapes, 3)
    assert owners == assign_owners(dict(reversed(list(shapes.items()))), 3)
    load = {k: sum(shapes[n].numel() for n, r in owners.items() if r == k) for k in range(3)}
    heaviest = max(load, key=load.get)
    # greedy balance: the heaviest rank was the lightest when it got its smallest tensor
    smallest = min(shapes[n].numel() for n, r in owners.items() if r == heaviest)
    assert load[heaviest] - min(load.values()) <= smallest
    assert owners["big"] == heaviest and [n for n, r in owners.items() if r == heaviest] == ["big"]
    assert assign_owners(shapes, 1) == {n: 0 for n in sorted(shapes)}


def test_flattened_projected_weight_is_refused_with_the_fix():
    w = torch.nn.Parameter(torch.randn(8, 4))
    flat = torch.nn.Parameter(torch.randn(32))
    with pytest.raises(ValueError, match=r"flat.*shape \(32,\).*use ZeRO stage 0"):
        ShardedOptimizer([("flat", flat)], torch.optim.AdamW, [{"params": [flat], "rank": 2}])
    opt = ShardedOptimizer([("w", w)], torch.optim.AdamW, [{"params": [w], "rank": 2}])
    with pytest.raises(ValueError, match=r"w has shape \(32,\).*2-D weight of shape \(8, 4\)"):
        opt.bind([("w", torch.nn.Parameter(w.detach().reshape(-1)))])


def test_bind_follows_parameters_replaced_by_clones_keeping_state_by_name():
    """DeepSpeed may swap a module's parameters for clones; state stays with the name."""
    models = [make_model(), make_model()]
    opts = [build_sharded_optimizer(m, OptimConfig(**CONFIGS["subtrack++"])) for m in models]
    train(models[0], opts[0], 0, 1)
    train(models[1], opts[1], 0, 1)
    for module in models[1].modules():  # replace every parameter by a clone, as a wrapper would
        for key, p in list(module.named_parameters(recurse=False)):
            setattr(module, key, torch.nn.Parameter(p.detach().clone()))
    opts[1].bind(models[1].named_parameters())
    train(models[0], opts[0], 1, 3)
    train(models[1], opts[1], 1, 3)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
    assert all(p in opts[1].inner.state for p in models[1].parameters())


def test_state_balance_evens_out_subtrack_state_where_numel_balance_does_not():
    """SubTrack++ keeps far less state for a projected matrix than AdamW does for a plain one,
    so balancing elements leaves state uneven; balance="state" evens it (7b-like proportions)."""
    from optim.sharded import _MetaParams, state_costs

    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, num_layers=4)
    template = build_optimizer(_MetaParams(model), OptimConfig(**CONFIGS["subtrack++"]))
    costs = state_costs(template)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    spread = {}  # largest per-rank state over the ideal 1/N, 4 ranks
    for label, owners in (("numel", assign_owners(shapes, 4)), ("state", assign_owners(shapes, 4, costs))):
        per_rank = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(4)]
        spread[label] = max(per_rank) / (sum(per_rank) / 4)
    assert spread["numel"] > 1.3 and spread["state"] < 1.01, spread
    opt = build_sharded_optimizer(model, OptimConfig(**CONFIGS["subtrack++"]), balance="state")
    assert opt.owners == {n: 0 for n in sorted(shapes)} and opt.state_bytes() == sum(costs.values())
