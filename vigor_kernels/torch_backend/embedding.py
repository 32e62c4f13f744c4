"""Embedding norms and the tied head-row gather in plain PyTorch."""

from __future__ import annotations

import torch

from vigor_kernels.ranges import RowRanges
from vigor_kernels.torch_backend._chunks import chunk, sample_rows


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
    """``P[b, t] = sum_s G[b, s, id_t] h[b, s]`` per sample, ``c`` tokens at a time: ``[T_b, c]`` temporaries.

    Columns are gathered from the logits gradient in its own dtype (an fp32 copy of ``[T, V]`` would
    dwarf everything else) and only then upcast.
    """
    out = torch.zeros(*h.shape, dtype=torch.float32, device=h.device)
    for b, (hb,) in sample_rows(ranges, h):
        start, end = ranges.host[b]
        rows, grad = end - start, g_head[b, start:end]
        ids_b = ids[b, start:end]
        step = chunk(rows, 2 * rows)
        for t0 in range(0, rows, step):
            cols = ids_b[t0 : t0 + step]
            picked = grad[:, cols.clamp_min(0)].float()  # [rows, c]: G[s, id_t]
            out[b, start + t0 : start + t0 + cols.shape[0]] = torch.where((cols >= 0)[:, None], picked.T @ hb, 0.0)
    return out
