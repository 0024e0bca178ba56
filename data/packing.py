"""Turn tokenized documents into training rows of ``seq_len + 1`` tokens.

Each document becomes ``[BOS] ids [EOS]``. Two ways to make rows of length ``L = seq_len + 1``:

- ``pack``: documents are concatenated and cut into consecutive windows, so no position is
  padding; the tail of the last document waits in a buffer for the next batch.
- ``truncate``: one document per row, cut at ``L`` or padded up to it (GaLore's recipe); padded
  positions take no loss.

A row ``w`` gives ``input_ids = w[:-1]`` and ``labels = w[1:]`` with -100 where ``w[1:]`` is padding.
"""

from __future__ import annotations

from typing import Callable

import torch

IGNORE_INDEX = -100
MODES = ("pack", "truncate")


def packed_rows(buffer: list[int], next_doc: Callable[[], list[int]], rows: int, length: int
                ) -> tuple[torch.Tensor, list[int]]:
    """Fill ``rows`` windows of ``length`` tokens from ``buffer`` then new documents.

    Returns windows ``(rows, length)`` and the leftover buffer (the start of the next batch).
    """
    need = rows * length
    buffer = list(buffer)
    while len(buffer) < need:
        buffer.extend(next_doc())
    windows = torch.tensor(buffer[:need], dtype=torch.long).view(rows, length)
    return windows, buffer[need:]


def truncated_rows(next_doc: Callable[[], list[int]], rows: int, length: int, pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per row, cut to ``length`` or padded with ``pad_id``.

    Returns windows ``(rows, length)`` and ``real (rows, length)``: True where a token is not padding.
    """
    windows = torch.full((rows, length), pad_id, dtype=torch.long)
    real = torch.zeros((rows, length), dtype=torch.bool)
    for r in range(rows):
        ids = next_doc()[:length]
        windows[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        real[r, :len(ids)] = True
    return windows, real


def inputs_and_labels(windows: torch.Tensor, real: torch.Tensor | None = None) -> dict:
    """``windows (B, T+1)`` -> ``{"input_ids": (B, T), "labels": (B, T)}``, labels shifted by one."""
    labels = windows[:, 1:].clone()
    if real is not None:
        labels[~real[:, 1:]] = IGNORE_INDEX
    return {"input_ids": windows[:, :-1].contiguous(), "labels": labels}
