"""The peers users compare SubTrack++ with: muon, adafactor, adamw8bit, and the matrices' own lr; and ours
beside them, subtrack-adafactor and subtrack-muon.

Each is checked against torch's (or bitsandbytes') optimizer stepped by hand on the same gradients,
and trained through the loop with an exact resume; the 2-rank `zero` runs are in tests/test_sharded.py.
"""
import copy

import pytest
import torch

from models import build_model
from optim import OptimConfig, build_optimizer
from optim.factory import is_projected
from optim.hybrid import HybridOptimizer
from pretrain.checkpoint import load_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.train import train
from tests.nano import assert_identical, nano_config

VOCAB, SEQ, STEPS, LR = 256, 16, 6, 3e-3


def nano_model():
    torch.manual_seed(0)
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ)


def backward(model, step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()


def split(model):
    matrices = [p for n, p in model.named_parameters() if is_projected(n, p)]
    plain = [p for n, p in model.named_parameters() if not is_projected(n, p)]
    return plain, matrices


def step_both(ours, model, reference_opts, reference_model):
    """STEPS steps of `ours` on `model` and of the reference optimizers on a copy, same gradients."""
    for step in range(STEPS):
        backward(model, step)
        for p, q in zip(model.parameters(), reference_model.parameters()):
            q.grad = p.grad.clone()
        ours.step()
        for opt in reference_opts:
            opt.step()
        ours.zero_grad()
        reference_model.zero_grad()


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_muon_equals_torch_muon_on_the_matrices_and_adamw_elsewhere_stepped_by_hand(ratio):
    model = nano_model()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, OptimConfig(name="muon", lr=LR, matrix_lr_ratio=ratio, weight_decay=0.01))
    plain, matrices = split(reference)
    by_hand = [torch.optim.Muon(matrices, lr=LR * ratio, weight_decay=0.01, momentum=0.95, nesterov=True,
                                adjust_lr_fn="match_rms_adamw"),
               torch.optim.AdamW(plain, lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)]
    step_both(ours, model, by_hand, reference)
    assert isinstance(ours, HybridOptimizer)
    assert_same_weights(model, reference)
    assert {k for s in ours.state.values() for k in s} == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}


def test_adafactor_equals_torch_adafactor_with_its_defaults_on_the_matrices():
    model = nano_model()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, OptimConfig(name="adafactor", lr=LR))
    plain, matrices = split(reference)
    by_hand = [torch.optim.Adafactor(matrices, lr=LR), torch.optim.AdamW(plain, lr=LR, eps=1e-6, weight_decay=0.0)]
    step_both(ours, model, by_hand, reference)
    assert_same_weights(model, reference)
    state = ours.state[split(model)[1][0]]
    m, n = split(model)[1][0].shape
    assert state["row_var"].numel() + state["col_var"].numel() == m + n  # factored: m + n numbers
    assert "momentum_buffer" not in state


def test_adafactor_momentum_averages_the_steps_torch_adafactor_takes():
    """buf <- b buf + (1 - b) step, the weight moves by buf (the Adafactor paper's beta1, no bias correction)."""
    beta = 0.9
    model = nano_model()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, OptimConfig(name="adafactor", lr=LR, momentum=beta))
    _, matrices = split(reference)
    plain_ref = torch.optim.AdamW(split(reference)[0], lr=LR, eps=1e-6, weight_decay=0.0)
    adafactor = torch.optim.Adafactor(matrices, lr=LR)
    bufs = [torch.zeros_like(p) for p in matrices]
    for step in range(STEPS):
        backward(model, step)
        for p, q in zip(model.parameters(), reference.parameters()):
            q.grad = p.grad.clone()
        ours.step()
        before = [p.detach().clone() for p in matrices]
        adafactor.step()
        plain_ref.step()
        with torch.no_grad():
            for p, old, buf in zip(matrices, before, bufs):
                buf.mul_(beta).add_(p - old, alpha=1 - beta)
                p.copy_(old + buf)
        ours.zero_grad()
        reference.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


def test_adamw8bit_is_adamw_with_8_bit_state():
    model = nano_model()
    opt = build_optimizer(model, OptimConfig(name="adamw8bit", lr=LR))
    assert OptimConfig(name="adamw8bit").state_bits == 8
    backward(model, 0)
    opt.step()
    assert opt.state[model.embed_tokens.weight]["exp_avg"].dtype == torch.uint8
    same = nano_model()
    reference = build_optimizer(same, OptimConfig(name="adamw", lr=LR, state_bits=8))
    backward(same, 0)
    reference.step()
    assert_same_weights(model, same)


@pytest.mark.parametrize("name", ["adamw", "subtrack++"])
def test_matrix_lr_ratio_gives_the_matrices_their_own_lr(name):
    model = nano_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=LR, matrix_lr_ratio=0.5, rank=8, update_interval=5))
    plain, matrices = opt.param_groups
    assert plain["lr"] == LR and matrices["lr"] == LR * 0.5
    assert all(is_projected(n, p) for n, p in zip(matrices["names"], matrices["params"]))
    assert build_optimizer(model, OptimConfig(name="adamw", lr=LR)).param_groups[0]["params"] == list(model.parameters())


@pytest.mark.parametrize("field, value, words", [
    ("matrix_lr_ratio", 0, "must be a positive number"),
    ("momentum", 1.0, "must be in [0, 1)"),
])
def test_bad_peer_options_are_refused_naming_the_key(field, value, words):
    with pytest.raises(ValueError, match=rf"optim.{field}.*{words.replace('[', '.').replace(')', '.')}"):
        OptimConfig(name="muon", **{field: value})


def test_momentum_of_a_method_without_one_and_8_bit_muon_are_refused():
    with pytest.raises(ValueError, match="optim.momentum is an option of muon and adafactor"):
        OptimConfig(name="adamw", momentum=0.9)
    with pytest.raises(ValueError, match="adamw8bit"):
        OptimConfig(name="muon", state_bits=8)


@pytest.mark.parametrize("name", ["muon", "adafactor", "subtrack-adafactor", "subtrack-muon"])
def test_fsdp_refuses_the_whole_matrix_peers_in_one_line(tmp_path, name):
    with pytest.raises(ConfigError, match=f"optim.name '{name}' under train.parallelism fsdp.*zero"):
        load_config(nano_config(tmp_path), [f"optim.name={name}", "optim.rank=8", "train.parallelism=fsdp"],
                    world_size=1)


@pytest.mark.parametrize("overrides", [["optim.name=muon", "optim.matrix_lr_ratio=0.5"],
                                       ["optim.name=adafactor", "optim.momentum=0.9"],
                                       ["optim.name=adamw8bit"],
                                       ["optim.name=subtrack-adafactor", "optim.rank=8", "optim.update_interval=3"],
                                       ["optim.name=subtrack-muon", "optim.rank=8", "optim.update_interval=3"]])
def test_peer_resume_equals_uninterrupted(tmp_path, overrides):
    config = nano_config(tmp_path)
    run = [*overrides, "train.max_steps=8"]
    straight = train(load_config(config, [*run, f"log.run_dir={tmp_path / 'a'}"], world_size=1))
    train(load_config(config, [*run, f"log.run_dir={tmp_path / 'b'}", "train.steps_per_run=4"], world_size=1))
    resumed = train(load_config(config, [*run, f"log.run_dir={tmp_path / 'b'}", "checkpoint.resume=auto"],
                                world_size=1))
    assert resumed["start_step"] == 4
    assert resumed["train_losses"] == straight["train_losses"][4:]
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["optimizer"], b["optimizer"], "optimizer")


def test_per_layer_muon_equals_the_normal_step(tmp_path):
    runs = {}
    for per_layer in (False, True):
        cfg = load_config(nano_config(tmp_path), [f"log.run_dir={tmp_path / str(per_layer)}", "optim.name=muon",
                                                  f"optim.per_layer={str(per_layer).lower()}", "train.max_steps=4",
                                                  "train.micro_batch_size=4", "train.grad_clip=0"], world_size=1)
        runs[per_layer] = train(cfg)
    assert runs[True]["train_losses"] == runs[False]["train_losses"]
    a, b = load_checkpoint(runs[True]["checkpoint"]), load_checkpoint(runs[False]["checkpoint"])
    assert_identical(a["model"], b["model"], "model")


# ----------------------------------------------------------------------------- subtrack-adafactor

def test_subtrack_adafactor_without_momentum_is_torch_adafactor():
    """beta1 = 0: the subspace momentum is the projected gradient itself, G~ = G, so the step is Adafactor's."""
    model = nano_model()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, OptimConfig(name="subtrack-adafactor", lr=LR, momentum=0.0, rank=8,
                                              update_interval=2, weight_decay=0.01))
    plain, matrices = split(reference)
    by_hand = [torch.optim.Adafactor(matrices, lr=LR, weight_decay=0.01),
               torch.optim.AdamW(plain, lr=LR, eps=1e-6, weight_decay=0.01)]
    step_both(ours, model, by_hand, reference)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def tracked_left_basis(S, M, G, t, rank, gap):
    """optim/tracked.py's basis for a wide W (left S: (m, r)) at step t, the geodesic step aside: the
    SVD at t = 1, a geodesic step every `gap` steps with the momentum M rotated into the new basis."""
    from optim import grassmann as gm

    if t == 1:
        return gm.initial_basis(G, rank, gm.LEFT), M
    if (t - 1) % gap == 0:
        S_new, _ = gm.grassmann_update(S, G, gm.LEFT, "auto")
        return S_new, (S_new.t() @ S) @ M
    return S, M


def reference_tracked_adafactor(W, grads, rank, beta1, lr, gap):
    """The docstring's formulas, written out for a wide W."""
    m, n = W.shape
    row, col = torch.zeros(m, 1), torch.zeros(1, n)
    M, S = torch.zeros(rank, n), None
    for t, G in enumerate(grads, 1):
        row.lerp_((G * G).mean(1, keepdim=True), t ** -0.8)
        col.lerp_((G * G).mean(0, keepdim=True), t ** -0.8)
        S, M = tracked_left_basis(S, M, G, t, rank, gap)
        R = S.t() @ G
        M = beta1 * M + (1 - beta1) * R
        G_tilde = S @ (M / (1 - beta1 ** t)) + (G - S @ R)
        U = G_tilde / (row @ col / row.mean()).sqrt()
        U = U / max(1.0, float(U.pow(2).mean().sqrt()))
        W = W - max(1e-3, float(W.pow(2).mean().sqrt())) * min(lr, t ** -0.5) * U
    return W


def test_subtrack_adafactor_keeps_momentum_in_the_tracked_subspace_only():
    from optim.tracked_adafactor import TrackedAdafactor

    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(6, 10) * 0.1)
    grads = [torch.randn(6, 10) for _ in range(7)]
    opt = TrackedAdafactor([{"params": [W], "rank": 2, "update_proj_gap": 3, "momentum": 0.9, "lr": 0.05}])
    start = W.detach().clone()
    for G in grads:
        W.grad = G.clone()
        opt.step()
    expected = reference_tracked_adafactor(start, grads, rank=2, beta1=0.9, lr=0.05, gap=3)
    torch.testing.assert_close(W.detach(), expected, rtol=1e-5, atol=1e-6)
    assert int(opt.state[W]["subspace_updates"]) == 3  # the SVD at step 1, geodesic steps at 4 and 7


def test_subtrack_adafactor_keeps_less_state_than_subtrack_plus_plus():
    """r n + m r + m + n numbers per matrix, against SubTrack++'s 2 r n + m r."""
    from pretrain.memory import state_tensor_bytes

    sizes = {}
    for name in ("subtrack-adafactor", "subtrack++"):
        model = nano_model()
        opt = build_optimizer(model, OptimConfig(name=name, lr=LR, rank=8, update_interval=5))
        sizes[name] = state_tensor_bytes(opt, matrices_only=True)
    expected = 0
    for n, p in nano_model().named_parameters():
        if is_projected(n, p):
            m, k = p.shape
            low = min(m, k)
            expected += 4 * (8 * max(m, k) + low * 8 + m + k) + 8 + 8 + 4  # basis, momentum, factors, scalars
    assert sizes["subtrack-adafactor"] == expected
    assert sizes["subtrack-adafactor"] < sizes["subtrack++"]


# ----------------------------------------------------------------------------- subtrack-muon

def test_subtrack_muon_at_full_rank_is_torch_muon_stepped_by_hand():
    """rank = min(m, n) for every nano matrix: the tracked subspace is the whole space, so the
    subspace momentum is Muon's buffer and the step is torch's Muon's. No geodesic step falls in the
    run: at full rank the residual G - S S^T G is rounding noise, so the tracking's direction is
    arbitrary (tests/test_grassmann.py covers the geodesic step at rank < min(m, n))."""
    model = nano_model()
    reference = copy.deepcopy(model)
    ours = build_optimizer(model, OptimConfig(name="subtrack-muon", lr=LR, matrix_lr_ratio=0.5, rank=64,
                                              update_interval=100, weight_decay=0.01))
    plain, matrices = split(reference)
    assert all(min(p.shape) == 64 for p in matrices)
    by_hand = [torch.optim.Muon(matrices, lr=LR * 0.5, weight_decay=0.01, momentum=0.95, nesterov=True,
                                adjust_lr_fn="match_rms_adamw"),
               torch.optim.AdamW(plain, lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)]
    step_both(ours, model, by_hand, reference)
    # Both orthogonalize in bfloat16 (torch's Newton-Schulz); G~ = G + S (R~ - R) differs from Muon's
    # Nesterov momentum by float32 rounding, which can flip a bfloat16 rounding inside the iteration: the
    # weights agree to a tenth of one step (lr 1.5e-3 x 0.2 sqrt(max(m, n)): 2.4e-3 to 4.0e-3 a step here).
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=3e-4, msg=name)


def reference_tracked_muon(W, grads, rank, beta, lr, gap):
    """optim/tracked_muon.py's formulas, written out for a wide W."""
    import math

    from torch.optim import _muon

    m, n = W.shape
    M, S = torch.zeros(rank, n), None
    for t, G in enumerate(grads, 1):
        S, M = tracked_left_basis(S, M, G, t, rank, gap)
        R = S.t() @ G
        M = beta * M + (1 - beta) * R
        G_tilde = S @ (R + beta * (M - R)) + (G - S @ R)
        U = _muon._zeropower_via_newtonschulz(G_tilde, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        W = W - lr * 0.2 * math.sqrt(max(m, n)) * U.float()
    return W


def test_subtrack_muon_keeps_momentum_in_the_tracked_subspace_only():
    from optim.tracked_muon import TrackedMuon

    torch.manual_seed(1)
    W = torch.nn.Parameter(torch.randn(6, 10) * 0.1)
    grads = [torch.randn(6, 10) for _ in range(7)]
    opt = TrackedMuon([{"params": [W], "rank": 2, "update_proj_gap": 3, "lr": 0.01}])
    start = W.detach().clone()
    for G in grads:
        W.grad = G.clone()
        opt.step()
    expected = reference_tracked_muon(start, grads, rank=2, beta=0.95, lr=0.01, gap=3)
    torch.testing.assert_close(W.detach(), expected, rtol=1e-5, atol=1e-6)
    assert int(opt.state[W]["subspace_updates"]) == 3
    assert set(opt.state[W]) == {"step", "basis", "exp_avg", "subspace_updates", "angle"}  # no m x n buffer


def test_subtrack_muon_keeps_less_state_than_subtrack_adafactor_and_muon():
    """r n + m r numbers per matrix: SubTrack-Adafactor's less its m + n factors; Muon keeps m n."""
    from pretrain.memory import state_tensor_bytes

    sizes = {}
    for name in ("subtrack-muon", "subtrack-adafactor", "muon"):
        model = nano_model()
        opt = build_optimizer(model, OptimConfig(name=name, lr=LR, rank=8, update_interval=5))
        backward(model, 0)
        opt.step()  # torch's Muon allocates its buffer at the first step
        sizes[name] = state_tensor_bytes(opt, matrices_only=True)
    expected = sum(4 * (8 * max(p.shape) + min(p.shape) * 8) + 8 + 8 + 4
                   for n, p in nano_model().named_parameters() if is_projected(n, p))
    assert sizes["subtrack-muon"] == expected
    assert sizes["subtrack-muon"] < sizes["subtrack-adafactor"] < sizes["muon"]
