"""Whole batches from one consumer's part of a split, each tagged with the stream's position.

A rank with ``W`` DataLoader workers runs ``W`` streams (one when ``W == 0``); stream ``s`` of rank
``r`` is consumer ``r * W + s`` of ``world_size * W``. DataLoader worker ``k`` runs stream
``(k + first) % W``: the DataLoader takes batch ``i`` from worker ``i % W``, so setting ``first``
on resume makes the stream order continue where it stopped.

Each yielded item is ``{"input_ids": (B, T), "labels": (B, T), "stream": s, "state": {...}}``,
where ``state`` is the stream's position after this batch: epoch, the source's position, and the
packing buffer (tokens already read but not yet used).
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.errors import DataError
from data.packing import inputs_and_labels, packed_rows, truncated_rows
from data.tokenizer import Tokenizer


def start_state(source) -> dict:
    return {"epoch": 0, "batches": 0, "source": source.start(),
            "buffer": torch.zeros(0, dtype=torch.long)}


COUNTERS = ("malformed", "empty")


def _position(pos: dict) -> dict:
    return {k: v for k, v in pos.items() if k not in COUNTERS}


def _counters(pos: dict) -> dict:
    return {k: pos[k] for k in COUNTERS}


class BatchStream(IterableDataset):
    """Endless batches ``(B, T)`` for each stream of one rank, starting from ``states[stream]``.

    ``source`` is a ``data.c4`` source; ``first`` is the stream DataLoader worker 0 runs.
    """

    def __init__(self, source, tokenizer: Tokenizer, batch_size: int, seq_len: int, packing: str,
                 add_bos: bool, rank: int, world_size: int, num_workers: int,
                 states: list[dict], first: int = 0):
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seq_len, self.packing, self.add_bos = batch_size, seq_len, packing, add_bos
        self.rank, self.world_size, self.streams = rank, world_size, max(num_workers, 1)
        self.states, self.first = states, first

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        stream = ((info.id if info else 0) + self.first) % self.streams
        return self.batches(stream, copy.deepcopy(self.states[stream]))

    def batches(self, stream: int, state: dict) -> Iterator[dict]:
        consumer = self.rank * self.streams + stream
        num_consumers = self.world_size * self.streams
        docs = self._documents(consumer, num_consumers, state)
        tok = self.tokenizer

        def next_doc() -> list[int]:
            return tok.encode(next(docs), bos=self.add_bos, eos=True)

        buffer = state["buffer"].tolist()
        while True:
            if self.packing == "pack":
                windows, buffer = packed_rows(buffer, next_doc, self.batch_size, self.seq_len + 1)
                batch = inputs_and_labels(windows)
            else:
                windows, real = truncated_rows(next_doc, self.batch_size, self.seq_len + 1, tok.pad_id)
                batch = inputs_and_labels(windows, real)
            state["buffer"] = torch.tensor(buffer, dtype=torch.long)
            state["batches"] += 1
            yield {**batch, "stream": stream, "state": copy.deepcopy(state)}

    def _documents(self, consumer: int, num_consumers: int, state: dict) -> Iterator[str]:
        """This consumer's documents, epoch after epoch; ``state`` tracks where the next one is."""
        while True:
            fresh = _position(state["source"]) == _position(self.source.start())
            got = False
            for text in self.source.documents(consumer, num_consumers, state["source"]):
                got = True
                yield text
            if fresh and not got:
                raise DataError(
                    f"rank {self.rank} stream {consumer % self.streams} (consumer {consumer} of "
                    f"{num_consumers}) received no documents from {self.source.describe()}; use fewer "
                    "ranks x workers (data.num_workers) or more data")
            # Counters of skipped lines carry over epochs; the position restarts.
            state["source"] = {**self.source.start(), **_counters(state["source"])}
            state["epoch"] += 1
