"""The presets reproduce the published packages: galore-torch's GaLoreAdamW, fira's FiraAdamW, torch's AdamW."""
import warnings

import fira
import galore_torch
import pytest
import torch

from models import build_model
from optim import OptimConfig, build_optimizer, param_groups
from optim import grassmann as gm

STEPS, INTERVAL, RANK = 50, 20, 8  # refreshes at steps 20 and 40 after the first SVD


def nano(seed=0):
    """nano Llama: q/k/v/o (64, 64) and gate/up (176, 64) project right, down (64, 176) left."""
    torch.manual_seed(seed)
    return build_model("nano", vocab_size=128)


def token_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 33), generator=g) for _ in range(n)]


def step(model, opt, tokens):
    opt.zero_grad()
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
    opt.step()


def reference_groups(model, scale_key):
    """The same split as optim.param_groups, in the reference packages' group format."""
    plain, projected = param_groups(model, rank=RANK)
    return [{"params": plain["params"]},
            {"params": projected["params"], "rank": RANK, "update_proj_gap": INTERVAL, scale_key: 0.25,
             "proj_type": "std"}]


def run_side_by_side(cfg, reference_cls, scale_key, steps=STEPS):
    ours_model, ref_model = nano(), nano()
    ours = build_optimizer(ours_model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the packages' deprecation notice
        ref = reference_cls(reference_groups(ref_model, scale_key), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    first_bases = {}
    worst = 0.0
    for t, tokens in enumerate(token_batches(steps)):
        step(ours_model, ours, tokens)
        step(ref_model, ref, tokens)
        worst = max(worst, max(float((a - b).detach().abs().max())
                               for a, b in zip(ours_model.parameters(), ref_model.parameters())))
        if t == 0:
            first_bases = {p: ours.state[p]["basis"].clone() for p in ours.param_groups[-1]["params"]}
    return ours, ref, ours_model, ref_model, first_bases, worst


def check_refreshes(ours, ref, ref_model, first_bases):
    """Both sides were projected, bases were refreshed twice and equal the reference's projector."""
    group = ours.param_groups[-1]
    sides = set()
    ref_params = dict(zip(group["names"], ref.param_groups[-1]["params"]))
    for name, p in zip(group["names"], group["params"]):
        state = ours.state[p]
        sides.add(gm.projection_side(tuple(p.shape)))
        assert int(state["subspace_updates"]) == 3
        assert not torch.allclose(state["basis"], first_bases[p], atol=1e-3)  # the refreshes moved it
        projector = ref.state[ref_params[name]]["projector"]
        # Same basis, signs included (SVD of gradients equal to ~1e-7 amplifies to ~1e-5).
        assert torch.allclose(state["basis"], projector.ortho_matrix, atol=1e-4)
    assert sides == {"left", "right"}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_preset_reproduces_galore_torch_adamw_over_50_steps_left_and_right(weight_decay):
    cfg = OptimConfig(name="galore", lr=3e-3, rank=RANK, update_interval=INTERVAL, scale=0.25,
                      weight_decay=weight_decay)
    ours, ref, _, ref_model, first_bases, worst = run_side_by_side(cfg, galore_torch.GaLoreAdamW, "scale")
    assert worst <= 1e-6
    check_refreshes(ours, ref, ref_model, first_bases)


def test_fira_preset_reproduces_fira_adamw_over_50_steps_left_and_right():
    cfg = OptimConfig(name="fira", lr=3e-3, rank=RANK, update_interval=INTERVAL, scale=0.25, weight_decay=0.05)
    ours, ref, _, ref_model, first_bases, worst = run_side_by_side(cfg, fira.FiraAdamW, "alpha")
    assert worst <= 1e-6
    check_refreshes(ours, ref, ref_model, first_bases)
    # The limiter state matches the package's too.
    group = ours.param_groups[-1]
    for p, q in zip(group["params"], ref.param_groups[-1]["params"]):
        assert torch.allclose(ours.state[p]["limiter_norm"], ref.state[q]["scaling_grad"], rtol=1e-5)


def test_fira_preset_with_exact_residual_departs_from_the_published_code():
    """recovery_scaled_back=False uses G - S S^T G instead of G - scale * S S^T G: a real difference."""
    cfg = OptimConfig(name="fira", lr=3e-3, rank=RANK, update_interval=INTERVAL, recovery_scaled_back=False)
    *_, worst = run_side_by_side(cfg, fira.FiraAdamW, "alpha", steps=5)
    assert worst > 1e-4


def test_adamw_preset_equals_torch_adamw():
    cfg = OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours_model, ref_model = nano(), nano()
    ours = build_optimizer(ours_model, cfg)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for tokens in token_batches(20):
        step(ours_model, ours, tokens)
        step(ref_model, ref, tokens)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    names = [n for g in ours.param_groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in ours_model.named_parameters())


@pytest.mark.parametrize("name, choices", [("subtrack++", ("grassmann", "rotate", "recover", True)),
                                           ("subtrack++paper", ("grassmann", "rotate", "recover", False)),
                                           ("subtrack", ("grassmann", "keep", "drop", False)),
                                           ("galore", ("svd", "keep", "drop", False)),
                                           ("fira", ("svd", "keep", "recover", False))])
def test_presets_project_attention_and_mlp_weights_with_their_choices(name, choices):
    model = nano()
    opt = build_optimizer(model, OptimConfig(name=name, rank=RANK, update_interval=INTERVAL, step_size="auto"))
    plain, projected = opt.param_groups
    assert (projected["subspace"], projected["moments"], projected["residual"], projected["scale_recovery"]) == choices
    assert projected["step_size"] == "auto" and projected["scale"] == 0.25 and projected["rank"] == RANK
    assert sorted(projected["names"]) == sorted(
        f"layers.{i}.{m}.weight" for i in range(2)
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= set(plain["names"])
    # An override of one choice replaces the preset's.
    opt = build_optimizer(model, OptimConfig(name=name, rank=RANK, update_interval=INTERVAL, moments="reset",
                                             scale_recovery=not choices[3]))
    assert opt.param_groups[-1]["moments"] == "reset" and opt.param_groups[-1]["scale_recovery"] == (not choices[3])


@pytest.mark.parametrize("fields, message", [({"name": "lion"}, "optim.name 'lion' is unknown"),
                                             ({"step_size": "best"}, "optim.step_size 'best'"),
                                             ({"moments": "rotated"}, "optim.moments 'rotated' is unknown"),
                                             ({"rank": 0}, "optim.rank 0"),
                                             ({"state_bits": 4}, "optim.state_bits 4"),
                                             ({"update_interval": 2.5}, "optim.update_interval 2.5"),
                                             ({"basis_dtype": "float16"}, "optim.basis_dtype 'float16' is unknown"),
                                             ({"betas": (0.9, 1.5)}, r"optim.betas \(0.9, 1.5\)")])
def test_optim_config_refuses_bad_values_naming_them(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**fields)


@pytest.mark.parametrize("unset", ["rank", "update_interval"])
def test_projected_preset_without_rank_or_interval_is_refused_and_adamw_needs_neither(unset):
    """None (the default) means "the paper's value for the model size", which the run config fills
    in; a projected preset still without one must not fall back on a silent default."""
    assert OptimConfig().rank is None and OptimConfig().update_interval is None
    fields = {"rank": RANK, "update_interval": INTERVAL, unset: None}
    with pytest.raises(ValueError, match=f"optim.{unset} is not set and model size has no paper default; "
                                         f"set optim.{unset}"):
        build_optimizer(nano(), OptimConfig(name="subtrack++", **fields))
    assert isinstance(build_optimizer(nano(), OptimConfig(name="adamw")), torch.optim.AdamW)
    assert len(param_groups(nano())) == 1  # rank None: nothing projected


def test_basis_dtype_option_reaches_the_projected_group_and_its_state():
    opt = build_optimizer(nano(), OptimConfig(name="subtrack++", rank=RANK, update_interval=INTERVAL,
                                              basis_dtype="bfloat16"))
    plain, projected = opt.param_groups
    assert projected["basis_dtype"] == "bfloat16" and "basis_dtype" not in plain
    assert all(opt.state[p]["basis"].dtype == torch.bfloat16 for p in projected["params"])
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in projected["params"])
