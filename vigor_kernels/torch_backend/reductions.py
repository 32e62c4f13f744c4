"""Bias and normalization-weight norms in plain PyTorch."""

from __future__ import annotations

import torch

from vigor_kernels.ranges import RowRanges
from vigor_kernels.torch_backend._chunks import sample_rows


def bias(g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    out = torch.zeros(g.shape[0], dtype=torch.float32, device=g.device)
    for b, (gb,) in sample_rows(ranges, g):
        out[b] = gb.sum(0).square().sum()
    return out


def norm_weight(g: torch.Tensor, xhat: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    out = torch.zeros(g.shape[0], dtype=torch.float32, device=g.device)
    for b, (gb, xb) in sample_rows(ranges, g, xhat):
        out[b] = (gb * xb).sum(0).square().sum()
    return out
