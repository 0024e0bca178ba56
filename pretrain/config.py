"""Run configuration: one YAML file plus `--set section.key=value` overrides.

A run config has six sections:

    model:       size (a name in models.SIZES) plus overrides of any models.LlamaConfig field
    data:        data.loader.DataConfig
    optim:       optim.factory.OptimConfig
    train:       TrainConfig (batch, steps, schedule, precision, evaluation)
    log:         LogConfig (run directory, TensorBoard, progress bar)
    checkpoint:  CheckpointConfig (how often, how many kept, resume)

`load_config` builds the dataclasses generically from their fields and type hints, so a field
another package adds to DataConfig or OptimConfig is accepted with no change here. Unknown
keys, wrong types and impossible values are errors raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from data.loader import DataConfig  # neither data/ nor optim/ imports pretrain/: no cycle
from optim.factory import OptimConfig
from pretrain.typed_yaml import ConfigError, apply_override, build_dataclass, coerce, read_mapping, to_plain


@dataclass
class ModelSection:
    """`size` names a registry entry; `overrides` replace any of its LlamaConfig fields.

    In YAML both sit flat in the `model:` section (`size: 60m`, `max_seq_len: 256`).
    Without an override, `vocab_size` becomes the tokenizer's vocabulary rounded up to a
    multiple of 64 and `max_seq_len` becomes `data.seq_len`.
    """

    size: str = "nano"
    overrides: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    seed: int = 0
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    total_batch_size: int = 8  # sequences per optimizer step over all ranks and accumulation steps
    max_steps: int = 100  # optimizer steps; the schedule ends here
    steps_per_run: int | None = None  # stop (with a checkpoint) after this many steps in one process
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    eval_every: int = 50  # also evaluated at step 0 and at the end
    eval_batches: int = 4  # fixed validation batches of micro_batch_size sequences per rank
    device: str = "auto"  # auto | cpu | cuda
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # weights (and gradients) in memory; optimizer
    # state stays float32 (SubTrack++ keeps its bases float32). bfloat16 = pure-bf16 training as GaLore's 7B run
    # How a step is distributed: auto (single with one process, zero with more) or a mode of
    # pretrain/strategies/ (single, replicate, zero, deepspeed, fsdp), which checks the name
    parallelism: str = "auto"
    sharded_optimizer: bool | None = None  # old spelling, still read: true = parallelism zero, false = replicate
    deepspeed: str | None = None  # a DeepSpeed JSON (ZeRO stage 0, configs/deepspeed/): parallelism deepspeed
    replica_check_every: int = 0  # every N steps all ranks compare weight checksums (0: never); a debug aid
    # Seconds a collective may wait for a peer before it fails (the process group's timeout): a rank stuck on
    # a dead or hung peer ends the job in bounded time. Generous, since a checkpoint save or an evaluation on
    # one rank may hold the others at the next collective for minutes.
    collective_timeout_s: float = 1800.0
    # Divergence guard (pretrain/guard.py): a step whose loss or gradient norm is not finite moves nothing and
    # is counted; this many in a row stop the run, naming the last good checkpoint
    max_skipped_steps: int = 5
    loss_spike_factor: float | None = None  # k: a loss above k x the median of the recent losses is skipped too

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step: total / (micro * world)."""
        return self.total_batch_size // (self.micro_batch_size * world_size)


@dataclass
class LogConfig:
    run_dir: str | None = None  # default runs/<config name>
    log_every: int = 10  # steps between log lines / progress updates
    tensorboard: bool = True
    progress_bar: Literal["auto", "on", "off"] = "auto"  # auto: a tqdm bar when stderr is a terminal


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 3
    resume: str | None = None  # null | auto (latest complete checkpoint of run_dir, if any) | a checkpoint path
    # Resuming with another number of ranks: weights, optimizer and schedule load exactly; the data
    # position cannot (each rank reads its own lines), so it is refused unless this is true, and then
    # remapped as data.loader.remap_train_state says (a few lines skipped, nothing read twice).
    allow_world_size_change: bool = False


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.log.run_dir or os.path.join("runs", self.name))


def section_classes() -> dict[str, type]:
    """The dataclass of each section (data and optim come from their packages)."""
    return {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "log": LogConfig,
            "checkpoint": CheckpointConfig}


# ----------------------------------------------------------------------------- loading

def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> RunConfig:
    """Read `path` (YAML), apply `overrides` ("section.key=value", value parsed as YAML), validate.

    world_size: used to check that the global batch divides evenly (default: from the launcher's
    environment, 1 when not launched distributed).
    optim.rank / optim.update_interval left unset take the paper's values for model.size
    (fill_paper_rank).
    """
    raw = read_mapping(path) if path is not None else {}
    raw.setdefault("name", Path(path).stem if path is not None else "run")
    for item in overrides or []:
        apply_override(raw, item)
    if world_size is None:
        from pretrain.distributed import env_world_size

        world_size = env_world_size()
    fill_paper_rank(raw)
    cfg = build_config(raw)
    validate(cfg, world_size)
    return cfg


def check_paths(cfg: RunConfig) -> None:
    """The files a run reads and the directory it writes, checked before any work (the CLI calls this
    after load_config; a missing file would otherwise surface as a traceback from deep in setup)."""
    from data.c4 import is_local, local_files

    tokenizer = cfg.data.tokenizer
    if tokenizer != "sample" and not os.path.isfile(tokenizer):
        raise ConfigError(f"data.tokenizer = {tokenizer!r} is not a file; pass a SentencePiece .model file "
                          "(train one with `python -m data.tokenizer train`) or 'sample'")
    if tokenizer != "sample":  # a garbage file or too many pieces, now rather than after the ranks started
        from data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)  # UserError naming the file
        tok.check_fits(resolve_model_config(cfg, tok.vocab_size).vocab_size)
    if cfg.data.source != "sample" and is_local(cfg.data.source):
        for split in ("train", "validation"):
            try:
                local_files(cfg.data.source, split)
            except FileNotFoundError as e:
                raise ConfigError(f"data.source: {e}") from None
    run_dir = cfg.run_dir
    existing = run_dir.absolute()
    while not existing.exists():  # the run directory is created later; its nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"log.run_dir = {str(run_dir)!r} cannot be created: {str(existing)!r} is a file; "
                          "set log.run_dir to a directory you can write")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"log.run_dir = {str(run_dir)!r} cannot be written: {str(existing)!r} is not "
                          "writable; set log.run_dir to a directory you can write")


def fill_paper_rank(raw: dict) -> None:
    """optim.rank and optim.update_interval, when absent or null, become the paper's values for
    model.size (models.sizes.PAPER_RANK: 60m (128, 200) ... 7b (1024, 500)), in place.

    A size outside the table (nano, 9m, 20m, 35m) has no paper value: a projected preset must then
    set both keys (ConfigError); adamw does not use them and keeps the OptimConfig default.
    Works on the raw mapping so an explicit value is told apart from a dataclass default.
    """
    from models.sizes import PAPER_RANK
    from optim.factory import PRESETS, needed_keys, require_rank

    model, optim = raw.get("model") or {}, raw.setdefault("optim", {})
    if optim is None:
        optim = raw["optim"] = {}
    if not isinstance(model, dict) or not isinstance(optim, dict):
        return  # build_config names the malformed section
    size, name = model.get("size", ModelSection.size), optim.get("name", OptimConfig.name)
    if name not in PRESETS:
        return  # OptimConfig names the unknown preset
    for index, key in enumerate(("rank", "update_interval")):
        if optim.get(key) is not None:
            continue  # an explicit value wins
        if size in PAPER_RANK:
            optim[key] = PAPER_RANK[size][index]
        elif key not in needed_keys(name):
            optim.pop(key, None)  # the preset does not need it: the OptimConfig default
    try:
        require_rank(name, optim.get("rank"), optim.get("update_interval"),
                     f"model.size {size!r} has no paper value (the paper table covers {', '.join(PAPER_RANK)})")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_config(raw: dict) -> RunConfig:
    """Turn the parsed YAML mapping into a RunConfig, checking keys and types (not cross-field values)."""
    classes = section_classes()
    known = ["name", "model", *classes]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys: {', '.join(known)}")
    name = raw.get("name", "run")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name: expected a non-empty string, got {name!r}")
    sections = {}
    for section, cls in classes.items():
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys, got {value!r}")
        sections[section] = build_dataclass(cls, value, section)
    return RunConfig(name=name, model=build_model_section(raw.get("model") or {}), **sections)


def build_model_section(raw: dict) -> ModelSection:
    from models.llama import LlamaConfig
    from models.sizes import SIZES

    if not isinstance(raw, dict):
        raise ConfigError(f"section 'model' must be a mapping of keys, got {raw!r}")
    raw = dict(raw)
    size = raw.pop("size", ModelSection.size)
    if size not in SIZES:
        raise ConfigError(f"model.size {size!r} is unknown; choose one of {', '.join(SIZES)}")
    hints = typing.get_type_hints(LlamaConfig)
    valid = [f.name for f in dataclasses.fields(LlamaConfig)]
    overrides = {}
    for key, value in raw.items():
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} in section 'model'; valid keys: size, {', '.join(valid)}")
        overrides[key] = coerce(value, hints[key], f"model.{key}")
    return ModelSection(size=size, overrides=overrides)


# ----------------------------------------------------------------------------- cross-field checks

def validate(cfg: RunConfig, world_size: int = 1) -> None:
    """Raise ConfigError for values that cannot run (each message names the value and the fix)."""
    t, lg, ck = cfg.train, cfg.log, cfg.checkpoint
    positive = {"train.micro_batch_size": t.micro_batch_size, "train.total_batch_size": t.total_batch_size,
                "train.max_steps": t.max_steps, "log.log_every": lg.log_every, "checkpoint.keep_last": ck.keep_last}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} = {value} must be >= 1")
    per_step = t.micro_batch_size * world_size
    if t.total_batch_size % per_step:
        # the README's fix keeps the recipe's global batch: a smaller micro batch, more accumulation
        micro = [m for m in range(t.micro_batch_size - 1, 0, -1) if t.total_batch_size % (m * world_size) == 0]
        lower = f"lower train.micro_batch_size to {micro[0]} (--set train.micro_batch_size={micro[0]}), or " if micro else ""
        raise ConfigError(
            f"train.total_batch_size = {t.total_batch_size} is not divisible by micro_batch_size x world_size = "
            f"{t.micro_batch_size} x {world_size} = {per_step}; {lower}choose a total that is a multiple of {per_step}")
    if not 0 <= t.warmup_steps <= t.max_steps:
        raise ConfigError(f"train.warmup_steps = {t.warmup_steps} must be in [0, max_steps = {t.max_steps}]")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio = {t.min_lr_ratio} must be in [0, 1]")
    if not (t.grad_clip >= 0 and math.isfinite(t.grad_clip)):
        raise ConfigError(f"train.grad_clip = {t.grad_clip} must be >= 0 (0 disables clipping)")
    if t.steps_per_run is not None and t.steps_per_run < 1:
        raise ConfigError(f"train.steps_per_run = {t.steps_per_run} must be >= 1 or null")
    if t.eval_every < 0 or t.eval_batches < 0:
        raise ConfigError(f"train.eval_every = {t.eval_every} and train.eval_batches = {t.eval_batches} must be >= 0 "
                          "(eval_every 0: only at step 0 and at the end)")
    if t.device not in ("auto", "cpu") and not t.device.startswith("cuda"):
        raise ConfigError(f"train.device = {t.device!r} must be auto, cpu or cuda[:N]")
    if not (t.collective_timeout_s > 0 and math.isfinite(t.collective_timeout_s)):
        raise ConfigError(f"train.collective_timeout_s = {t.collective_timeout_s} must be a positive number of seconds "
                          "(default 1800)")
    if t.max_skipped_steps < 1:
        raise ConfigError(f"train.max_skipped_steps = {t.max_skipped_steps} must be >= 1 (skipped steps in a row "
                          "that stop the run)")
    if t.loss_spike_factor is not None and not (t.loss_spike_factor > 1 and math.isfinite(t.loss_spike_factor)):
        raise ConfigError(f"train.loss_spike_factor = {t.loss_spike_factor} must be a number > 1 (e.g. 3), or null "
                          "to turn the loss-spike rule off")
    if t.replica_check_every < 0:
        raise ConfigError(f"train.replica_check_every = {t.replica_check_every} must be >= 0 (0: never)")
    from pretrain import strategies

    strategies.validate(cfg, world_size)  # the mode's own refusals (pretrain/strategies/)
    if ck.every < 0:
        raise ConfigError(f"checkpoint.every = {ck.every} must be >= 0 (0: only at the end)")
    if ck.resume not in (None, "auto") and not Path(ck.resume).is_dir():
        raise ConfigError(f"checkpoint.resume = {ck.resume!r} is neither 'auto' nor an existing checkpoint directory")
    seq_len = cfg.data.seq_len
    max_seq_len = cfg.model.overrides.get("max_seq_len")
    if seq_len is not None and max_seq_len is not None and max_seq_len < seq_len:
        raise ConfigError(f"model.max_seq_len = {max_seq_len} is shorter than data.seq_len = {seq_len}; "
                          "raise model.max_seq_len or drop it (it defaults to data.seq_len)")
    try:  # the model's own checks (heads divide hidden size, ...), with a stand-in vocabulary
        model = resolve_model_config(cfg, tokenizer_vocab_size=64)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    check_rank_fits(cfg, model)


def check_rank_fits(cfg: RunConfig, model) -> None:
    """A preset that needs optim.rank has it set, at most min(m, n) of every projected weight:
    q, o (hidden, hidden), k, v (kv_heads * head_dim, hidden), gate, up, down (intermediate, hidden)."""
    from optim.factory import needed_keys, require_rank
    from optim.options import rank_fits

    name = cfg.optim.name
    try:
        require_rank(name, cfg.optim.rank, cfg.optim.update_interval)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if "rank" not in needed_keys(name):
        return  # adamw and the other full-rank presets project nothing
    # every projected weight's shorter side is one of these (models/llama.py's q, k, v, o, gate, up, down)
    limits = {"hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
              "num_kv_heads x head_dim": model.num_kv_heads * model.head_dim}
    if not rank_fits(cfg.optim.rank, tuple(limits.values())):
        bound, limit = min((v, k) for k, v in limits.items())
        raise ConfigError(f"optim.rank = {cfg.optim.rank} exceeds the smallest side of the projected weights, "
                          f"{limit} = {bound} (model.size {cfg.model.size!r}); set optim.rank <= {bound} "
                          f"(e.g. {max(1, model.hidden_size // 4)}, a quarter of hidden_size)")


# ----------------------------------------------------------------------------- model and serialisation

def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def resolve_model_config(cfg: RunConfig, tokenizer_vocab_size: int):
    """The LlamaConfig of `cfg.model`: the size's shape, vocab and context filled in, overrides applied."""
    from models.sizes import get_config

    fields = {"vocab_size": round_up(tokenizer_vocab_size, 64)}
    fields["max_seq_len"] = cfg.data.seq_len
    fields.update(cfg.model.overrides)
    return get_config(cfg.model.size, **fields)


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as the plain mapping a YAML file would hold (load_config reads it back)."""
    out = {"name": cfg.name, "model": {"size": cfg.model.size, **cfg.model.overrides}}
    for section in section_classes():
        out[section] = to_plain(dataclasses.asdict(getattr(cfg, section)))
    return out


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
