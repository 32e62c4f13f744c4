"""Embedding norms and the tied head-row gather in plain PyTorch."""

from __future__ import annotations

import torch

from vigor_kernels.ranges import RowRanges
from vigor_kernels.torch_backend._chunks import chunk, masked_window


def embedding(ids: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """Segment-sum the rows of g by (sample, token id), then sum the squares of the segments."""
    batch = ids.shape[0]
    out = torch.zeros(batch, dtype=torch.float32, device=g.device)
    live = ranges.row_mask(ids.shape[1], ids.device) & (ids >= 0)
    b_idx, t_idx = live.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return out
    pairs = torch.stack([b_idx, ids[b_idx, t_idx]], dim=1)
    uniq, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    sums = torch.zeros(uniq.shape[0], g.shape[-1], dtype=torch.float32, device=g.device)
    sums.index_add_(0, inverse, g[b_idx, t_idx].float())
    return out.index_add_(0, uniq[:, 0], sums.square().sum(-1))


def tied_head_rows(ids: torch.Tensor, h: torch.Tensor, g_head: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
    """``P[b, t] = sum_s G[b, s, id_t] h[b, s]``, gathered ``c`` tokens at a time: ``[B, W, c]`` temporaries."""
    batch, length, d = h.shape
    out = torch.zeros(batch, length, d, dtype=torch.float32, device=h.device)
    lo, hi = ranges.window()
    if hi <= lo:
        return out
    # Gather from the logits gradient in its own dtype: an fp32 copy of [B, T, V] would dwarf the rest.
    hw, gw = masked_window(h, ranges), g_head[:, lo:hi]
    in_range = ranges.row_mask(length, ids.device)[:, lo:hi]
    live = in_range & (ids[:, lo:hi] >= 0)
    width = hi - lo
    step = chunk(width, 2 * batch * width)
    for t0 in range(0, width, step):
        t1 = min(t0 + step, width)
        cols = ids[:, lo + t0 : lo + t1].clamp_min(0)
        picked = torch.gather(gw, 2, cols[:, None, :].expand(batch, width, t1 - t0)).float()
        picked = torch.where(in_range[..., None], picked, 0.0)
        rows = torch.bmm(picked.transpose(1, 2), hw)
        out[:, lo + t0 : lo + t1] = torch.where(live[:, t0:t1, None], rows, 0.0)
    return out
