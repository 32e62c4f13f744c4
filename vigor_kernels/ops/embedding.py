"""Per-sample squared norms of embedding-table gradients, and the tied embedding/LM-head cross term."""

from __future__ import annotations

import torch

from vigor_kernels._checks import check_features, check_ids, check_leading, check_same_device, common_dtype
from vigor_kernels.errors import VigorInputError
from vigor_kernels.ops._common import prepare
from vigor_kernels.ops.reductions import row_dot
from vigor_kernels.ranges import RowRanges


def _gradient_ids(ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """ids with ``-1`` where the token's row receives no gradient (``nn.Embedding(padding_idx=...)``)."""
    if (ids < 0).any():
        raise VigorInputError("ids must be non-negative token ids")
    ids = ids.to(torch.int64)
    if padding_idx is None:
        return ids.contiguous()
    return torch.where(ids == padding_idx, -1, ids).contiguous()


def embedding_sq_norms(
    ids: torch.Tensor,
    g: torch.Tensor,
    ranges: RowRanges | torch.Tensor | None = None,
    *,
    padding_idx: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum_v ||sum_{t: id_t = v} g_t||^2`` per sample (= ``sum_{t,s: id_t = id_s} g_t . g_s``), float32 ``[B]``.

    ids: ``[B, T]`` token ids; g: gradient w.r.t. the embedding output ``[B, T, d]``. Tokens equal to
    ``padding_idx`` get no gradient, as in ``nn.Embedding``.
    """
    ids = check_ids("ids", ids)
    g = check_features("g", g, 3)
    device = check_same_device(ids=ids, g=g)
    check_leading(tuple(ids.shape), g=g)
    rows, be = prepare(ranges, g.shape[0], g.shape[1], device, g.dtype, backend)
    return be.embedding(_gradient_ids(ids, padding_idx), g, rows)


def tied_head_rows(
    ids: torch.Tensor,
    h: torch.Tensor,
    g_head: torch.Tensor,
    ranges: RowRanges | torch.Tensor | None = None,
    *,
    padding_idx: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``P_{b,t} = sum_s G_head[b, s, id_{b,t}] h_{b,s}``: row ``id_t`` of sample b's LM-head weight
    gradient ``G^T H``, for each of its own input tokens; float32 ``[B, T, d]`` (zero at rows outside
    ``ranges`` and at ``padding_idx`` tokens).

    With a weight shared by the input embedding and the LM head, the per-sample gradient is
    ``G^T H + S`` (S the embedding gradient) and its squared norm has the cross term
    ``2 <G^T H, S> = 2 sum_t g_emb_t . P_t``: this op is the head half of it, computed while ``G`` is
    alive, so the engine never keeps the ``[B, T, V]`` logits gradient around.
    """
    ids = check_ids("ids", ids)
    h = check_features("h", h, 3)
    g_head = check_features("g_head", g_head, 3)
    device = check_same_device(ids=ids, h=h, g_head=g_head)
    dtype = common_dtype(h=h, g_head=g_head)
    check_leading(tuple(ids.shape), h=h, g_head=g_head)
    rows, be = prepare(ranges, h.shape[0], h.shape[1], device, dtype, backend)
    ids = _gradient_ids(ids, padding_idx)
    if ids.numel() and int(ids.max()) >= g_head.shape[-1]:
        raise VigorInputError(f"ids reach {int(ids.max())} but g_head has only {g_head.shape[-1]} columns (vocab)")
    return be.tied_head_rows(ids, h, g_head, rows)


def tied_cross_term(
    ids: torch.Tensor,
    g_emb: torch.Tensor,
    h: torch.Tensor,
    g_head: torch.Tensor,
    ranges: RowRanges | torch.Tensor | None = None,
    *,
    padding_idx: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``2 <G_head^T H, S_emb>`` per sample, float32 ``[B]``: what tying adds to
    ``||G_head^T H||^2 + ||S_emb||^2``. Dropping it gives a wrong norm for every tied model."""
    p = tied_head_rows(ids, h, g_head, ranges, padding_idx=padding_idx, backend=backend)
    return 2.0 * row_dot(g_emb, p, ranges)
