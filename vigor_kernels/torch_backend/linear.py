"""Linear-weight norms in plain PyTorch: the op-level oracle for every other backend."""

from __future__ import annotations

import torch

from vigor_kernels.ranges import RowRanges
from vigor_kernels.torch_backend._chunks import chunk, flat_dot, sample_rows


def _ghost_one(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_{t,s} (x_t . x_s)(g_t . g_s)`` for one sample by row blocks ``i``: the diagonal block once,
    the blocks right of it twice (symmetry); a temporary is ``[c, T]``, never ``[T, T]``."""
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    step = chunk(n, 2 * n)
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        xi, gi = x[i0:i1], g[i0:i1]
        total += flat_dot(xi @ xi.T, gi @ gi.T)
        if i1 < n:
            total += 2.0 * flat_dot(xi @ x[i1:].T, gi @ g[i1:].T)
    return total


def _direct_one(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||G^T X||_F^2`` for one sample, ``c`` output features at a time: temporaries ``[c, d_in]``."""
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    step = chunk(g.shape[1], x.shape[1])
    for o0 in range(0, g.shape[1], step):
        block = g[:, o0 : o0 + step].T @ x
        total += flat_dot(block, block)
    return total


def _per_sample(fn, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    out = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for b, (xb, gb) in sample_rows(ranges, x, g):
        out[b] = fn(xb, gb)
    return out


def linear_ghost(x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    return _per_sample(_ghost_one, x, g, ranges)


def linear_direct(x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    return _per_sample(_direct_one, x, g, ranges)
