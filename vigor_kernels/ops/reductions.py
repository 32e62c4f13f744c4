"""Per-sample squared norms of gradients that are plain reductions over rows: biases and norm weights."""

from __future__ import annotations

import torch

from vigor_kernels._checks import check_features, check_leading, check_same_device, common_dtype
from vigor_kernels.ops._common import flatten_rows, prepare, scale_ranges
from vigor_kernels.ranges import RowRanges, as_row_ranges


def bias_sq_norms(
    g: torch.Tensor, ranges: RowRanges | torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """``||sum_t g_{b,t}||^2`` per sample, float32 ``[B]``; g is ``[B, T, (*mid,) d]``."""
    g = check_features("g", g)
    rows, be = prepare(ranges, g.shape[0], g.shape[1], g.device, g.dtype, backend)
    g, k = flatten_rows(g)
    return be.bias(g, scale_ranges(rows, k))


def norm_weight_sq_norms(
    g: torch.Tensor,
    xhat: torch.Tensor,
    ranges: RowRanges | torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``||sum_t g_{b,t} * xhat_{b,t}||^2`` per sample, float32 ``[B]``.

    The weight gradient of any elementwise-affine normalization (RMSNorm, LayerNorm, Gemma's ``1 + w``):
    ``xhat`` is the normalized input (the output's derivative w.r.t. the weight). Shapes
    ``[B, T, (*mid,) d]``; extra dims (attention heads of q/k norms) are summed over like rows.
    """
    g = check_features("g", g)
    xhat = check_features("xhat", xhat, g.dim())
    device = check_same_device(g=g, xhat=xhat)
    dtype = common_dtype(g=g, xhat=xhat)
    check_leading(tuple(g.shape), xhat=xhat)
    rows, be = prepare(ranges, g.shape[0], g.shape[1], device, dtype, backend)
    g, k = flatten_rows(g)
    xhat, _ = flatten_rows(xhat)
    return be.norm_weight(g, xhat, scale_ranges(rows, k))


def row_dot(a: torch.Tensor, b: torch.Tensor, ranges: RowRanges | torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t a_{b,t} . b_{b,t}`` over valid rows, float32 ``[B]`` (one fused reduction, any backend)."""
    a = check_features("a", a, 3)
    b = check_features("b", b, 3)
    check_same_device(a=a, b=b)
    check_leading(tuple(a.shape), b=b)
    rows = as_row_ranges(ranges, a.shape[0], a.shape[1], a.device)
    mask = rows.row_mask(a.shape[1], a.device)
    prod = (a.float() * b.float()).sum(-1)
    return torch.where(mask, prod, 0.0).sum(-1)
