"""The Llama model and its size registry: shapes, counts, masking, GQA, checkpointing, init."""

import math

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import PAPER_RANK, SIZES, Llama, LlamaConfig, build_model, count_parameters, flops_per_token
from models.llama import Attention, apply_rotary, rotary_cos_sin

NANO_VOCAB = 512  # a small vocabulary keeps the nano models' embeddings cheap


def nano(**overrides) -> Llama:
    torch.manual_seed(0)
    return build_model("nano", vocab_size=NANO_VOCAB, **overrides)


def test_parameter_count_of_every_size():
    for name, cfg in SIZES.items():
        allocate = count_parameters(cfg) <= 60_000_000
        if allocate:
            model = build_model(name)
        else:
            with torch.device("meta"):
                model = build_model(name)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg), name
        assert next(model.parameters()).is_meta != allocate
    assert count_parameters(SIZES["7b"]) == 6_738_415_616  # Llama-2-7B's published count


def test_sizes_match_the_paper_table():
    # docs/architecture.md, "Model sizes": hidden, intermediate, heads, layers, rank, update interval
    table = {
        "60m": (512, 1376, 8, 8, 128, 200), "130m": (768, 2048, 12, 12, 256, 200),
        "350m": (1024, 2736, 16, 24, 256, 200), "1b": (2048, 5461, 32, 24, 512, 200),
        "3b": (2560, 6848, 32, 32, 512, 200), "7b": (4096, 11008, 32, 32, 1024, 500),
    }
    assert set(PAPER_RANK) == set(table)
    for name, (hidden, ffn, heads, layers, rank, interval) in table.items():
        cfg = SIZES[name]
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_layers) == (hidden, ffn, heads, layers)
        assert (cfg.vocab_size, cfg.max_seq_len, cfg.num_kv_heads) == (32000, 256, heads)
        assert PAPER_RANK[name] == (rank, interval)
        assert rank <= min(hidden, ffn)  # every projected matrix can hold the rank


@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_flops_per_token_equals_counted_training_flops(num_kv_heads):
    model = nano(num_kv_heads=num_kv_heads)
    ids = torch.randint(0, NANO_VOCAB, (2, 32))
    # The math backend runs attention as plain matmuls, which the counter sees.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids).sum().backward()
    assert counter.get_total_flops() == flops_per_token(model.cfg, seq_len=32) * ids.numel()


def test_build_model_overrides_copy_and_unknown_size_lists_known_names():
    model = build_model("nano", vocab_size=100, num_heads=8)
    assert model.cfg.vocab_size == 100 and model.cfg.num_kv_heads == 8
    assert SIZES["nano"].vocab_size == 32000 and SIZES["nano"].num_heads == 4  # registry untouched
    assert build_model(LlamaConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                   vocab_size=50)).lm_head.weight.shape == (50, 32)
    with pytest.raises(ValueError, match="known sizes: nano, 9m"):
        build_model("8m")
    with pytest.raises(ValueError, match="hidden_sise"):
        build_model("nano", hidden_sise=10)


def test_forward_shapes_and_dtype():
    model = nano()
    ids = torch.randint(0, NANO_VOCAB, (3, 7))
    assert model(ids).shape == (3, 7, NANO_VOCAB) and model(ids).dtype == torch.float32
    assert model.to(torch.bfloat16)(ids).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\), got torch.int64 of shape \(7,\)"):
        model(ids[0])


def test_changing_a_later_token_does_not_change_earlier_logits():
    model = nano()
    ids = torch.randint(0, NANO_VOCAB, (2, 16))
    changed = ids.clone()
    changed[:, 10] = (ids[:, 10] + 1) % NANO_VOCAB
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().amax() > 1e-3  # and it does change the later ones


def reference_attention(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Explicit causal softmax attention with repeated key/value heads (Hugging Face's repeat_kv)."""
    B, T, _ = x.shape
    H, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, K, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, K, D).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # query head h uses kv head h // (H/K)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_grouped_query_attention_equals_repeated_kv_reference(num_kv_heads):
    model = nano(num_kv_heads=num_kv_heads)
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (num_kv_heads * 16, 64)
    x = torch.randn(2, 9, 64)
    cos, sin = rotary_cos_sin(9, 16, 10000.0)
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-6)
    assert model(torch.randint(0, NANO_VOCAB, (2, 9))).shape == (2, 9, NANO_VOCAB)


def test_grouped_query_model_equals_multi_head_model_with_repeated_kv_weights():
    gqa = nano(num_kv_heads=2)
    mha = nano()
    state = gqa.state_dict()
    for i in range(gqa.cfg.num_layers):
        for proj in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.self_attn.{proj}.weight"]  # (K * D, d) -> (H * D, d)
            state[f"layers.{i}.self_attn.{proj}.weight"] = w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    ids = torch.randint(0, NANO_VOCAB, (2, 12))
    torch.testing.assert_close(gqa(ids), mha(ids), rtol=1e-5, atol=1e-5)


def test_rotary_embedding_is_a_relative_rotation():
    # <R(m) q, R(n) k> depends only on m - n: the defining property of rotary embeddings.
    cos, sin = rotary_cos_sin(20, 16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        return apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])

    torch.testing.assert_close(score(5, 2), score(15, 12), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotary(q, cos[0], sin[0]), q)  # position 0 is the identity


def test_sequence_longer_than_max_seq_len_grows_the_rotary_cache():
    short = nano(max_seq_len=8)
    long = nano(max_seq_len=32)
    long.load_state_dict(short.state_dict())
    ids = torch.randint(0, NANO_VOCAB, (1, 20))
    torch.testing.assert_close(short(ids), long(ids), rtol=0, atol=0)
    assert short.rope_cos.shape == (20, 16)
    with torch.inference_mode():  # a cache grown while evaluating still trains afterwards
        short(torch.randint(0, NANO_VOCAB, (1, 24)))
    short(ids).sum().backward()


def test_activation_checkpointing_gives_same_loss_and_gradients():
    plain = nano()
    ckpt = nano(activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, NANO_VOCAB, (2, 16))
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_init_std_close_to_configured():
    torch.manual_seed(0)
    model = build_model("nano", init_std=0.02)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.02 * 0.03, (name, p.std().item())
            assert abs(p.mean().item()) < 0.002, name


def test_meta_model_materialises_with_init_weights():
    with torch.device("meta"):
        model = build_model("nano", vocab_size=NANO_VOCAB)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.norm.weight.eq(1).all() and model.rope_cos.shape == (256, 16)
    assert torch.isfinite(model(torch.randint(0, NANO_VOCAB, (1, 5)))).all()


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=100, num_heads=3), "hidden_size 100 is not divisible by num_heads 3"),
    (dict(num_heads=4, num_kv_heads=3), "num_heads 4 is not divisible by num_kv_heads 3"),
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(num_layers=-1), "num_layers must be a positive integer, got -1"),
    (dict(vocab_size=3.5), "vocab_size must be a positive integer, got 3.5"),
    (dict(norm_eps=0.0), "norm_eps must be a positive number"),
    (dict(hidden_size=36, num_heads=4), "head dimension .* = 9 is odd"),
])
def test_bad_config_errors_name_the_value(fields, message):
    base = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**base, **fields})


def test_config_dict_round_trip_rejects_unknown_fields():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown LlamaConfig fields \\['dim'\\]"):
        LlamaConfig.from_dict({**cfg.to_dict(), "dim": 3})
