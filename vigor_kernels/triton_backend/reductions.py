"""Norms of gradients that are sums over rows: a bias (``sum_t g_t``) and the weight of an elementwise
affine normalization (``sum_t g_t * xhat_t``, RMSNorm / LayerNorm / Gemma's ``1 + w``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vigor_kernels.ranges import RowRanges
from vigor_kernels.triton_backend import _reduce, _runtime


@triton.jit
def _row_sum_sq_kernel(
    g_ptr, xhat_ptr, bounds_ptr, partial_ptr, width,
    stride_gb, stride_gt, stride_gd, stride_xb, stride_xt, stride_xd,
    HAS_XHAT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (feature chunk ``c``, sample ``b``); grid ``(ceil(d / BLOCK_D), B)``.

    Sums ``g_t`` (or ``g_t * xhat_t``) over sample b's valid rows into a ``BLOCK_T x BLOCK_D`` fp32
    accumulator, ``BLOCK_T`` rows at a time, folds its rows, and writes the sum of squares of that
    feature chunk of the gradient to ``partial[b, c]``.
    """
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    start = tl.load(bounds_ptr + 2 * b).to(tl.int32)
    end = tl.load(bounds_ptr + 2 * b + 1).to(tl.int32)
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = (cols < width)[None, :]
    lanes = tl.arange(0, BLOCK_T)
    g_base = g_ptr + b.to(tl.int64) * stride_gb + cols[None, :] * stride_gd
    x_base = xhat_ptr + b.to(tl.int64) * stride_xb + cols[None, :] * stride_xd
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + lanes
        mask = (rows < end)[:, None] & col_ok
        rows = rows.to(tl.int64)[:, None]
        term = tl.load(g_base + rows * stride_gt, mask=mask, other=0.0).to(tl.float32)
        if HAS_XHAT:
            term *= tl.load(x_base + rows * stride_xt, mask=mask, other=0.0).to(tl.float32)
        acc += term
    col_sums = tl.sum(acc, axis=0)
    tl.store(partial_ptr + b.to(tl.int64) * tl.num_programs(0) + chunk, tl.sum(col_sums * col_sums, axis=0))


def _blocks() -> tuple[int, int]:
    return (16, 16) if _runtime.INTERPRETING else (32, 128)


def _row_sum_sq(g: torch.Tensor, xhat: torch.Tensor | None, ranges: RowRanges) -> torch.Tensor:
    batch, _, width = g.shape
    if batch == 0:
        return torch.zeros(0, dtype=torch.float32, device=g.device)
    block_t, block_d = _blocks()
    chunks = triton.cdiv(width, block_d)
    partial = torch.empty(batch, chunks, dtype=torch.float32, device=g.device)
    other = g if xhat is None else xhat
    _row_sum_sq_kernel[(chunks, batch)](
        g, other, ranges.bounds, partial, width, *g.stride(), *other.stride(),
        HAS_XHAT=xhat is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return _reduce.row_sums(partial)


def bias(g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    return _row_sum_sq(g, None, ranges)


def norm_weight(g: torch.Tensor, xhat: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    return _row_sum_sq(g, xhat, ranges)
