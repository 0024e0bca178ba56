"""The data pipeline's front door: config, tokenizer, resumable train loader, fixed validation batches.

    cfg = DataConfig()                                   # bundled sample corpus, offline
    tok = build_tokenizer(cfg)
    loader = build_train_loader(cfg, tok, batch_size=8, rank=rank, world_size=world)
    for batch in loader:                                 # {"input_ids": (B, T), "labels": (B, T)}
        ...
    state = loader.state_dict()                          # ints, strings, lists, tensors
    val = build_val_batches(cfg, tok, batch_size=8, num_batches=4, rank=rank, world_size=world)
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass
from typing import Iterator

from torch.utils.data import DataLoader

from data import sample
from data.c4 import HubStream, LocalShards, is_local, local_files
from data.errors import UserError
from data.packing import MODES
from data.stream import BatchStream, start_state
from data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
STATE_VERSION = 1
# The run setting behind each field of a saved data position (for the message of a refused resume).
LAYOUT_KEYS = {"rank": "the rank", "world_size": "the number of processes", "num_workers": "data.num_workers",
               "batch_size": "train.micro_batch_size", "seq_len": "data.seq_len", "packing": "data.packing"}


@dataclass
class DataConfig:
    """Where text comes from and how it becomes rows.

    source: "sample" (bundled corpus), a hub dataset name ("allenai/c4", streamed), or a local
        directory / glob of C4 shards (c4-train.*.json.gz, c4-validation.*.json.gz).
    hub_config: the hub dataset's config name ("en" for C4).
    tokenizer: "sample" (the bundled corpus' tokenizer) or a SentencePiece .model path.
    seq_len: tokens per row T (each row reads T + 1 tokens; labels are shifted by one).
    packing: "pack" (documents joined with EOS, no padding) or "truncate" (one per row, padded).
    num_workers: DataLoader worker processes per rank (0 = read in the training process).
    strict: fail (naming file and line) on a malformed line (bad JSON, no text, not UTF-8) or a
        truncated / corrupt .gz, instead of skipping and counting it.
    add_bos: start every document with BOS (it always ends with EOS).
    """
    source: str = "sample"
    hub_config: str = "en"
    tokenizer: str = "sample"
    seq_len: int = 256
    packing: str = "pack"
    num_workers: int = 0
    strict: bool = False
    add_bos: bool = True

    def __post_init__(self):
        for name in ("source", "tokenizer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name} must be a non-empty string, got {value!r}")
        for name, low in (("seq_len", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if self.packing not in MODES:
            raise ValueError(f"data.packing must be one of {MODES}, got {self.packing!r}")
        for name in ("strict", "add_bos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name} must be true or false, got {getattr(self, name)!r}")


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    path = sample.sample_tokenizer_path() if cfg.tokenizer == "sample" else cfg.tokenizer
    return Tokenizer(path)


def build_source(cfg: DataConfig, split: str):
    """The document source for ``split``: LocalShards for "sample" and paths, HubStream otherwise."""
    if cfg.source == "sample":
        return LocalShards(sample.sample_files(split), cfg.strict)
    if is_local(cfg.source):
        return LocalShards(local_files(cfg.source, split), cfg.strict)
    return HubStream(cfg.source, cfg.hub_config, split)


class TrainLoader:
    """Endless train batches for one rank, resumable exactly.

    Each DataLoader worker runs one stream and yields whole batches, so batch ``i`` comes from
    stream ``i % W``. Every batch carries its stream's position; the loader keeps the latest one
    per stream and which stream is next. That is the whole state: restoring it restarts each
    stream at its position and rotates the workers so the stream order continues.
    """

    def __init__(self, stream_args: dict, source, num_workers: int):
        self._args, self._source, self.num_workers = stream_args, source, num_workers
        self._states = [start_state(source) for _ in range(max(num_workers, 1))]
        self._next = 0
        self._generation = 0  # bumped by __iter__ and load_state_dict so an older iterator stops
        self._logged = {"malformed": 0, "empty": 0}

    @property
    def stats(self) -> dict:
        """Batches yielded, epochs started and input skipped so far, summed over streams."""
        s = [st["source"] for st in self._states]
        return {"batches": sum(st["batches"] for st in self._states),
                "epoch": min(st["epoch"] for st in self._states),
                "malformed_lines": sum(p["malformed"] for p in s),
                "empty_documents": sum(p["empty"] for p in s)}

    def __iter__(self) -> Iterator[dict]:
        # One live iterator per loader: a newer one (or load_state_dict) retires the older.
        self._generation += 1
        generation = self._generation
        dataset = BatchStream(**self._args, source=self._source, num_workers=self.num_workers,
                              states=copy.deepcopy(self._states), first=self._next)
        if self.num_workers == 0:
            items = iter(dataset)
        else:
            items = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                    prefetch_factor=2))
        for item in _unwrapped(items):
            if generation != self._generation:
                return  # a newer iterator or load_state_dict took over: this one is stale
            stream = item.pop("stream")
            assert stream == self._next, f"batch from stream {stream}, expected {self._next}"
            self._states[stream] = item.pop("state")
            self._next = (stream + 1) % len(self._states)
            self._log_skips()
            yield item

    def _log_skips(self) -> None:
        stats = self.stats
        for key, name in (("malformed", "malformed_lines"), ("empty", "empty_documents")):
            if stats[name] > self._logged[key]:
                logger.warning("data: skipped %d %s so far", stats[name], name.replace("_", " "))
                self._logged[key] = stats[name]

    def _layout(self) -> dict:
        a = self._args
        return {"rank": a["rank"], "world_size": a["world_size"], "num_workers": self.num_workers,
                "batch_size": a["batch_size"], "seq_len": a["seq_len"], "packing": a["packing"]}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._layout(), "next_stream": self._next,
                "streams": copy.deepcopy(self._states)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')!r} is not "
                            f"{STATE_VERSION}; it was written by another version of data/")
        layout = self._layout()
        diff = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if diff:
            raise UserError("the saved data position does not fit this run: "
                            + ", ".join(f"{LAYOUT_KEYS[k]} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
                            + "; resume with the saved values (each rank reads its own lines in batches of that "
                              "layout), or start a new run in another log.run_dir")
        self._states = copy.deepcopy(state["streams"])
        self._next = state["next_stream"]
        self._generation += 1


def _unwrapped(items: Iterator[dict]) -> Iterator[dict]:
    """`items`, with a UserError a DataLoader worker raised given back its own one-line message: the
    DataLoader re-raises it with the worker's whole traceback as the message."""
    try:
        yield from items
    except UserError as e:
        text = str(e).strip()
        if "Original Traceback" not in text:
            raise
        raise type(e)(text.splitlines()[-1].split(": ", 1)[-1]) from None


def _stream_args(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, rank: int,
                 world_size: int) -> dict:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} is not in [0, world_size={world_size!r})")
    return {"tokenizer": tokenizer, "batch_size": batch_size, "seq_len": cfg.seq_len,
            "packing": cfg.packing, "add_bos": cfg.add_bos, "rank": rank, "world_size": world_size}


def build_train_loader(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> TrainLoader:
    """Endless ``{"input_ids": (B, T), "labels": (B, T)}`` batches of this rank's train share."""
    args = _stream_args(cfg, tokenizer, batch_size, rank, world_size)
    return TrainLoader(args, build_source(cfg, "train"), cfg.num_workers)


def build_val_batches(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, num_batches: int,
                      rank: int = 0, world_size: int = 1) -> list[dict]:
    """The first ``num_batches`` batches of this rank's share of the validation split.

    The same batches on every call. If the split is shorter, it repeats (and says so), so every
    rank returns ``num_batches`` batches and distributed evaluation stays in step.
    """
    args = _stream_args(cfg, tokenizer, batch_size, rank, world_size)
    source = build_source(cfg, "validation")
    stream = BatchStream(**args, source=source, num_workers=0, states=[start_state(source)])
    batches, warned = [], False
    for item in itertools.islice(stream, num_batches):
        if item["state"]["epoch"] > 0 and not warned:
            warned = True
            logger.warning("data: the validation split gives rank %d fewer than %d batches of %d x %d "
                           "tokens; repeating it", rank, num_batches, batch_size, cfg.seq_len)
        batches.append({"input_ids": item["input_ids"], "labels": item["labels"]})
    return batches


def remap_train_state(saved: list[dict], loader: TrainLoader) -> dict:
    """A state for ``loader`` that continues from per-rank states saved under ANOTHER layout
    (world size, workers or batch size changed), for a resume at another world size.

    Not exact, by construction: each consumer owns every ``num_consumers``-th line, so a new
    layout splits the lines differently. Every new stream starts at the furthest position any
    saved stream had reached (latest epoch, then file and line); the lines before it that a
    slower saved stream had not read yet are skipped, and the packing buffers (tokens read but
    not yet trained on) are dropped. Nothing is read twice. Local shards and the sample corpus
    only: a hub stream's position is an opaque per-consumer state that cannot be remapped.
    """
    streams = [s for state in saved for s in state["streams"]]
    if any("file" not in s["source"] for s in streams):
        raise UserError("the saved data position is a hub stream's, which cannot be remapped to another "
                         "number of ranks x workers; resume with the saved layout")
    furthest = max(streams, key=lambda s: (s["epoch"], s["source"]["file"], s["source"]["line"]))
    fresh = loader.state_dict()
    for stream in fresh["streams"]:
        stream["epoch"] = furthest["epoch"]
        stream["source"] = {**stream["source"], "file": furthest["source"]["file"], "line": furthest["source"]["line"]}
    return fresh


def describe_remap(saved: list[dict], new: dict) -> str:
    """One line on what `remap_train_state` did: positions before and after, tokens dropped."""
    before = sorted({(s["epoch"], s["source"]["file"], s["source"]["line"]) for st in saved for s in st["streams"]})
    after = new["streams"][0]
    dropped = sum(int(s["buffer"].numel()) for st in saved for s in st["streams"])
    return (f"data: saved positions (epoch, file, line) {before} -> every stream starts at "
            f"({after['epoch']}, {after['source']['file']}, {after['source']['line']}); lines before it that a "
            f"saved stream had not read are skipped and {dropped} buffered tokens dropped (no line is read twice)")
