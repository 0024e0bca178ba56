"""Conversion between our model state dicts and Hugging Face's Llama format, in one file.

Our checkpoint directory holds ``model.pt`` (the state dict of ``models.llama.Llama``) and
``model_config.json`` (the ``LlamaConfig`` fields). A Hugging Face directory holds
``config.json`` (``LlamaForCausalLM``) and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Parameter names differ only by the ``model.`` prefix
that Hugging Face puts on everything except ``lm_head.weight``; the math is the same
(rotary embeddings in the rotate-half convention), so the conversion is exact.

    python -m pretrain.export CHECKPOINT_DIR OUT_DIR      # ours -> Hugging Face (reads training checkpoints,
                                                          # dcp/ ones too: pretrain/export.py)
    python -m models.hf import HF_DIR CHECKPOINT_DIR      # Hugging Face -> ours

The export command lives in pretrain/ because reading a training checkpoint is the trainer's
business; this module takes a state dict and a LlamaConfig (`export_state_dict`) and imports
nothing of pretrain/ (tests/test_hf.py checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from models.llama import Llama, LlamaConfig

MODEL_FILE = "model.pt"
MODEL_CONFIG_FILE = "model_config.json"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------- names

def to_hf_name(name: str) -> str:
    """``layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``; lm_head stays."""
    return name if name.startswith("lm_head.") else "model." + name


def from_hf_name(name: str) -> str:
    """Inverse of ``to_hf_name``."""
    return name.removeprefix("model.")


# ----------------------------------------------------------------------------- configs

def to_hf_config(cfg: LlamaConfig, torch_dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of a ``LlamaForCausalLM`` with the same shapes and math as ``cfg``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": _DTYPE_NAMES.get(torch_dtype, str(torch_dtype).removeprefix("torch.")),
    }


def from_hf_config(hf: dict) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face ``config.json`` dict; refuses what Llama here cannot do."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(f"config.json has model_type {model_type!r}; only 'llama' can be imported")

    def refuse(reason: str):
        raise ValueError(f"cannot import this Llama: {reason}; our model (models/llama.py) "
                         "has no such feature, so the imported weights would compute something else")

    if hf.get("rope_scaling"):
        refuse(f"rope_scaling = {hf['rope_scaling']!r} (only plain rotary embeddings are supported)")
    rope_parameters = hf.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", "default") != "default":
        refuse(f"rope_parameters = {rope_parameters!r} (only rope_type 'default' is supported)")
    if hf.get("attention_bias", False):
        refuse("attention_bias = true (our projections have no biases)")
    if hf.get("mlp_bias", False):
        refuse("mlp_bias = true (our projections have no biases)")
    if hf.get("tie_word_embeddings", False):
        refuse("tie_word_embeddings = true (our embed_tokens and lm_head are separate weights)")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act = {hf['hidden_act']!r} (our MLP is SwiGLU with silu)")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * num_heads != hf["hidden_size"]:
        refuse(f"head_dim = {head_dim} differs from hidden_size / num_attention_heads = "
               f"{hf['hidden_size']} / {num_heads}")

    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        # transformers >= 5 writes rope_theta inside rope_parameters, older versions at top level.
        rope_theta=float(rope_parameters.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


# ----------------------------------------------------------------------------- state dicts

def _check_state_dict(cfg: LlamaConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Names and shapes of ``state`` must be exactly those of ``Llama(cfg)``."""
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in Llama(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: parameter names do not match the model config; "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, "
                             f"the model config implies {shape}")


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist or is not a directory")


def require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path!r}")


def _refuse_overwrite(paths: list[str], overwrite: bool) -> None:
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} already exist; choose an empty directory or pass overwrite "
                              "(--overwrite on the command line)")


def export_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig, out_dir: str, overwrite: bool = False,
                      source: str = "the state dict") -> None:
    """A model state dict of ``Llama(cfg)`` -> ``out_dir/config.json`` + ``out_dir/model.safetensors``.

    The result loads with ``transformers.LlamaForCausalLM.from_pretrained(out_dir)``. ``source`` names
    where ``state`` came from in the errors (a wrong name or shape, mixed dtypes).
    """
    _check_state_dict(cfg, state, source)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{source} mixes dtypes {sorted(map(str, dtypes))}; cast the model to one dtype")

    os.makedirs(out_dir, exist_ok=True)
    out_config = os.path.join(out_dir, HF_CONFIG_FILE)
    out_weights = os.path.join(out_dir, HF_WEIGHTS_FILE)
    _refuse_overwrite([out_config, out_weights], overwrite)
    # safetensors refuses shared or non-contiguous storage: give it one contiguous copy each.
    tensors = {to_hf_name(name): t.detach().contiguous().clone() for name, t in state.items()}
    save_file(tensors, out_weights, metadata={"format": "pt"})
    with open(out_config, "w") as f:
        json.dump(to_hf_config(cfg, dtypes.pop()), f, indent=2)


def _load_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory, single-file or sharded, by their HF names."""
    index_path = os.path.join(hf_dir, HF_INDEX_FILE)
    single_path = os.path.join(hf_dir, HF_WEIGHTS_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single_path):
        shards = [HF_WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{hf_dir!r} has neither {HF_WEIGHTS_FILE} nor {HF_INDEX_FILE}; "
                                "only safetensors checkpoints can be imported (save_pretrained "
                                "writes them by default)")
    tensors = {}
    for shard in shards:
        path = os.path.join(hf_dir, shard)
        require_file(path)
        tensors.update(load_file(path, device="cpu"))
    return tensors


def import_hf(hf_dir: str, checkpoint_dir: str, overwrite: bool = False) -> LlamaConfig:
    """A Hugging Face Llama directory -> ``checkpoint_dir/model.pt`` + ``model_config.json``.

    Returns the LlamaConfig written. Weights keep their dtype.
    """
    require_dir(hf_dir, "Hugging Face directory")
    config_path = os.path.join(hf_dir, HF_CONFIG_FILE)
    require_file(config_path)
    with open(config_path) as f:
        cfg = from_hf_config(json.load(f))
    tensors = _load_hf_weights(hf_dir)
    # Old exports also store the rotary inverse frequencies, which we recompute from the config.
    state = {from_hf_name(name): t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    _check_state_dict(cfg, state, hf_dir)

    os.makedirs(checkpoint_dir, exist_ok=True)
    out_model = os.path.join(checkpoint_dir, MODEL_FILE)
    out_config = os.path.join(checkpoint_dir, MODEL_CONFIG_FILE)
    _refuse_overwrite([out_model, out_config], overwrite)
    torch.save(state, out_model)
    with open(out_config, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    return cfg


# ----------------------------------------------------------------------------- command line

EXPORT_MOVED = ("python -m models.hf export moved to python -m pretrain.export (same arguments: CHECKPOINT_DIR "
                "OUT_DIR [--overwrite])")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # reading a training checkpoint is pretrain's; models/ imports nothing of it
        print(EXPORT_MOVED, file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m models.hf",
        description="Convert a Hugging Face Llama directory into our checkpoint directory "
                    "(the other way: python -m pretrain.export).",
        epilog="example: python -m models.hf import hf/llama_60m runs/imported")
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="Hugging Face directory -> our checkpoint directory")
    imp.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    imp.add_argument("checkpoint_dir", help="where model.pt and model_config.json are written")
    imp.add_argument("--overwrite", action="store_true", help="replace files already there")
    args = parser.parse_args(argv)

    try:
        import_hf(args.hf_dir, args.checkpoint_dir, overwrite=args.overwrite)
        print(f"imported {args.hf_dir} -> {args.checkpoint_dir}")
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
