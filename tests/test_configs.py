"""Every shipped run recipe in configs/ loads and validates (as litgpt's test_config_hub does)."""
from pathlib import Path

import pytest
import torch

from models.sizes import PAPER_RANK, SIZES, build_model
from optim.factory import param_groups
from pretrain.config import load_config, resolve_model_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
C4 = [p for p in CONFIGS if p.name.startswith("llama_")]  # the names docs/architecture.md uses
# Sequences per forward/backward on one GPU, by size (the recipes' comments give the accumulation).
MICRO_BATCH = {"60m": 128, "130m": 128, "350m": 64, "1b": 8, "3b": 8, "7b": 4}
# SubTrack++ learning rate as shipped: GaLore's 1e-2 for 60m-1b, its 7b recipe's 5e-3 for 3b and 7b.
SUBTRACK_LR = {"60m": 1e-2, "130m": 1e-2, "350m": 1e-2, "1b": 1e-2, "3b": 5e-3, "7b": 5e-3}


def test_the_recipes_are_all_there():
    names = {p.stem for p in CONFIGS}
    assert "tiny_sample" in names
    for size in PAPER_RANK:
        assert {f"llama_{size}_adamw", f"llama_{size}_subtrack"} <= names
    assert "llama_7b_subtrack8bit" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path, world_size=1)
    assert cfg.name == path.stem and str(cfg.run_dir) == f"runs/{path.stem}"
    assert cfg.model.size in SIZES
    assert cfg.train.grad_accum_steps(1) * cfg.train.micro_batch_size == cfg.train.total_batch_size


@pytest.mark.parametrize("path", C4, ids=lambda p: p.stem)
def test_c4_recipe_follows_the_paper_settings(path):
    cfg = load_config(path, world_size=1)
    size, method = path.stem.split("_")[1:]
    assert cfg.model.size == size
    assert cfg.data.source == "allenai/c4" and cfg.data.seq_len == 256
    assert cfg.train.total_batch_size * cfg.data.seq_len == 131072  # 512 sequences, 131k tokens
    assert (cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.grad_clip) == (1000, 10000, 1.0)
    assert cfg.train.dtype == "auto" and cfg.checkpoint.resume == "auto"
    assert cfg.train.micro_batch_size == MICRO_BATCH[size]
    if method.startswith("subtrack"):
        assert cfg.optim.name == "subtrack++" and cfg.optim.lr == SUBTRACK_LR[size]
        assert (cfg.optim.rank, cfg.optim.update_interval) == PAPER_RANK[size]
        assert (cfg.optim.scale, cfg.optim.step_size) == (0.25, "auto")  # a fixed eta is capped; auto is the rule
        # The projected weights accept the rank (checked on a meta-device model: nothing allocated).
        with torch.device("meta"):
            model = build_model(resolve_model_config(cfg, tokenizer_vocab_size=32000))
        groups = param_groups(model, rank=cfg.optim.rank)
        assert [len(g["params"]) for g in groups] == [2 * cfg_layers(cfg) + 3, 7 * cfg_layers(cfg)]
    else:
        assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-3
    if method == "subtrack8bit":  # the 7B memory recipe: 8-bit moments, bf16 weights, checkpointing
        assert cfg.optim.state_bits == 8 and cfg.train.param_dtype == "bfloat16"
        assert cfg.model.overrides["activation_checkpointing"] is True
    else:
        assert cfg.optim.state_bits == 32 and cfg.train.param_dtype == "float32"


def test_the_7b_8bit_recipe_on_one_gpu_with_per_layer_updates_validates_as_its_comment_says():
    path = next(p for p in CONFIGS if p.stem == "llama_7b_subtrack8bit")
    cfg = load_config(path, ["optim.per_layer=true", "train.grad_clip=0", "train.micro_batch_size=16",
                             "train.total_batch_size=16"], world_size=1)
    assert cfg.optim.per_layer and cfg.train.grad_accum_steps(1) == 1


def cfg_layers(cfg) -> int:
    return SIZES[cfg.model.size].num_layers


def test_tiny_sample_runs_offline_on_the_bundled_corpus():
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("tiny_sample")], world_size=1)
    assert cfg.data.source == "sample" and cfg.data.tokenizer == "sample"
    assert cfg.train.dtype == "auto" and cfg.train.device == "auto"


def test_readme_commands_are_the_ci_command_and_the_tiny_sample_job():
    root = Path(__file__).parent.parent
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = [line.strip() for line in (root / "README.md").read_text().splitlines()]
    commands = [line for line in readme if line.startswith("python3 -m venv .venv")]
    assert commands[1] == ci_command  # CI runs exactly what the README tells users to run
    assert commands[0].endswith("-m pretrain --config configs/tiny_sample.yaml")
    assert commands[0].replace(" -q", "").split("&& .venv/bin/python")[0] == ci_command.replace(" -q", "").split(
        "&& .venv/bin/python")[0]  # the same install steps
