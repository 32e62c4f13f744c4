"""Linear-weight norms in plain PyTorch: the op-level oracle for every other backend."""

from __future__ import annotations

import torch

from vigor_kernels.ranges import RowRanges
from vigor_kernels.torch_backend._chunks import chunk, masked_window


def linear_ghost(x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """``sum_{t,s} (x_t . x_s)(g_t . g_s)`` by row blocks ``i``: the diagonal block once, the blocks
    right of it twice (symmetry), so a temporary is ``[B, c, W]`` and never ``[B, W, W]``."""
    xw, gw = masked_window(x, ranges), masked_window(g, ranges)
    batch, width = xw.shape[0], xw.shape[1]
    out = torch.zeros(batch, dtype=torch.float32, device=x.device)
    step = chunk(width, 2 * batch * width)
    for i0 in range(0, width, step):
        i1 = min(i0 + step, width)
        xi, gi = xw[:, i0:i1], gw[:, i0:i1]
        out += (torch.bmm(xi, xi.transpose(1, 2)) * torch.bmm(gi, gi.transpose(1, 2))).sum((1, 2))
        if i1 < width:
            xx = torch.bmm(xi, xw[:, i1:].transpose(1, 2))
            gg = torch.bmm(gi, gw[:, i1:].transpose(1, 2))
            out += 2.0 * (xx * gg).sum((1, 2))
    return out


def linear_direct(x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """``||G^T X||_F^2`` formed ``c`` output features at a time: temporaries ``[B, c, d_in]``."""
    xw, gw = masked_window(x, ranges), masked_window(g, ranges)
    batch, d_out = gw.shape[0], gw.shape[2]
    out = torch.zeros(batch, dtype=torch.float32, device=x.device)
    step = chunk(d_out, batch * xw.shape[2])
    for o0 in range(0, d_out, step):
        block = torch.bmm(gw[:, :, o0 : o0 + step].transpose(1, 2), xw)
        out += block.square().sum((1, 2))
    return out
