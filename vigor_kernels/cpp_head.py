"""The fused LM head's elementwise work on fp32 logits chunks as the cpp backend's two C++ kernels
(csrc/cpu/head.cpp); the tiling, the GEMMs (oneDNN / MKL through torch) and the per-sample sums are the
torch backend's (vigor_kernels/torch_backend/head.py), as for the Triton kernels.

- ``head_finish_stats``: ``z <- f(z + bias)`` in place and per row the max, the sum of ``exp(z - max)``
  (each exp in fp32, summed in double), the target's logit and the sum of ``z`` (double): two sweeps of each
  row (the second from cache) instead of the torch ops' half-dozen passes over the chunk.
- ``head_to_grad``: ``z <- w_t (exp(z - lse_t) - [v = y_t]) * scale * (1 - (z / softcap)^2)`` in place, a raw
  (recomputed) chunk transformed first.

Rows are split over the OpenMP threads; each row is one vectorized loop of the best ISA copy for this CPU
(a polynomial exp within ~1 ulp of expf, 0 for very negative inputs, a tanh finite for any input). Every
call passes :func:`vigor_kernels.compiled.marshal_logits_chunk`.
"""

from __future__ import annotations

import torch

from vigor_kernels import compiled
from vigor_kernels.torch_backend import head as torch_head

NAME = "cpp"


def _ext():
    return compiled.extension(NAME, compiled.import_failure())


class CppElementwise(torch_head.Elementwise):
    """:class:`torch_head.Elementwise` with each step one C++ kernel over the chunk."""

    def finish(self, z, bias, scale, softcap) -> None:
        raise NotImplementedError("the cpp head kernels finish logits inside finish_stats / to_grad")

    def finish_stats(self, z, bias, scale, softcap, targets, v0, want_sum):
        """As :meth:`torch_head.Elementwise.finish_stats`; an empty chunk (no columns) gives the identity of
        the chunk combination: max ``-inf``, sums 0."""
        call = compiled.marshal_logits_chunk(NAME, "cpu", z, targets, bias=bias, scale=scale, softcap=softcap)
        n, n_cols = z.shape
        m = torch.full((n,), -torch.inf, dtype=torch.float32)
        total = torch.zeros(n, dtype=torch.float64)
        zt = torch.zeros(n, dtype=torch.float32)
        zsum = torch.zeros(n, dtype=torch.float64) if want_sum else None
        if n and n_cols:
            _ext().head_finish_stats(
                z.data_ptr(), n, n_cols, call.row_stride, _ptr(call.bias), call.bias_code, call.scale,
                call.softcap is not None, call.softcap or 1.0, call.targets.data_ptr(), int(v0), m.data_ptr(),
                total.data_ptr(), zt.data_ptr(), _ptr(zsum),
            )  # fmt: skip
        return m, total, zt, zsum

    def to_grad(self, z, lse, w, targets, v0, scale, softcap, raw_bias=None, raw=False) -> None:
        bias = raw_bias if raw else None
        call = compiled.marshal_logits_chunk(NAME, "cpu", z, targets, bias=bias, scale=scale, softcap=softcap)
        lse = compiled.row_vector(NAME, call, "lse", lse)
        w = compiled.row_vector(NAME, call, "row weights", w)
        n, n_cols = z.shape
        if n and n_cols:
            _ext().head_to_grad(
                z.data_ptr(), n, n_cols, call.row_stride, _ptr(call.bias), call.bias_code, bool(raw), call.scale,
                call.softcap is not None, call.softcap or 1.0, lse.data_ptr(), w.data_ptr(),
                call.targets.data_ptr(), int(v0),
            )  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


HEAD = torch_head.HeadWith(CppElementwise)  # the cpp backend's head_pass / head_tied_rows
