"""Packing: tokenized samples concatenated into rows of up to ``max_length`` tokens, with no
attention across sample boundaries.

Each row is what transformers' :class:`~transformers.DataCollatorWithFlattening` makes of its
samples: the ids one after the other, ``position_ids`` restarting at 0 for each sample, and the
label of each sample's first token set to -100 (it would otherwise be predicted from the previous
sample's last token). Rows carry no ``attention_mask``: from position ids that restart, the
model's mask builder (transformers' ``masking_utils``) makes a block-diagonal causal mask for
eager and SDPA attention and the flash-attention kernels find the sample boundaries; the loss of
a packed row is the loss of its samples apart. This needs the model's forward to run without a
KV cache (``use_cache=False``, as :class:`~melora_lit.training.module.MELoRAModule` does for
causal LMs): with one, transformers builds a plain causal mask.

Samples are placed into rows by best-fit decreasing (each sample, longest first, into the row
with the least room that still fits it), which leaves little padding; ties in length are broken
in a seeded random order.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from datasets import Dataset
from transformers import DataCollatorWithFlattening

__all__ = ["IGNORE_INDEX", "pack_rows", "pack_dataset", "PackedCollator", "flatten_packed"]

IGNORE_INDEX = -100  # the label of a token without loss


def pack_rows(lengths: list[int], max_length: int, seed: int = 0) -> list[list[int]]:
    """Indices of the samples of each row: every sample in exactly one row, no row longer than
    ``max_length`` (a longer sample is refused: truncate first)."""
    if any(n > max_length for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a packed row of max_length={max_length}")
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, row) of the rows that still have room, sorted
    for i in order:
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([i])
            left, row = max_length - lengths[i], len(rows) - 1
        else:
            left, row = room.pop(k)
            rows[row].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def pack_dataset(ds: Dataset, max_length: int, seed: int = 0) -> Dataset:
    """Rows of ``input_ids``, ``labels`` and ``position_ids`` packed from a tokenized dataset
    (``input_ids`` and ``labels``; see the module docstring)."""
    flatten = DataCollatorWithFlattening(return_tensors="np")
    samples = [{"input_ids": i, "labels": lab} for i, lab in zip(ds["input_ids"], ds["labels"])]
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in pack_rows([len(s["input_ids"]) for s in samples], max_length, seed):
        flat = flatten([samples[i] for i in row])
        for key in out:
            out[key].append(flat[key][0].tolist())
    return Dataset.from_dict(out)


class PackedCollator:
    """Batches of packed rows, each padded to the longest: the padding is one more sample of pad
    tokens (its positions restart at 0, its labels are -100), so it attends to nothing real."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}



def flatten_packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of packed rows as one row without their padding, for attention kernels that take
    sample boundaries from the position ids alone (flash attention, flex attention): no token is
    computed for nothing. A row's padding is its last sample when that sample has no target (a
    real sample always has one); the first label of every sample is already -100, so no token
    is predicted across a boundary."""
    keep = []
    for labels, positions in zip(batch["labels"], batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten()
        last = int(starts[-1]) if len(starts) else 0
        keep.append(last if last > 0 and bool((labels[last:] == IGNORE_INDEX).all()) else len(labels))
    return {k: torch.cat([row[:n] for row, n in zip(v, keep)])[None] for k, v in batch.items()}
