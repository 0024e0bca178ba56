"""Export a training checkpoint as a Hugging Face Llama directory.

    python -m pretrain.export CHECKPOINT_DIR OUT_DIR [--overwrite]

CHECKPOINT_DIR is a checkpoint directory of ours (pretrain/checkpoint.py writes them, and
``python -m models.hf import`` writes the model part of one): ``model_config.json`` and the weights,
either ``model.pt`` or, from a train.parallelism fsdp run, DCP shards in ``dcp/`` (read whole in
this one process, no process group, through pretrain/dcp_state.py's safe reader). OUT_DIR receives
``config.json`` and ``model.safetensors``, written by models/hf.py's conversion, and loads with
``transformers.LlamaForCausalLM.from_pretrained(OUT_DIR)``.

Reading a checkpoint is the trainer's business, so the command lives here; models/ only converts a
state dict and imports nothing of pretrain/. The way back (Hugging Face -> ours) needs no trainer
code and stays ``python -m models.hf import HF_DIR CHECKPOINT_DIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from models.hf import MODEL_CONFIG_FILE, MODEL_FILE, export_state_dict, require_dir, require_file
from models.llama import LlamaConfig
from pretrain.state_io import DCP_DIR
from pretrain.dcp_state import METADATA, load_full


def read_model(checkpoint_dir: str) -> tuple[LlamaConfig, dict[str, torch.Tensor], str]:
    """(model config, model state dict, the path the weights came from) of our checkpoint directory."""
    require_dir(checkpoint_dir, "checkpoint directory")
    config_path = os.path.join(checkpoint_dir, MODEL_CONFIG_FILE)
    model_path = os.path.join(checkpoint_dir, MODEL_FILE)
    require_file(config_path)
    with open(config_path) as f:
        cfg = LlamaConfig.from_dict(json.load(f))
    if not os.path.exists(model_path) and os.path.isfile(os.path.join(checkpoint_dir, DCP_DIR, METADATA)):
        model_path = os.path.join(checkpoint_dir, DCP_DIR)
        state = load_full(model_path, prefix="model.")  # one process, no process group
    else:
        require_file(model_path)
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    return cfg, state, model_path


def export_checkpoint(checkpoint_dir: str, out_dir: str, overwrite: bool = False) -> None:
    """Our checkpoint directory -> ``out_dir/config.json`` + ``out_dir/model.safetensors``."""
    cfg, state, model_path = read_model(checkpoint_dir)
    export_state_dict(state, cfg, out_dir, overwrite=overwrite, source=model_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Export our checkpoint directory (model.pt or dcp/, and model_config.json) as a Hugging Face "
                    "Llama directory (config.json, model.safetensors). The way back: python -m models.hf import.",
        epilog="example: python -m pretrain.export runs/x/checkpoints/step_00001000 hf/llama_60m")
    parser.add_argument("checkpoint_dir", help="directory with model.pt (or dcp/) and model_config.json")
    parser.add_argument("out_dir", help="where config.json and model.safetensors are written")
    parser.add_argument("--overwrite", action="store_true", help="replace files already there")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint_dir, args.out_dir, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"exported {args.checkpoint_dir} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
