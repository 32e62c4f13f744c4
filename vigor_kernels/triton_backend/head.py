"""The fused LM head's elementwise work on fp32 logits chunks, as two Triton kernels; the tiling, the GEMMs
(cuBLAS through torch) and the per-sample sums are the torch backend's (vigor_kernels/torch_backend/head.py).

On a chunk ``z`` ``[n, c]`` (columns ``v0...`` of the vocabulary) of raw products ``h W^T``:

Bias chunks arrive as views starting at column ``v0`` (``bias[v0:v0 + c]``), targets as vocabulary ids.

- ``_finish_stats_kernel``: ``z <- f(z + bias)`` (``f(u) = softcap * tanh(scale * u / softcap)`` or
  ``scale * u``) written back in place, and per row the chunk's max, sum of ``exp(z - max)`` (online over
  column blocks), sum of ``z`` and the target's logit: one read and one write of ``z`` instead of the
  half-dozen passes of the torch ops.
- ``_grad_kernel``: ``z <- w_t (exp(z - lse_t) - [v = y_t]) * scale * (1 - (z / softcap)^2)`` in place, the
  gradient w.r.t. the raw logits.

Accumulation is fp32 inside a chunk; the torch side combines chunks in fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vigor_kernels.torch_backend import head as torch_head
from vigor_kernels.triton_backend import _runtime

LOWEST: tl.constexpr = -1e30  # below any logit, finite: exp(LOWEST - m) = 0 without inf arithmetic


@triton.jit
def _tanh(x):
    """tanh from exp (no tanh in the interpreter): ``1 - 2 / (exp(2x) + 1)``; beyond |x| = 15 tanh is +-1
    in fp32, so x is clamped there (no overflow to inf)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(tl.maximum(x, -15.0), 15.0)) + 1.0)


@triton.jit
def _finish_stats_kernel(
    z_ptr, bias_ptr, targets_ptr, m_ptr, s_ptr, zt_ptr, zsum_ptr, n_cols, stride_z, v0, scale, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per row ``t``; grid ``(n,)``. Walks the row ``BLOCK_V`` columns at a time: transforms
    them in place, keeps a running max ``m`` and ``sum exp(z - m)`` (rescaled when ``m`` grows), the sum
    of ``z`` and the logit at column ``y_t - v0`` (0 if outside the chunk); writes the four per-row values."""
    t = tl.program_id(0).to(tl.int64)
    row = z_ptr + t * stride_z
    local = tl.load(targets_ptr + t) - v0
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), LOWEST, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    zsum = tl.zeros((BLOCK_V,), tl.float32)
    zt = tl.zeros((BLOCK_V,), tl.float32)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + lanes
        ok = cols < n_cols
        z = tl.load(row + cols, mask=ok, other=0.0)
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        z = z * scale
        if SOFTCAP:
            z = softcap * _tanh(z / softcap)
        tl.store(row + cols, z, mask=ok)
        # masked lanes hold the finite LOWEST, not -inf, so that no inf - inf is ever formed
        m_new = tl.maximum(m, tl.where(ok, z, LOWEST))
        s = s * tl.exp(m - m_new) + tl.exp(tl.where(ok, z - m_new, LOWEST))
        m = m_new
        zsum += tl.where(ok, z, 0.0)
        zt += tl.where(cols == local, z, 0.0)
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)
    tl.store(m_ptr + t, row_max)
    tl.store(s_ptr + t, total)
    tl.store(zsum_ptr + t, tl.sum(zsum, axis=0))
    tl.store(zt_ptr + t, tl.sum(zt, axis=0))


@triton.jit
def _grad_kernel(
    z_ptr, bias_ptr, lse_ptr, w_ptr, targets_ptr, n_cols, stride_z, v0, scale, softcap,
    RAW: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One program per (row ``t``, column block ``j``); grid ``(n, ceil(c / BLOCK_V))``: turns the block's
    logits into ``G`` in place; ``RAW`` blocks (recomputed products) are transformed first."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < n_cols
    ptrs = z_ptr + t * stride_z + cols
    z = tl.load(ptrs, mask=ok, other=0.0)
    if RAW:
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        z = z * scale
        if SOFTCAP:
            z = softcap * _tanh(z / softcap)
    g = tl.exp(z - tl.load(lse_ptr + t)) - tl.where(cols == tl.load(targets_ptr + t) - v0, 1.0, 0.0)
    g = g * (tl.load(w_ptr + t) * scale)
    if SOFTCAP:
        r = z / softcap
        g = g * (1.0 - r * r)
    tl.store(ptrs, g, mask=ok)


def _block(n_cols: int) -> int:
    return 128 if _runtime.INTERPRETING else min(1024, triton.next_power_of_2(max(16, n_cols)))


class TritonElementwise(torch_head.Elementwise):
    """:class:`torch_head.Elementwise` with each step one kernel over the chunk."""

    @staticmethod
    def _check(z: torch.Tensor) -> None:
        if z.dtype != torch.float32 or (z.numel() and z.stride(1) != 1):
            raise ValueError("the triton head kernels take fp32 logits chunks with unit column stride")

    def finish(self, z, bias, scale, softcap) -> None:
        raise NotImplementedError("the triton head kernels finish logits inside finish_stats / to_grad")

    def finish_stats(self, z, bias, scale, softcap, targets, v0, want_sum):
        self._check(z)
        n, n_cols = z.shape
        out = torch.zeros(4, n, dtype=torch.float32, device=z.device)
        if n and n_cols:
            _finish_stats_kernel[(n,)](
                z, z if bias is None else bias, targets, out[0], out[1], out[2], out[3], n_cols, z.stride(0),
                v0, float(scale), float(softcap or 1.0),
                HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, BLOCK_V=_block(n_cols),
            )  # fmt: skip
        return out[0], out[1].double(), out[2], (out[3].double() if want_sum else None)

    def to_grad(self, z, lse, w, targets, v0, scale, softcap, raw_bias=None, raw=False) -> None:
        self._check(z)
        n, n_cols = z.shape
        if n and n_cols:
            block = _block(min(n_cols, 1024))
            _grad_kernel[(n, triton.cdiv(n_cols, block))](
                z, z if raw_bias is None else raw_bias, lse.float().contiguous(), w.contiguous(), targets, n_cols,
                z.stride(0), v0, float(scale), float(softcap or 1.0),
                RAW=raw, HAS_BIAS=raw and raw_bias is not None, SOFTCAP=softcap is not None, BLOCK_V=block,
            )  # fmt: skip


HEAD = torch_head.HeadWith(TritonElementwise)  # the triton backend's head_pass / head_tied_rows
