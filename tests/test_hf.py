"""Hugging Face conversion: exported models compute the same logits in transformers, and come back intact."""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from models import build_model, get_config
from models.hf import EXPORT_MOVED, from_hf_config, import_hf, to_hf_config
from models.hf import main as hf_main
from pretrain.export import export_checkpoint
from pretrain.export import main as export_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512


def save_checkpoint(model, directory):
    """What pretrain/checkpoint.py writes for the model: model.pt + model_config.json."""
    os.makedirs(directory, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f)


def random_nano(**overrides):
    torch.manual_seed(0)
    model = build_model("nano", vocab_size=VOCAB, rope_theta=500.0, norm_eps=1e-5, **overrides)
    with torch.no_grad():  # random norm weights, so a swapped or missing norm cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def load_transformers(out_dir):
    return transformers.LlamaForCausalLM.from_pretrained(out_dir, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_hf_export_matches_transformers_logits(tmp_path, num_kv_heads):
    model = random_nano(num_kv_heads=num_kv_heads)
    save_checkpoint(model, tmp_path / "ckpt")
    export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"))

    hf = load_transformers(tmp_path / "hf")
    assert hf.config.num_key_value_heads == model.cfg.num_kv_heads
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)

    import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back = torch.load(tmp_path / "back" / "model.pt", weights_only=True)
    original = model.state_dict()
    assert back.keys() == original.keys()
    for name in original:
        assert torch.equal(back[name], original[name]), name
    with open(tmp_path / "back" / "model_config.json") as f:
        assert json.load(f) == model.cfg.to_dict()


def test_import_of_a_sharded_transformers_save(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, rope_theta=1000.0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()

    cfg = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.max_seq_len) == (1, 1000.0, 64)
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True))
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_hf_cli_round_trip(tmp_path):
    model = random_nano(num_kv_heads=1)
    save_checkpoint(model, tmp_path / "ckpt")
    # One real process proves `python -m pretrain.export` works; the way back runs models.hf's main() in-process.
    done = subprocess.run([sys.executable, "-m", "pretrain.export", str(tmp_path / "ckpt"), str(tmp_path / "hf")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert hf_main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = torch.load(tmp_path / "back" / "model.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_export_cli_errors_name_the_missing_path_and_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path / "nowhere"), str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert "nowhere' does not exist" in capsys.readouterr().err

    save_checkpoint(random_nano(), tmp_path / "ckpt")
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert "--overwrite" in capsys.readouterr().err
    assert export_main(["--overwrite", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0


def test_models_hf_export_points_to_pretrain_export_in_one_line(tmp_path, capsys):
    save_checkpoint(random_nano(), tmp_path / "ckpt")
    assert hf_main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    captured = capsys.readouterr()
    assert captured.err == EXPORT_MOVED + "\n" and "python -m pretrain.export" in captured.err
    assert captured.out == "" and not (tmp_path / "hf").exists()  # nothing exported


MODELS = os.path.join(ROOT, "models")


def test_no_module_under_models_imports_pretrain():
    """The model zoo never reaches up into the trainer: no import of pretrain (or anything under it)
    anywhere in models/, at module level or inside a function."""
    offenders = []
    for name in sorted(os.listdir(MODELS)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(MODELS, name)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else []
            else:
                continue
            offenders += [f"{name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] == "pretrain"]
    assert not offenders, offenders
    # and at run time: the zoo and its command line (the export pointer too) load nothing of pretrain
    probe = ("import sys, models, models.hf, models.llama, models.sizes\n"
             "assert models.hf.main(['export', 'a', 'b']) == 2\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pretrain'))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stdout + done.stderr


def test_hf_config_round_trip_and_fields():
    model_cfg = get_config("nano", num_kv_heads=2)
    hf = to_hf_config(model_cfg)
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["tie_word_embeddings"]) == (4, 2, False)
    assert from_hf_config(hf) == model_cfg


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"attention_bias": True}, "attention_bias = true"),
    ({"mlp_bias": True}, "mlp_bias = true"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings = true"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"head_dim": 32}, "head_dim = 32"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
])
def test_import_refuses_configs_it_cannot_represent(change, message):
    hf = {**to_hf_config(get_config("nano")), **change}
    with pytest.raises(ValueError, match=message):
        from_hf_config(hf)


def test_export_refuses_mismatched_state_dict(tmp_path):
    model = random_nano()
    save_checkpoint(model, tmp_path / "ckpt")
    state = model.state_dict()
    state["layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "ckpt" / "model.pt")
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj.weight has shape \(3, 3\)"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
