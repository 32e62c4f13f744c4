"""Embedding-table norms, and the LM-head rows that make the tied embedding/head cross term.

Embedding: the gradient of sample b is the table of segment sums ``S_v = sum_{t: id_t = v} g_t`` and its
squared norm is ``sum_v ||S_v||^2``. Sorting the (sample, id) keys puts each segment's rows next to
each other, so one program per segment sums them in token order: no atomics, no vocab-sized buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vigor_kernels.ranges import RowRanges
from vigor_kernels.triton_backend import _reduce, _runtime

# Sort key of a live token: sample << KEY_SHIFT | id (token ids are far below 2^40); dead tokens (out of
# range, or id -1) get batch << KEY_SHIFT, which sorts after every live one.
KEY_SHIFT = 40


@triton.jit
def _segment_sq_kernel(
    g_ptr, keys_ptr, order_ptr, seg_end_ptr, partial_ptr, length, width, dead_key,
    stride_gb, stride_gt, stride_gd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per position ``p`` of the sorted keys; grid ``(B * T,)``.

    The program at the first position of a live segment (a run of equal (sample, id) keys, ending at
    ``seg_end[p]``) gathers the segment's rows of g (``order`` maps a sorted position to ``b * T + t``),
    sums them ``BLOCK_R`` rows by ``BLOCK_D`` features at a time in fp32, and writes ``||S_v||^2`` to
    ``partial[p]``. Every other program writes 0. Stable sorting keeps each segment in token order, so
    the summation order, and the result, are the same every run.
    """
    p = tl.program_id(0)
    key = tl.load(keys_ptr + p)
    prev = tl.load(keys_ptr + p - 1, mask=p > 0, other=-1)
    total = tl.zeros((), dtype=tl.float32)
    if (key != prev) & (key < dead_key):
        end = tl.load(seg_end_ptr + p).to(tl.int32)
        lanes = tl.arange(0, BLOCK_R)
        for d0 in range(0, width, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = (cols < width)[None, :]
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            for r0 in range(p, end, BLOCK_R):
                pos = r0 + lanes
                ok = pos < end
                flat = tl.load(order_ptr + pos, mask=ok, other=0)
                row = (flat // length) * stride_gb + (flat % length) * stride_gt
                ptrs = g_ptr + row[:, None] + cols[None, :] * stride_gd
                acc += tl.load(ptrs, mask=ok[:, None] & col_ok, other=0.0).to(tl.float32)
            seg = tl.sum(acc, axis=0)
            total += tl.sum(seg * seg, axis=0)
    tl.store(partial_ptr + p, total)


def embedding(ids: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    batch, length = ids.shape
    device = g.device
    if batch * length == 0:
        return torch.zeros(batch, dtype=torch.float32, device=device)
    live = ranges.row_mask(length, device) & (ids >= 0)
    sample = torch.arange(batch, device=device, dtype=torch.int64)
    keys = torch.where(live, (sample[:, None] << KEY_SHIFT) | ids, batch << KEY_SHIFT).reshape(-1)
    keys, order = torch.sort(keys, stable=True)
    seg_end = torch.searchsorted(keys, keys, right=True)
    offsets = torch.searchsorted(keys, torch.arange(batch + 1, device=device, dtype=torch.int64) << KEY_SHIFT)
    partial = torch.empty(batch * length, dtype=torch.float32, device=device)
    block_r, block_d = (16, 16) if _runtime.INTERPRETING else (8, 128)
    _segment_sq_kernel[(batch * length,)](
        g, keys, order, seg_end, partial, length, g.shape[2], batch << KEY_SHIFT, *g.stride(),
        BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return _reduce.segment_sums(partial, offsets)


@triton.jit
def _tied_rows_kernel(
    ids_ptr, h_ptr, gh_ptr, bounds_ptr, out_ptr, width,
    stride_ib, stride_it, stride_hb, stride_ht, stride_hd, stride_gb, stride_gt, stride_gv,
    stride_ob, stride_ot, stride_od,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``P[b, t] = sum_s G[b, s, id_t] h[b, s]``. One program per (token tile, feature chunk, sample b);
    grid ``(ceil(T_max / BLOCK_T), ceil(d / BLOCK_D), B)``.

    Token tiles are counted from the sample's first valid row; tiles past its end do nothing (the
    output is zero there). A live program gathers ``A[t, s] = G[b, s, id_t]`` for its ``BLOCK_T`` tokens
    ``BLOCK_S`` valid rows ``s`` at a time and accumulates ``tl.dot(A, H[s, chunk])`` in fp32; tokens with
    id -1 gather zeros, so their rows come out 0.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(bounds_ptr + 2 * b).to(tl.int32)
    end = tl.load(bounds_ptr + 2 * b + 1).to(tl.int32)
    first = start + tile * BLOCK_T
    if first < end:
        rows_t = first + tl.arange(0, BLOCK_T)
        t_ok = rows_t < end
        rows_t = rows_t.to(tl.int64)
        tok = tl.load(ids_ptr + b.to(tl.int64) * stride_ib + rows_t * stride_it, mask=t_ok, other=-1)
        t_live = t_ok & (tok >= 0)
        tok = tl.where(t_live, tok, 0)
        cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < width
        lanes = tl.arange(0, BLOCK_S)
        a_base = gh_ptr + b.to(tl.int64) * stride_gb + tok[:, None] * stride_gv
        h_base = h_ptr + b.to(tl.int64) * stride_hb + cols[None, :] * stride_hd
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            rows_s = s0 + lanes
            s_ok = rows_s < end
            rows_s = rows_s.to(tl.int64)
            a = tl.load(a_base + rows_s[None, :] * stride_gt, mask=t_live[:, None] & s_ok[None, :], other=0.0)
            hs = tl.load(h_base + rows_s[:, None] * stride_ht, mask=s_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                hs = hs.to(tl.float32)
            acc = tl.dot(a, hs, acc, input_precision="ieee")
        out = out_ptr + b.to(tl.int64) * stride_ob + rows_t[:, None] * stride_ot + cols[None, :] * stride_od
        tl.store(out, acc, mask=t_ok[:, None] & col_ok[None, :])


def tied_head_rows(ids: torch.Tensor, h: torch.Tensor, g_head: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    batch, length, width = h.shape
    out = torch.zeros(batch, length, width, dtype=torch.float32, device=h.device)
    longest = max(ranges.lengths(), default=0)
    if batch == 0 or longest == 0:
        return out
    # fp32 holds twice the bytes per gathered tile: a narrower feature chunk keeps it within registers
    block_t, block_s, block_d = (
        (16, 16, 16) if _runtime.INTERPRETING else (64, 64, 64 if h.dtype == torch.float32 else 128)
    )
    grid = (triton.cdiv(longest, block_t), triton.cdiv(width, block_d), batch)
    _tied_rows_kernel[grid](
        ids, h, g_head, ranges.bounds, out, width, *ids.stride(), *h.stride(), *g_head.stride(), *out.stride(),
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, UPCAST=_runtime.upcast_for_dot(h.dtype), num_warps=4,
    )  # fmt: skip
    return out
