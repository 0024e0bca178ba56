"""Document sources: local C4 shards read line by line, or a hub dataset streamed with ``datasets``.

Both hand one consumer (a rank's DataLoader worker) its disjoint part of a split, one document text
at a time, and keep a resumable position in a plain dict the caller owns:

    for text in source.documents(consumer, num_consumers, position): ...

``position`` is updated in place *before* each text is yielded, so at any moment it says where
the next document comes from. It holds ints, strings and lists only (saved with ``torch.save``,
loaded with ``weights_only=True``).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import zlib
from typing import Iterator

from data.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
GLOB_CHARS = "*?["
LOG_FIRST = 5  # malformed lines named individually per consumer
# What a truncated or corrupt .gz raises mid-file (EOFError: cut short; BadGzipFile: not gzip or a
# bad CRC; zlib.error: damaged deflate data).
BROKEN_GZIP = (EOFError, gzip.BadGzipFile, zlib.error)


def open_shard(path: str, binary: bool = False):
    """A C4 shard (or any text file) for reading, gzip-compressed when it ends in .gz: as UTF-8 text,
    or as bytes (``binary``) for a reader that decodes each line itself."""
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rb") if binary else opener(path, "rt", encoding="utf-8")


def is_local(source: str) -> bool:
    """A path or glob (anything that exists, has glob characters, or starts like a path)."""
    return (os.path.exists(os.path.expanduser(source)) or any(c in source for c in GLOB_CHARS)
            or source.startswith(("/", ".", "~")) or source.endswith((".json", ".json.gz")))


def local_files(source: str, split: str) -> list[str]:
    """The shards of ``split`` under a directory, glob or file; an error names what was missing.

    A directory holds ``c4-{split}.*.json.gz`` (or ``.json``); a glob's matches are split by file
    name (``-validation.`` files are validation, the others train); a single file is train data.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = sorted(f for ext in ("json.gz", "json")
                       for f in glob.glob(os.path.join(path, f"c4-{split}.*.{ext}")))
        where = f"directory {source!r} has no c4-{split}.*.json.gz shards"
    elif any(c in path for c in GLOB_CHARS):
        matched = sorted(glob.glob(path))
        if not matched:
            raise FileNotFoundError(f"data source glob {source!r} matches no file")
        is_val = ["-validation." in os.path.basename(f) for f in matched]
        files = [f for f, v in zip(matched, is_val) if v == (split == "validation")]
        where = f"no {split} shards among the {len(matched)} files matching {source!r}" + (
            " (validation shards are named c4-validation.*)" if split == "validation" else "")
    elif os.path.isfile(path):
        files = [path] if split == "train" else []
        where = (f"data source {source!r} is a single file, used as train data; point "
                 "data.source at a directory or glob with c4-validation.* shards for validation")
    else:
        raise FileNotFoundError(f"data source {source!r} does not exist (expected a directory or "
                                "glob of C4 shards, a hub dataset name like 'allenai/c4', or 'sample')")
    if not files:
        raise FileNotFoundError(where)
    return files


def write_shard(path: str, docs: list[dict]) -> None:
    """Write ``docs`` (``{"text", "timestamp", "url"}``) as a C4 ``.json.gz`` shard.

    Deterministic: mtime 0 and no file name in the gzip header, so the same docs give the same bytes.
    """
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))


class LocalShards:
    """C4 JSON-lines shards (``.json`` or ``.json.gz``), read in file order.

    Line ``j`` of file ``i`` belongs to consumer ``(i + j) % num_consumers``: every line goes to
    exactly one consumer, and the offset by ``i`` spreads small files over all consumers. A consumer
    parses only its own lines. Malformed lines (bad JSON, no ``text``, bytes that are not UTF-8) are
    skipped and counted, and so is the unreadable rest of a truncated or corrupt ``.gz`` (counted
    once, by the consumer owning the line where it broke); ``strict`` raises with file and line
    number instead. Empty documents are skipped and counted. Each line is read as bytes and
    decoded on its own, so one bad byte costs one line and the position stays (file, line).
    """

    def __init__(self, files: list[str], strict: bool = False):
        self.files = files
        self.strict = strict

    def describe(self) -> str:
        return f"{len(self.files)} local shard(s) starting {self.files[0]!r}"

    @staticmethod
    def start() -> dict:
        return {"file": 0, "line": 0, "malformed": 0, "empty": 0}

    def documents(self, consumer: int, num_consumers: int, pos: dict) -> Iterator[str]:
        while pos["file"] < len(self.files):
            path = self.files[pos["file"]]
            read = 0  # lines read from this file so far
            with open_shard(path, binary=True) as f:
                try:
                    for lineno, line in enumerate(f):
                        read = lineno + 1
                        if lineno < pos["line"]:
                            continue  # resuming: these lines were consumed before
                        pos["line"] = lineno + 1
                        if (pos["file"] + lineno) % num_consumers != consumer:
                            continue
                        text = self._text(line, path, lineno + 1, pos)
                        if text is not None:
                            yield text
                except BROKEN_GZIP as e:
                    # The same place breaks on every pass and resume: the rest of the file is skipped.
                    if self.strict or (pos["file"] + read) % num_consumers == consumer:
                        self._skip(pos, path, read + 1, f"truncated or corrupt compressed data ({e!r})",
                                   rest=True)
            pos["file"] += 1
            pos["line"] = 0

    def _skip(self, pos: dict, path: str, lineno: int, why: str, rest: bool = False) -> None:
        """Count a malformed line, or a file's unreadable rest (``rest``), and log the first few;
        when strict, raise naming file and line instead."""
        if self.strict and rest:
            raise DataError(f"{path}:{lineno}: unreadable C4 shard: {why}; fetch the file again or set "
                             "data.strict=false to skip the rest of such files")
        if self.strict:
            raise DataError(f"{path}:{lineno}: malformed C4 line: {why}; fix the file or set "
                             "data.strict=false to skip such lines")
        pos["malformed"] += 1
        if pos["malformed"] <= LOG_FIRST:  # the loader logs running totals; name a few lines
            logger.warning("skipping %s %s:%d: %s", "the rest of the file from line" if rest else "malformed line",
                           path, lineno, why)

    def _text(self, line: bytes, path: str, lineno: int, pos: dict) -> str | None:
        try:
            text = json.loads(line.decode("utf-8"))["text"]
            if not isinstance(text, str):
                raise TypeError(f"'text' is {type(text).__name__}, not a string")
        except UnicodeDecodeError as e:  # its repr would quote the whole line
            self._skip(pos, path, lineno, f"byte {e.start} is not UTF-8 ({e.reason})")
            return None
        except Exception as e:  # noqa: BLE001 - any line that fails to decode (a RecursionError from
            # `[` x 200000 too) costs that line, never the run
            self._skip(pos, path, lineno, repr(e)[:300])
            return None
        if not text.strip():
            pos["empty"] += 1
            return None
        return text


class HubStream:
    """A hub dataset streamed with ``datasets`` (``load_dataset(name, config, split, streaming=True)``).

    Only ``text`` is kept (C4's ``timestamp`` column breaks torch formatting). Consumers are split
    with ``split_dataset_by_node`` (whole shards when they divide evenly, else every N-th example);
    the position is ``datasets``' own state dict, exact here because nothing is shuffled.
    ``data_files`` passes through to ``load_dataset`` (local json.gz shards for offline tests).
    """

    def __init__(self, name: str, config: str | None, split: str, data_files=None):
        self.name, self.config, self.split, self.data_files = name, config, split, data_files

    def describe(self) -> str:
        return f"hub dataset {self.name!r} ({self.config}, {self.split})"

    @staticmethod
    def start() -> dict:
        return {"hub": None, "empty": 0, "malformed": 0}

    def dataset(self):
        import datasets  # imported here: nothing touches the hub until a stream starts
        kwargs = {"data_files": self.data_files} if self.data_files is not None else {}
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True,
                                         **kwargs).select_columns(["text"])
        except Exception as e:  # noqa: BLE001 - unreachable hub, unknown name or config: datasets' own types vary
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DataError(f"data.source = {self.name!r} ({self.config}, {self.split}) cannot be opened on the hub "
                            f"({e.__class__.__name__}: {first}); check the network, the dataset name and "
                            "data.hub_config, or point data.source at a local directory of C4 shards") from None

    def documents(self, consumer: int, num_consumers: int, pos: dict) -> Iterator[str]:
        from datasets.distributed import split_dataset_by_node
        ds = split_dataset_by_node(self.dataset(), rank=consumer, world_size=num_consumers)
        if pos["hub"] is not None:
            ds.load_state_dict(pos["hub"])
        # ds.iter(), not iter(ds): inside a DataLoader worker iter(ds) would split the shards among
        # workers a second time; our consumers already include the worker.
        for batch in ds.iter(batch_size=1):
            pos["hub"] = ds.state_dict()
            text = batch["text"][0]
            if not text or not text.strip():
                pos["empty"] += 1
                continue
            yield text
        pos["hub"] = None  # the split is done; the caller starts the next epoch
