"""Chunk sizing: the torch backend never materializes a temporary larger than a fixed element budget."""

from __future__ import annotations

import os

import torch

from vigor_kernels.ranges import RowRanges

# 2^25 float32 elements = 128 MiB per temporary; override for tests or big GPUs.
DEFAULT_BUDGET = 1 << 25


def budget() -> int:
    return int(os.environ.get("VIGOR_TORCH_CHUNK_ELEMS", DEFAULT_BUDGET))


def chunk(total: int, per_unit: int) -> int:
    """How many units (rows, columns) fit the budget when each costs ``per_unit`` elements (>= 1)."""
    return max(1, min(total, budget() // max(1, per_unit)))


def masked_window(t: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """``t[:, lo:hi]`` over the batch's common row window, with out-of-range rows set to exactly zero
    (``where``, not a multiply, so NaN in padding cannot leak), as float32."""
    lo, hi = ranges.window()
    mask = ranges.row_mask(t.shape[1], t.device)[:, lo:hi]
    return torch.where(mask[..., None], t[:, lo:hi].float(), 0.0)
