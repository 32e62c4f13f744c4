"""Ghost norm of a linear weight gradient: ``||G_b^T X_b||_F^2 = sum_{t,s} (x_t . x_s)(g_t . g_s)``.

Cost ~``T_b^2 (d_in + d_out)`` per sample using the symmetry of both Gram matrices; extra memory is
one float per (sample, tile pair), never a ``[B, T, T]`` buffer.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vigor_kernels.ranges import RowRanges
from vigor_kernels.triton_backend import _reduce, _runtime


@triton.jit
def _gram_tile(base, rows_i, rows_j, live_i, live_j, width, stride_t, stride_d,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """``A[rows_i] A[rows_j]^T`` for one sample's ``A`` (``[T, width]`` at ``base``): a ``BLOCK_T x BLOCK_T``
    fp32 block accumulated on chip over ``width`` in ``BLOCK_K`` chunks. Rows that are not live load as 0."""
    cols = tl.arange(0, BLOCK_K)
    ptr_i = base + rows_i[:, None] * stride_t + cols[None, :] * stride_d
    ptr_j = base + rows_j[:, None] * stride_t + cols[None, :] * stride_d
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        if EVEN_K:
            a = tl.load(ptr_i, mask=live_i[:, None], other=0.0)
            b = tl.load(ptr_j, mask=live_j[:, None], other=0.0)
        else:
            in_k = (cols + k0 < width)[None, :]
            a = tl.load(ptr_i, mask=live_i[:, None] & in_k, other=0.0)
            b = tl.load(ptr_j, mask=live_j[:, None] & in_k, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        ptr_i += BLOCK_K * stride_d
        ptr_j += BLOCK_K * stride_d
    return acc


@triton.jit
def _tile_pair(pair):
    """Invert ``pair = j (j + 1) / 2 + i`` (``0 <= i <= j``), elementwise; the float estimate of ``j``
    (the GPU's sqrt is approximate) is off by at most one either way, and corrected in integers."""
    pair = pair.to(tl.int64)  # j (j + 1) overflows int32 beyond 46340 tiles
    j = ((tl.sqrt(8.0 * pair.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    j = tl.where(j * (j + 1) // 2 > pair, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pair, j + 1, j)
    return pair - j * (j + 1) // 2, j


@triton.jit
def _ghost_pair_kernel(
    x_ptr, g_ptr, bounds_ptr, partial_ptr, d_in, d_out, n_pairs,
    stride_xb, stride_xt, stride_xd, stride_gb, stride_gt, stride_gd,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program per (tile pair ``p``, sample ``b``); grid ``(n_pairs, B)``.

    Sample b's valid rows ``[start, end)`` are cut into ``n = ceil((end - start) / BLOCK_T)`` row tiles,
    counted from ``start``. Pairs ``i <= j`` are numbered column by column, ``p = j (j + 1) / 2 + i``,
    so sample b's pairs are exactly ``p < n (n + 1) / 2``: programs past that (a shorter sample, or
    one that is all padding) skip all work and write 0. A live program builds the ``X_i X_j^T`` and
    ``G_i G_j^T`` blocks on chip (``tl.dot`` over ``d_in`` then ``d_out``), multiplies them elementwise
    and writes the sum, twice for ``i < j`` (the mirrored block ``j, i`` is never computed), to
    ``partial[b, p]``. Rows past ``end`` load as zero, so padding (even NaN) never enters a sum.
    """
    pair = tl.program_id(0)
    b = tl.program_id(1)
    start = tl.load(bounds_ptr + 2 * b).to(tl.int32)
    end = tl.load(bounds_ptr + 2 * b + 1).to(tl.int32)
    n_tiles = tl.cdiv(end - start, BLOCK_T)
    i, j = _tile_pair(pair)
    total = tl.zeros((), dtype=tl.float32)
    if j < n_tiles:
        lanes = tl.arange(0, BLOCK_T)
        rows_i = start + i * BLOCK_T + lanes
        rows_j = start + j * BLOCK_T + lanes
        live_i = rows_i < end
        live_j = rows_j < end
        rows_i = rows_i.to(tl.int64)
        rows_j = rows_j.to(tl.int64)
        xx = _gram_tile(x_ptr + b.to(tl.int64) * stride_xb, rows_i, rows_j, live_i, live_j, d_in,
                        stride_xt, stride_xd, BLOCK_T, BLOCK_K, EVEN_K, UPCAST)  # fmt: skip
        gg = _gram_tile(g_ptr + b.to(tl.int64) * stride_gb, rows_i, rows_j, live_i, live_j, d_out,
                        stride_gt, stride_gd, BLOCK_T, BLOCK_K, EVEN_K, UPCAST)  # fmt: skip
        total = tl.sum(tl.sum(xx * gg, axis=1), axis=0)
        total = tl.where(i == j, total, 2.0 * total)
    tl.store(partial_ptr + b.to(tl.int64) * n_pairs + pair, total)


_ghost_heuristic = triton.heuristics(
    {"EVEN_K": lambda a: a["d_in"] % a["BLOCK_K"] == 0 and a["d_out"] % a["BLOCK_K"] == 0}
)(_ghost_pair_kernel)

# Tuning configs per (BLOCK_T, fp32?): BLOCK_T is fixed by the launcher (it sets the grid and the
# partial buffer), these tune the rest. Kept to what compiles for sm_90 without register spills
# (bench/gpu/triton_compile_check.py): a 128 x 128 pair holds two fp32 accumulators, so it needs 8 warps.
CONFIGS = {
    (128, False): [
        _runtime.config(8, 3, BLOCK_K=64),
        _runtime.config(8, 4, BLOCK_K=64),
        _runtime.config(8, 4, BLOCK_K=32),
        _runtime.config(8, 2, BLOCK_K=128),
    ],
    (64, False): [
        _runtime.config(4, 3, BLOCK_K=64),
        _runtime.config(4, 4, BLOCK_K=32),
        _runtime.config(8, 3, BLOCK_K=64),
        _runtime.config(4, 2, BLOCK_K=128),
    ],
    (64, True): [
        _runtime.config(8, 3, BLOCK_K=32),
        _runtime.config(8, 2, BLOCK_K=64),
        _runtime.config(4, 3, BLOCK_K=32),
    ],
}
_ghost_tuned = (
    {}
    if _runtime.INTERPRETING
    else {key: _runtime.tuned(_ghost_heuristic, configs, ["d_in", "d_out"]) for key, configs in CONFIGS.items()}
)

INTERPRETER_BLOCK_T = 16
INTERPRETER_BLOCK_K = 16


def n_pairs(n_tiles: int) -> int:
    return n_tiles * (n_tiles + 1) // 2


def pair_count(lengths: list[int], block_t: int) -> int:
    """Programs that do work: the tile pairs ``i <= j`` of every sample."""
    return sum(n_pairs(math.ceil(n / block_t)) for n in lengths)


def choose_block_t(lengths: list[int], dtype: torch.dtype, device: torch.device) -> int:
    """Row tile edge: 128 keeps tensor cores busy longest per load; 64 when 128 would leave most
    of the GPU idle on the last wave (few short samples). fp32 (exact FMA path) always uses 64."""
    if _runtime.INTERPRETING:
        return INTERPRETER_BLOCK_T
    if dtype == torch.float32:
        return 64
    sms = _runtime.sm_count(device)
    # waves x work per program; a 64-row pair does a quarter of the work at ~70% of the efficiency
    cost = {bt: math.ceil(pair_count(lengths, bt) / sms) * bt * bt / eff for bt, eff in ((128, 1.0), (64, 0.7))}
    return min(cost, key=cost.get)


def workspace_numel(lengths: list[int], block_t: int) -> int:
    """Floats of extra memory: one partial per (sample, tile pair) of the longest sample."""
    return len(lengths) * n_pairs(math.ceil(max(lengths, default=0) / block_t))


def linear_ghost(x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    batch = x.shape[0]
    lengths = ranges.lengths()
    block_t = choose_block_t(lengths, x.dtype, x.device)
    pairs = n_pairs(math.ceil(max(lengths, default=0) / block_t))
    if batch == 0 or pairs == 0:
        return torch.zeros(batch, dtype=torch.float32, device=x.device)
    partial = torch.empty(batch, pairs, dtype=torch.float32, device=x.device)
    args = (x, g, ranges.bounds, partial, x.shape[2], g.shape[2], pairs, *x.stride(), *g.stride())
    upcast = _runtime.upcast_for_dot(x.dtype)
    if _runtime.INTERPRETING:
        _ghost_heuristic[(pairs, batch)](*args, BLOCK_T=block_t, BLOCK_K=INTERPRETER_BLOCK_K, UPCAST=upcast)
    else:
        _ghost_tuned[block_t, x.dtype == torch.float32][(pairs, batch)](*args, BLOCK_T=block_t, UPCAST=upcast)
    return _reduce.row_sums(partial)
