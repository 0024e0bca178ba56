"""Run config: YAML + overrides into validated dataclasses; bad configs fail before any work."""
import dataclasses
import math

import pytest
import yaml

from pretrain.config import ConfigError, apply_override, config_to_yaml, load_config, resolve_model_config
from pretrain.schedule import build_scheduler, lr_multiplier


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
model:
  size: nano
train:
  micro_batch_size: 2
  total_batch_size: 8
  max_steps: 20
  warmup_steps: 2
"""


def test_yaml_and_overrides_build_typed_sections(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=1e-2", "train.grad_clip=0", "model.num_layers=3",
                                              "optim.betas=[0.8, 0.95]", "checkpoint.resume=null"], world_size=1)
    assert cfg.name == "exp" and str(cfg.run_dir) == "runs/exp"
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-2 as a string
    assert cfg.train.grad_clip == 0.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.model.size == "nano" and cfg.model.overrides == {"num_layers": 3}
    assert cfg.train.grad_accum_steps(world_size=1) == 4
    assert cfg.checkpoint.resume is None


def test_model_defaults_vocab_rounded_to_64_and_context_from_data(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["data.seq_len=48"], world_size=1)
    model = resolve_model_config(cfg, tokenizer_vocab_size=4001)
    assert model.vocab_size == 4032 and model.max_seq_len == 48 and model.num_layers == 2
    cfg = load_config(write(tmp_path, BASE), ["model.vocab_size=5000"], world_size=1)
    assert resolve_model_config(cfg, tokenizer_vocab_size=4001).vocab_size == 5000


@pytest.mark.parametrize("override, words", [
    ("train.micro_batchsize=4", ["micro_batchsize", "'train'", "micro_batch_size"]),
    ("optim.lrr=1e-3", ["lrr", "'optim'", "lr"]),
    ("data.nonsense=1", ["nonsense", "'data'"]),
    ("model.hidden=64", ["hidden", "'model'", "hidden_size"]),
    ("trian.max_steps=5", ["trian", "train"]),
])
def test_unknown_key_names_section_and_valid_keys(tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [override], world_size=1)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("train.max_steps=ten", ["train.max_steps", "int", "ten"]),
    ("train.max_steps=2.5", ["train.max_steps", "int"]),
    ("log.tensorboard=maybe", ["log.tensorboard", "bool"]),
    ("train.dtype=float16", ["train.dtype", "float16"]),
    ("optim.lr=fast", ["optim.lr", "fast"]),
    ("optim.betas=[0.9]", ["optim.betas", "2"]),
    ("train.seed=true", ["train.seed", "int"]),
])
def test_wrong_type_is_a_clear_error(tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [override], world_size=1)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("overrides, world_size, words", [
    (["train.total_batch_size=7"], 1, ["total_batch_size = 7", "divisible", "2"]),
    (["train.total_batch_size=8"], 3, ["world_size", "6"]),
    (["train.warmup_steps=30"], 1, ["warmup_steps = 30", "max_steps = 20"]),
    (["train.micro_batch_size=0"], 1, ["micro_batch_size = 0"]),
    (["train.min_lr_ratio=1.5"], 1, ["min_lr_ratio"]),
    (["optim.lr=-1"], 1, ["optim.lr"]),
    (["optim.name=sgd"], 1, ["sgd"]),
    (["model.size=huge"], 1, ["huge", "60m"]),
    (["model.num_heads=3"], 1, ["num_heads 3"]),
    (["data.seq_len=64", "model.max_seq_len=32"], 1, ["max_seq_len = 32", "seq_len = 64"]),
    (["checkpoint.resume=/no/such/checkpoint"], 1, ["/no/such/checkpoint"]),
    (["checkpoint.keep_last=0"], 1, ["keep_last"]),
    (["train.deepspeed=no/such/ds.json"], 1, ["no/such/ds.json", "configs/deepspeed/zero0.json"]),
    (["train.replica_check_every=-1"], 1, ["replica_check_every = -1"]),
    (["train.param_dtype=float16"], 1, ["train.param_dtype", "float16"]),
])
def test_impossible_values_fail_before_any_work(tmp_path, overrides, world_size, words):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), overrides, world_size=world_size)
    for word in words:
        assert word in str(e.value)


def test_batch_divisibility_uses_world_size_from_launcher_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert load_config(write(tmp_path, BASE)).train.grad_accum_steps(4) == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, BASE))


@pytest.mark.parametrize("item", ["train.max_steps", "=5", "train.max_steps=[1,"])
def test_malformed_override_is_rejected(item):
    with pytest.raises(ConfigError):
        apply_override({}, item)


def test_override_values_are_parsed_as_yaml():
    raw = {}
    for item in ["a.int=3", "a.float=0.5", "a.str=hello", "a.null=null", "a.list=[1, 2]", "a.bool=false",
                 "b.c.d=x=y"]:
        apply_override(raw, item)
    assert raw == {"a": {"int": 3, "float": 0.5, "str": "hello", "null": None, "list": [1, 2], "bool": False},
                   "b": {"c": {"d": "x=y"}}}


def test_on_off_read_by_yaml_as_booleans_are_accepted_for_progress_bar(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "log:\n  progress_bar: on\n"))
    assert cfg.log.progress_bar == "on"
    assert load_config(write(tmp_path, BASE), ["log.progress_bar=off"]).log.progress_bar == "off"
    assert load_config(write(tmp_path, BASE), ["log.progress_bar=auto"]).log.progress_bar == "auto"
    with pytest.raises(ConfigError, match=r"log.progress_bar: 'maybe' is not one of \['auto', 'on', 'off'\]"):
        load_config(write(tmp_path, BASE), ["log.progress_bar=maybe"])
    with pytest.raises(ConfigError, match="train.dtype: False is not one of"):  # no on/off there: still an error
        load_config(write(tmp_path, BASE), ["train.dtype=off"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_is_a_config_error_naming_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: invalid YAML at line 3, column 2: .*; fix the YAML syntax"):
        load_config(write(tmp_path, "model:\n  size: nano\n train: [\n"))


def test_resolved_config_yaml_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=3e-3", "model.num_layers=3"], world_size=1)
    again = load_config(write(tmp_path, config_to_yaml(cfg), "again.yaml"), world_size=1)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert yaml.safe_load(config_to_yaml(cfg))["optim"]["betas"] == [0.9, 0.999]


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("step, expected", [
    (0, 0.1), (4, 0.5), (9, 1.0),  # linear warmup over 10 steps, peak on the last warmup step
    (10, 1.0),  # cosine starts at the peak
    (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    (60, 0.55),  # half-way: the mean of peak and floor
    (110, 0.1), (500, 0.1),  # the floor, held after max_steps
])
def test_schedule_is_linear_warmup_then_cosine_to_min_ratio(step, expected):
    assert lr_multiplier(step, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) == pytest.approx(expected, abs=1e-12)


def test_scheduler_drives_optimizer_lr_and_state_dict_is_plain_numbers():
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=4, max_steps=20, min_lr_ratio=0.0)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert seen == pytest.approx([2.0 * lr_multiplier(s, 4, 20, 0.0) for s in range(20)])
    state = sched.state_dict()
    sched2 = build_scheduler(opt, warmup_steps=4, max_steps=20, min_lr_ratio=0.0)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 20
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_deepspeed_flag_sets_train_deepspeed(tmp_path, monkeypatch):
    from pretrain import __main__ as cli

    seen = {}

    def fake_train(cfg, restart=False):  # records the config the CLI built instead of training
        seen["cfg"] = cfg
        return {"stopped_by": None}

    monkeypatch.setattr("pretrain.train.train", fake_train)
    cli.main(["--config", str(write(tmp_path, BASE)), "--deepspeed", "configs/deepspeed/zero0.json"])
    assert seen["cfg"].train.deepspeed == "configs/deepspeed/zero0.json"


# ----------------------------------------------------------------------------- rank and update interval

@pytest.mark.parametrize("size, method, expected", [("60m", "adamw", (128, 200)), ("60m", "subtrack++", (128, 200)),
                                                    ("7b", "subtrack++", (1024, 500)), ("7b", "galore", (1024, 500))])
def test_unset_rank_and_interval_take_the_paper_value_for_the_size(tmp_path, size, method, expected):
    cfg = load_config(write(tmp_path, BASE), [f"model.size={size}", f"optim.name={method}"], world_size=1)
    assert (cfg.optim.rank, cfg.optim.update_interval) == expected
    cfg = load_config(write(tmp_path, BASE), [f"model.size={size}", f"optim.name={method}", "optim.rank=null",
                                              "optim.update_interval=null"], world_size=1)  # null means unset too
    assert (cfg.optim.rank, cfg.optim.update_interval) == expected


def test_explicit_rank_and_interval_win_over_the_paper_value(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["model.size=7b", "optim.name=subtrack++", "optim.rank=64"], world_size=1)
    assert (cfg.optim.rank, cfg.optim.update_interval) == (64, 500)  # the unset one still takes the table's
    cfg = load_config(write(tmp_path, BASE), ["model.size=60m", "optim.name=subtrack++", "optim.update_interval=7"],
                      world_size=1)
    assert (cfg.optim.rank, cfg.optim.update_interval) == (128, 7)


@pytest.mark.parametrize("size", ["nano", "9m", "35m"])
@pytest.mark.parametrize("missing", ["rank", "update_interval"])
def test_size_without_paper_value_and_a_projected_preset_must_set_rank_and_interval(tmp_path, size, missing):
    given = {"rank": "optim.rank=16", "update_interval": "optim.update_interval=50"}
    given.pop(missing)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [f"model.size={size}", "optim.name=subtrack++", *given.values()],
                    world_size=1)
    assert f"optim.{missing} is not set" in str(e.value) and repr(size) in str(e.value)
    assert f"set optim.{missing} (e.g." in str(e.value)
    load_config(write(tmp_path, BASE), [f"model.size={size}", "optim.name=adamw"], world_size=1)  # adamw needs neither


@pytest.mark.parametrize("overrides, value, limit", [
    (["model.size=nano", "optim.rank=65"], 65, "hidden_size = 64"),
    (["model.size=60m"] + [f"model.{k}={v}" for k, v in (("num_heads", 8), ("num_kv_heads", 1))] + ["optim.rank=128"],
     128, "num_kv_heads x head_dim = 64"),  # grouped-query k/v: (64, 512)
    (["model.size=nano", "model.intermediate_size=32", "optim.rank=48"], 48, "intermediate_size = 32"),
])
def test_rank_larger_than_the_model_is_refused_at_config_time(tmp_path, overrides, value, limit):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [*overrides, "optim.name=subtrack++", "optim.update_interval=10"],
                    world_size=1)
    assert f"optim.rank = {value}" in str(e.value) and limit in str(e.value)
    assert "set optim.rank <=" in str(e.value)


@pytest.mark.parametrize("name", ["subtrack-adafactor", "subtrack-muon", "apollo"])
def test_presets_that_need_only_a_rank_are_refused_at_config_time_as_the_factory_refuses(tmp_path, name):
    from torch import nn

    from optim.factory import OptimConfig, build_optimizer

    with pytest.raises(ConfigError, match=rf"optim.rank is not set and model.size 'nano' .*optim.name '{name}'"):
        load_config(write(tmp_path, BASE), ["model.size=nano", f"optim.name={name}"], world_size=1)
    with pytest.raises(ValueError, match=rf"optim.rank is not set .*optim.name '{name}'"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(name=name))
    cfg = load_config(write(tmp_path, BASE), ["model.size=nano", f"optim.name={name}", "optim.rank=8"], world_size=1)
    assert cfg.optim.update_interval is None  # not needed: the optimizer's default (200)
    load_config(write(tmp_path, BASE), ["model.size=nano", "optim.name=apollo-mini"], world_size=1)  # its own rank 1


def test_activation_checkpointing_reaches_the_built_model_and_recomputes_blocks(tmp_path, monkeypatch):
    import torch

    import models.llama
    from models.sizes import build_model

    cfg = load_config(write(tmp_path, BASE), ["model.activation_checkpointing=true"], world_size=1)
    model = build_model(resolve_model_config(cfg, tokenizer_vocab_size=64))
    assert model.cfg.activation_checkpointing is True
    calls, real = [], models.llama.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(models.llama, "checkpoint", counting_checkpoint)
    model.train()
    model(torch.randint(0, 64, (1, 8))).sum().backward()
    assert calls == list(model.layers)  # every block ran under torch.utils.checkpoint
    off = load_config(write(tmp_path, BASE), world_size=1)
    assert build_model(resolve_model_config(off, tokenizer_vocab_size=64)).cfg.activation_checkpointing is False
