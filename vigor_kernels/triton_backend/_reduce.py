"""Deterministic final reductions: per-tile partial sums -> one float32 per sample, in a fixed order.

Every kernel of this backend writes one partial per program instance into a buffer instead of adding
into the output with atomics (whose order, and so whose rounding, changes run to run); these kernels
then add each sample's partials in the same order every time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256


@triton.jit
def _segment_sum_kernel(values_ptr, offsets_ptr, out_ptr, row_len, HAS_OFFSETS: tl.constexpr, BLOCK: tl.constexpr):
    """``out[s] = sum(values[lo_s:hi_s])`` with ``[lo_s, hi_s)`` = ``offsets[s:s+2]`` (or ``s * row_len``
    onward when there are no offsets). One program per segment: a ``BLOCK``-wide fp32 accumulator walks
    the segment front to back, then a fixed tree sum: the same order, hence the same bits, every run."""
    seg = tl.program_id(0)
    if HAS_OFFSETS:
        lo = tl.load(offsets_ptr + seg)
        hi = tl.load(offsets_ptr + seg + 1)
    else:
        lo = seg.to(tl.int64) * row_len
        hi = lo + row_len
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(lo, hi, BLOCK):
        idx = start + lanes
        acc += tl.load(values_ptr + idx, mask=idx < hi, other=0.0)
    tl.store(out_ptr + seg, tl.sum(acc, axis=0))


def row_sums(partials: torch.Tensor) -> torch.Tensor:
    """``partials.sum(1)`` for a contiguous float32 ``[B, P]`` buffer, deterministically."""
    batch, width = partials.shape
    out = torch.empty(batch, dtype=torch.float32, device=partials.device)
    if batch:
        _segment_sum_kernel[(batch,)](partials, partials, out, width, HAS_OFFSETS=False, BLOCK=_BLOCK)
    return out


def segment_sums(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[values[offsets[s]:offsets[s+1]].sum() for s]`` for float32 ``values`` and int64 ``offsets``."""
    count = offsets.numel() - 1
    out = torch.empty(count, dtype=torch.float32, device=values.device)
    if count:
        _segment_sum_kernel[(count,)](values, offsets, out, 0, HAS_OFFSETS=True, BLOCK=_BLOCK)
    return out
