"""Bias and normalization-weight norms in plain PyTorch."""

from __future__ import annotations

import torch

from vigor_kernels.ranges import RowRanges


def _masked_row_sum(t: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    mask = ranges.row_mask(t.shape[1], t.device)
    return torch.where(mask[..., None], t.float(), 0.0).sum(1)


def bias(g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    return _masked_row_sum(g, ranges).square().sum(-1)


def norm_weight(g: torch.Tensor, xhat: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    return _masked_row_sum(g.float() * xhat.float(), ranges).square().sum(-1)
