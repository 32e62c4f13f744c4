"""Direct norm of a linear weight gradient: form ``G_b^T X_b`` tile by tile on chip and sum its squares.

Cost ~``2 T_b d_in d_out`` per sample, linear in T: the method for long sequences. The gradient is never
written out whole; only when few tiles would leave the GPU idle are the rows of each sample split into
chunks whose partial tiles go to a workspace and are summed in a fixed order before squaring.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vigor_kernels.ranges import RowRanges
from vigor_kernels.triton_backend import _reduce, _runtime


@triton.jit
def _direct_tile_kernel(
    x_ptr, g_ptr, bounds_ptr, out_ptr, d_in, d_out, n_tiles_in, split_rows,
    stride_xb, stride_xt, stride_xd, stride_gb, stride_gt, stride_gd,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program per (weight tile, row chunk ``c``, sample ``b``); grid ``(n_tiles, n_chunks, B)``.

    The program owns the ``BLOCK_O x BLOCK_I`` block ``W[o0:o0+BLOCK_O, i0:i0+BLOCK_I]`` of the weight
    gradient ``W = G^T X`` and accumulates it on chip, ``BLOCK_T`` rows at a time
    (``tl.dot(G_rows^T, X_rows)``), over the rows ``[start + c * split_rows, ...)`` of sample b's valid
    range. Without SPLIT (one chunk) it writes ``sum(W_block^2)`` to ``out[b, tile]``; with SPLIT it
    writes the fp32 block itself to ``out[b, c, tile]`` for :func:`_combine_kernel`, since squares of
    partial sums do not add up to the square of the sum.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(bounds_ptr + 2 * b).to(tl.int32)
    end = tl.load(bounds_ptr + 2 * b + 1).to(tl.int32)
    lo = start + chunk * split_rows
    hi = tl.minimum(end, lo + split_rows)
    o_idx = (tile // n_tiles_in) * BLOCK_O + tl.arange(0, BLOCK_O)
    i_idx = (tile % n_tiles_in) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = o_idx < d_out
    i_ok = i_idx < d_in
    lanes = tl.arange(0, BLOCK_T)
    g_base = g_ptr + b.to(tl.int64) * stride_gb + o_idx[None, :] * stride_gd
    x_base = x_ptr + b.to(tl.int64) * stride_xb + i_idx[None, :] * stride_xd
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + lanes
        live = (rows < hi)[:, None]
        rows = rows.to(tl.int64)[:, None]
        g_rows = tl.load(g_base + rows * stride_gt, mask=live & o_ok[None, :], other=0.0)
        x_rows = tl.load(x_base + rows * stride_xt, mask=live & i_ok[None, :], other=0.0)
        if UPCAST:
            g_rows = g_rows.to(tl.float32)
            x_rows = x_rows.to(tl.float32)
        acc = tl.dot(tl.trans(g_rows), x_rows, acc, input_precision="ieee")
    n_tiles = tl.num_programs(0)
    if SPLIT:
        block = tl.arange(0, BLOCK_O)[:, None] * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]
        slot = ((b.to(tl.int64) * tl.num_programs(1) + chunk) * n_tiles + tile) * (BLOCK_O * BLOCK_I)
        tl.store(out_ptr + slot + block, acc)
    else:
        tl.store(out_ptr + b.to(tl.int64) * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _combine_kernel(blocks_ptr, partial_ptr, n_chunks, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program per (weight tile, sample ``b``); grid ``(n_tiles, B)``: adds the tile's ``n_chunks``
    partial fp32 blocks in chunk order, then writes the sum of squares to ``partial[b, tile]``."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    n_tiles = tl.num_programs(0)
    block = tl.arange(0, BLOCK_O)[:, None] * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for c in range(0, n_chunks):
        slot = ((b.to(tl.int64) * n_chunks + c) * n_tiles + tile) * (BLOCK_O * BLOCK_I)
        acc += tl.load(blocks_ptr + slot + block)
    tl.store(partial_ptr + b.to(tl.int64) * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


# Tuning configs per weight tile (fp32 or not), kept to what compiles for sm_90 without spills.
CONFIGS = {
    False: [
        _runtime.config(8, 3, BLOCK_T=64),
        _runtime.config(8, 4, BLOCK_T=64),
        _runtime.config(8, 4, BLOCK_T=32),
        _runtime.config(8, 3, BLOCK_T=128),
    ],
    True: [
        _runtime.config(8, 3, BLOCK_T=32),
        _runtime.config(4, 3, BLOCK_T=64),
        _runtime.config(8, 3, BLOCK_T=64),
    ],
}
_direct_tuned = (
    {}
    if _runtime.INTERPRETING
    else {
        fp32: _runtime.tuned(_direct_tile_kernel, configs, ["d_in", "d_out", "SPLIT"])
        for fp32, configs in CONFIGS.items()
    }
)

INTERPRETER_BLOCK = 16
# A row chunk of the split spans at least this many rows: shorter chunks cost more in workspace
# traffic than they gain in parallelism. Chunks start at multiples of CHUNK_ALIGN rows (a multiple of
# every BLOCK_T the tuner may pick). Smaller under the interpreter, so the CPU tests reach the split.
MIN_CHUNK_ROWS = 32 if _runtime.INTERPRETING else 256
CHUNK_ALIGN = INTERPRETER_BLOCK if _runtime.INTERPRETING else 128
# Split workspace cap (floats): 2^26 = 256 MiB.
MAX_WORKSPACE = 1 << 26


def weight_blocks(dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_O, BLOCK_I)``: fixed per dtype since they shape the grid and the buffers."""
    if _runtime.INTERPRETING:
        return INTERPRETER_BLOCK, INTERPRETER_BLOCK
    return (64, 64) if dtype == torch.float32 else (128, 128)


def choose_chunks(batch: int, n_tiles: int, longest: int, block_o: int, block_i: int, device: torch.device) -> int:
    """Row chunks per sample: 1 unless ``batch * n_tiles`` programs would fill less than two waves of
    the GPU, and then only as many as the rows, and the workspace cap, allow."""
    programs = batch * n_tiles
    wanted = math.ceil(2 * _runtime.sm_count(device) / max(1, programs))
    by_rows = longest // MIN_CHUNK_ROWS
    by_memory = MAX_WORKSPACE // max(1, programs * block_o * block_i)
    return max(1, min(wanted, by_rows, by_memory))


def linear_direct(x: torch.Tensor, g: torch.Tensor, ranges: RowRanges, chunks: int | None = None) -> torch.Tensor:
    """``chunks`` forces the number of row chunks per sample (tests); by default :func:`choose_chunks`."""
    batch, _, d_in = x.shape
    d_out = g.shape[2]
    longest = max(ranges.lengths(), default=0)
    if batch == 0 or longest == 0:
        return torch.zeros(batch, dtype=torch.float32, device=x.device)
    block_o, block_i = weight_blocks(x.dtype)
    n_in = triton.cdiv(d_in, block_i)
    n_tiles = triton.cdiv(d_out, block_o) * n_in
    if chunks is None:
        chunks = choose_chunks(batch, n_tiles, longest, block_o, block_i, x.device)
    split_rows = CHUNK_ALIGN * math.ceil(longest / (max(1, chunks) * CHUNK_ALIGN))
    chunks = math.ceil(longest / split_rows)  # no chunk left empty in the longest sample
    partial = torch.empty(batch, n_tiles, dtype=torch.float32, device=x.device)
    split = chunks > 1
    out = (
        torch.empty(batch * chunks * n_tiles * block_o * block_i, dtype=torch.float32, device=x.device)
        if split
        else partial
    )
    grid = (n_tiles, chunks, batch)
    args = (x, g, ranges.bounds, out, d_in, d_out, n_in, split_rows, *x.stride(), *g.stride())
    meta = dict(BLOCK_O=block_o, BLOCK_I=block_i, SPLIT=split, UPCAST=_runtime.upcast_for_dot(x.dtype))
    if _runtime.INTERPRETING:
        _direct_tile_kernel[grid](*args, BLOCK_T=INTERPRETER_BLOCK, **meta)
    else:
        _direct_tuned[x.dtype == torch.float32][grid](*args, **meta)
    if split:
        _combine_kernel[(n_tiles, batch)](out, partial, chunks, BLOCK_O=block_o, BLOCK_I=block_i)
    return _reduce.row_sums(partial)
