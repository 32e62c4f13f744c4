"""Naive float64 formulas: each per-sample gradient formed explicitly, then its squared norm.

Deliberately nothing clever (no Gram trick, no chunking): the op tests hold every backend to these.
"""

from __future__ import annotations

import itertools

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


def head(h, weight, bias, targets, offsets, w, scale=1.0, softcap=None):
    """Fused-LM-head reference: full float64 logits, their softmax gradient, each sample's head weight
    gradient ``G_b^T H_b`` formed whole. Returns a dict of per-row and per-sample float64 results."""
    hd, wd = h.double(), weight.double()
    raw = hd @ wd.T + (0.0 if bias is None else bias.double())
    u = scale * raw
    z = u if softcap is None else softcap * torch.tanh(u / softcap)
    slope = scale * (1.0 if softcap is None else 1.0 - torch.tanh(u / softcap) ** 2)
    logp = torch.log_softmax(z, dim=1)
    rows = torch.arange(h.shape[0])
    onehot = torch.zeros_like(z)
    onehot[rows, targets] = 1.0
    g = w.double()[:, None] * (logp.exp() - onehot) * slope
    nll_row = -logp[rows, targets]
    out = {"lse": torch.logsumexp(z, 1), "logit_sum": z.sum(1), "grad_h": g @ wd, "g": g, "weight_grads": []}
    nll, weight_sq, bias_sq = [], [], []
    for a, e in itertools.pairwise(offsets):
        grad_w = g[a:e].T @ hd[a:e]
        out["weight_grads"].append(grad_w)
        nll.append(float((w.double()[a:e] * nll_row[a:e]).sum()))
        weight_sq.append(float(grad_w.square().sum()))
        bias_sq.append(float(g[a:e].sum(0).square().sum()))
    out.update(nll=f64(nll), weight_sq=f64(weight_sq), bias_sq=f64(bias_sq))
    out["weight_grad"] = g.T @ hd
    out["bias_grad"] = g.sum(0)
    return out


def head_tied_rows(weight_grads, ids):
    """``R[b, u] = (G_b^T H_b)[ids[b, u]]`` (0 where ids < 0) from the whole per-sample weight gradients."""
    out = torch.zeros(ids.shape[0], ids.shape[1], weight_grads[0].shape[1], dtype=torch.float64)
    for b, grad_w in enumerate(weight_grads):
        for u in range(ids.shape[1]):
            if int(ids[b, u]) >= 0:
                out[b, u] = grad_w[int(ids[b, u])]
    return out
