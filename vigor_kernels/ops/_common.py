"""Normalization shared by the op front-ends: flatten extra row dims, build ranges, pick a backend."""

from __future__ import annotations

import math

import torch

from vigor_kernels.dispatch import Backend, select_backend
from vigor_kernels.ranges import RowRanges, as_row_ranges


def flatten_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, T, *mid, d]`` -> ``[B, T * prod(mid), d]`` and the row multiplier ``prod(mid)``.

    Row ``t`` of a sample becomes rows ``[t*k, (t+1)*k)``, so per-token ranges scale by ``k``. This is
    how per-head parameters (q/k norms applied to ``[B, T, H, D]``) reuse the 3-D kernels.
    """
    if t.dim() == 3:
        return t, 1
    k = math.prod(t.shape[2:-1])
    return t.reshape(t.shape[0], t.shape[1] * k, t.shape[-1]), k


def scale_ranges(ranges: RowRanges, k: int) -> RowRanges:
    if k == 1:
        return ranges
    return RowRanges(ranges.bounds * k, tuple((s * k, e * k) for s, e in ranges.host))


def prepare(
    ranges: RowRanges | torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None,
) -> tuple[RowRanges, Backend]:
    return as_row_ranges(ranges, batch, length, device), select_backend(backend, device, dtype)
