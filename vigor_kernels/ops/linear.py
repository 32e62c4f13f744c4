"""Per-sample squared Frobenius norm of a linear layer's weight gradient ``G_b^T X_b``."""

from __future__ import annotations

import torch

from vigor_kernels._checks import check_features, check_leading, check_same_device, common_dtype
from vigor_kernels.cost import choose_linear_method
from vigor_kernels.errors import VigorInputError
from vigor_kernels.ops._common import flatten_rows, prepare, scale_ranges
from vigor_kernels.ranges import RowRanges

METHODS = ("auto", "ghost", "direct")


def linear_weight_sq_norms(
    x: torch.Tensor,
    g: torch.Tensor,
    ranges: RowRanges | torch.Tensor | None = None,
    *,
    method: str = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """``||G_b^T X_b||_F^2`` for each sample b, as float32 ``[B]``.

    x: layer input ``[B, T, (*mid,) d_in]``; g: gradient w.r.t. the layer output ``[B, T, (*mid,) d_out]``
    (extra dims between T and the feature dim are folded into rows). ``ranges``: per-sample valid token
    rows (see :mod:`vigor_kernels.ranges`). ``method``: ``ghost`` (Gram matrices, ~T^2 (d_in+d_out)),
    ``direct`` (``G^T X`` tiles, ~2 T d_in d_out) or ``auto`` (cheaper by :mod:`vigor_kernels.cost`).
    The same result for either transpose convention (nn.Linear or transformers' Conv1D).
    """
    if method not in METHODS:
        raise VigorInputError(f"method must be one of {METHODS}, got '{method}'")
    x = check_features("x", x)
    g = check_features("g", g, x.dim())
    device = check_same_device(x=x, g=g)
    dtype = common_dtype(x=x, g=g)
    check_leading(tuple(x.shape[:-1]), g=g)
    batch, length = x.shape[0], x.shape[1]
    rows, be = prepare(ranges, batch, length, device, dtype, backend)
    x, k = flatten_rows(x)
    g, _ = flatten_rows(g)
    rows = scale_ranges(rows, k)
    if method == "auto":
        method = choose_linear_method(rows.lengths(), x.shape[-1], g.shape[-1], be.ghost_cost_factor)
    fn = be.linear_ghost if method == "ghost" else be.linear_direct
    return fn(x, g, rows)
