"""Naive float64 formulas: each per-sample gradient formed explicitly, then its squared norm.

Deliberately nothing clever (no Gram trick, no chunking): the op tests hold every backend to these.
"""

from __future__ import annotations

import torch


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def rows(t: torch.Tensor, b: int, span: tuple[int, int]) -> torch.Tensor:
    """Sample b's valid rows, extra dims folded in, as float64 ``[rows, d]``."""
    s, e = span
    return t[b, s:e].double().reshape(-1, t.shape[-1])


def linear(x, g, spans):
    return f64([(rows(g, b, sp).T @ rows(x, b, sp)).square().sum().item() for b, sp in enumerate(spans)])


def bias(g, spans):
    return f64([rows(g, b, sp).sum(0).square().sum().item() for b, sp in enumerate(spans)])


def norm_weight(g, xhat, spans):
    return f64([(rows(g, b, sp) * rows(xhat, b, sp)).sum(0).square().sum().item() for b, sp in enumerate(spans)])


def embedding_grad(ids, g, b, span, vocab, padding_idx=None):
    s, e = span
    table = torch.zeros(vocab, g.shape[-1], dtype=torch.float64)
    for t in range(s, e):
        if int(ids[b, t]) != padding_idx:
            table[int(ids[b, t])] += g[b, t].double()
    return table


def embedding(ids, g, spans, vocab, padding_idx=None):
    return f64([embedding_grad(ids, g, b, sp, vocab, padding_idx).square().sum().item() for b, sp in enumerate(spans)])


def tied_cross(ids, g_emb, h, g_head, spans, padding_idx=None):
    vocab = g_head.shape[-1]
    out = []
    for b, sp in enumerate(spans):
        head = rows(g_head, b, sp).T @ rows(h, b, sp)
        out.append(2.0 * (head * embedding_grad(ids, g_emb, b, sp, vocab, padding_idx)).sum().item())
    return f64(out)
