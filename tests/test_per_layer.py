"""Per-layer weight updates (optim/per_layer.py): the same weights, optimizer state and lr schedule
as `optimizer.step()`, each gradient freed inside its own hook, and the refusals."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from optim import quant8
from optim.factory import OptimConfig, build_optimizer
from optim.per_layer import attach_per_layer_updates, check_per_layer_allowed
from optim.sharded import build_sharded_optimizer

VOCAB, STEPS = 256, 8
CONFIGS = {
    # update interval 3: first SVD at step 0, geodesic moves (moment rotation) at steps 3 and 6
    "subtrack++": dict(name="subtrack++", lr=3e-3, weight_decay=0.1, rank=8, update_interval=3, step_size="auto"),
    "adamw": dict(name="adamw", lr=3e-3, weight_decay=0.1),  # torch.optim.AdamW, stepped through optimizer.step()
    "subtrack++_8bit": dict(name="subtrack++", lr=3e-3, weight_decay=0.1, rank=8, update_interval=3,
                            step_size="auto", state_bits=8),
}


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, step):
    x, y = batch(step)
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def build(preset):
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=VOCAB)
    optimizer = build_optimizer(model, OptimConfig(**CONFIGS[preset]))
    # warmup then decay: every step runs at a different lr the scheduler must deliver
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s)
    return model, optimizer, scheduler


def train_normal(preset):
    model, optimizer, scheduler = build(preset)
    norms = []
    for step in range(STEPS):
        loss_of(model, step).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, norms


def train_per_layer(preset):
    model, optimizer, scheduler = build(preset)
    handle = attach_per_layer_updates(model, optimizer)
    norms = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            loss_of(model, step).backward()
            scheduler.step()
            norms.append(handle.pop_grad_norm())
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    handle.remove()
    return model, optimizer, norms


@pytest.mark.parametrize("preset", list(CONFIGS))
def test_per_layer_updates_give_the_same_weights_and_state_as_optimizer_step_bit_for_bit(preset, monkeypatch):
    """8 steps with weight decay and a changing lr; SubTrack++ moves its subspace twice (steps 3
    and 6). Weights and every optimizer state tensor are identical; the handle's gradient norm
    equals the global norm to rounding (summed in another order)."""
    monkeypatch.setattr(quant8, "MIN_8BIT_NUMEL", 256)  # nano's rank-8 moments (512+ elements) in 8 bits
    ref_model, ref_opt, ref_norms = train_normal(preset)
    model, opt, norms = train_per_layer(preset)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    ref_state, state = ref_opt.state_dict(), opt.state_dict()
    assert ref_state["param_groups"] == state["param_groups"]  # the scheduler drove the lr of both
    assert set(ref_state["state"]) == set(state["state"]) and ref_state["state"]
    for i, s in ref_state["state"].items():
        for key, value in s.items():
            assert torch.equal(value, state["state"][i][key]), f"state {i}.{key}"
    if preset != "adamw":
        projected = [s for s in opt.state.values() if "basis" in s]
        assert projected and all(int(s["subspace_updates"]) == 3 for s in projected)
    if preset.endswith("8bit"):
        assert any(s["exp_avg"].dtype == torch.uint8 for s in opt.state.values())
    torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms), rtol=1e-5, atol=0)


@pytest.mark.parametrize("preset", ["subtrack++", "adamw"])
def test_each_gradient_is_freed_in_its_own_hook_so_at_most_one_is_alive(preset):
    """A second hook on every weight runs right after the per-layer one: there p.grad and every
    other gradient are None, so at most one full-size gradient exists at any time. Each weight
    is stepped once per backward, in its hook (it has changed by then)."""
    model, optimizer, _ = build(preset)
    params = [p for p in model.parameters() if p.requires_grad]
    handle = attach_per_layer_updates(model, optimizer)
    before = {id(p): p.detach().clone() for p in params}
    seen = []

    def observe(p):
        seen.append(id(p))
        assert p.grad is None
        assert all(q.grad is None for q in params)
        assert not torch.equal(p, before[id(p)])  # stepped already

    observers = [p.register_post_accumulate_grad_hook(observe) for p in params]
    loss_of(model, 0).backward()
    assert sorted(seen) == sorted(before)  # every weight once
    for h in observers:
        h.remove()
    handle.remove()
    loss_of(model, 1).backward()  # detached: gradients stay, weights do not move
    assert all(p.grad is not None for p in params)
    stepped = {id(p): p.detach().clone() for p in params}
    assert all(torch.equal(p, stepped[id(p)]) for p in params)


def test_generic_step_refuses_when_other_gradients_are_present():
    """torch.optim.AdamW is stepped with optimizer.step(), which must see one gradient only:
    leftover zero gradients (zero_grad(set_to_none=False)) would be stepped too."""
    model, optimizer, _ = build("adamw")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    attach_per_layer_updates(model, optimizer)
    with pytest.raises(RuntimeError, match="set_to_none=True"):
        loss_of(model, 0).backward()


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad_accum_steps=2, world_size=1, grad_clip=0.0), r"gradient accumulation 1, got 2.*train.micro_batch_size"),
    (dict(grad_accum_steps=1, world_size=2, grad_clip=0.0), r"world size 2.*single process"),
    (dict(grad_accum_steps=1, world_size=1, grad_clip=1.0), r"train.grad_clip 1.0.*train.grad_clip: 0"),
])
def test_check_per_layer_allowed_refuses_accumulation_ranks_and_clipping_naming_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        check_per_layer_allowed(**kwargs)
    assert "optim.per_layer: false" in str(err.value)
    check_per_layer_allowed(1, 1, 0.0)  # the allowed setting passes


def test_attach_refuses_a_sharded_optimizer_and_per_layer_is_a_validated_config_field():
    model = build_model("nano", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="ShardedOptimizer"):
        attach_per_layer_updates(model, build_sharded_optimizer(model, OptimConfig(name="adamw")))
    assert OptimConfig().per_layer is False and OptimConfig(per_layer=True).per_layer is True
    with pytest.raises(ValueError, match="optim.per_layer"):
        OptimConfig(per_layer="yes")


def test_per_layer_run_resumes_from_a_checkpoint_of_the_normal_step_and_follows_the_loaded_lr():
    """load_state_dict replaces the param groups (and their lr) under live hooks: the per-layer run
    continues exactly as the normal run from the same checkpoint (SubTrack++, a move at step 6)."""
    ref_model, ref_opt, _ = build("subtrack++")
    model, opt, _ = build("subtrack++")
    handle = attach_per_layer_updates(model, opt)
    for step in range(4):
        loss_of(ref_model, step).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        loss_of(model, step).backward()  # the hooks stay attached across the load below
    for g in ref_opt.param_groups:
        g["lr"] = 1e-3
    saved = ref_opt.state_dict()
    model.load_state_dict(ref_model.state_dict())
    opt.load_state_dict(saved)
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    for step in range(4, STEPS):
        loss_of(ref_model, step).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        loss_of(model, step).backward()
    handle.remove()
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
