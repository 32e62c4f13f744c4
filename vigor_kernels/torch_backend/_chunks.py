"""Chunk sizing and per-sample row slices for the torch backend.

Every op works on each sample's valid rows ``t[b, start:end]`` directly: no masked copy of the batch,
padding (even NaN) is never read, and cost follows ``sum_b T_b`` (or ``T_b^2``) rather than
``B * T_max``. No temporary exceeds a fixed element budget.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from vigor_kernels.ranges import RowRanges

# 2^25 float32 elements = 128 MiB per temporary; override for tests or big GPUs.
DEFAULT_BUDGET = 1 << 25


def budget() -> int:
    return int(os.environ.get("VIGOR_TORCH_CHUNK_ELEMS", DEFAULT_BUDGET))


def chunk(total: int, per_unit: int) -> int:
    """How many units (rows, columns) fit the budget when each costs ``per_unit`` elements (>= 1)."""
    return max(1, min(total, budget() // max(1, per_unit)))


def sample_rows(ranges: RowRanges, *tensors: torch.Tensor) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """``(b, (t[b, start:end] as float32, ...))`` for every sample with at least one valid row."""
    for b, (start, end) in enumerate(ranges.host):
        if end > start:
            yield b, tuple(t[b, start:end].float() for t in tensors)


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` of two ``[rows, n]`` blocks: row dots in fp32, their sum in float64.

    Not one ``torch.dot`` over the flattened blocks: BLAS accumulates that in fp32 and drifts by 1e-4
    relative at real widths (a 4870 x 900 weight gradient), the whole error budget of the fp32 tests.
    """
    return torch.linalg.vecdot(a, b).sum(dtype=torch.float64).float()
