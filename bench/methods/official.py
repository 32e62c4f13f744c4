"""The official VIGOR computation: one completion at a time, HF ``labels`` loss, one ``autograd.grad``.

For each completion b: a forward of its row alone with ``labels`` = its completion tokens (``-100``
elsewhere), so the loss is transformers' mean next-token NLL over those tokens (= ``L_b``), then
``torch.autograd.grad(loss, theta)`` -- a parameter-sized gradient per completion -- and its L2 norm.
The row keeps its place in the batch (left padding and positions unchanged) and is cut after its last
completion token: right padding never changes a causal LM's earlier outputs, so a sensible loop does
not pay for it. Squared norms are accumulated in float64 (see ``row_sq_norms``): this is the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.methods import Prepared, Workload, row_sq_norms
from vigor.batch import TokenBatch


def official_loop(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(norms [B] float32, {parameter name: squared norm [B] float64})`` over theta = every parameter
    with ``requires_grad``; a completion with no loss token gets 0."""
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = batch.input_ids.device
    sq = {n: torch.zeros(batch.size, dtype=torch.float64, device=device) for n in theta}
    for b in range(batch.size):
        if int(batch.token_counts[b]) == 0:
            continue
        end = batch.ranges.host[b][1] + 1  # one past the last completion token
        ids = batch.input_ids[b : b + 1, :end]
        labels = ids.masked_fill(~batch.loss_mask[b : b + 1, :end], -100)
        with torch.enable_grad():
            out = model(input_ids=ids, attention_mask=batch.attention_mask[b : b + 1, :end], labels=labels)
            grads = torch.autograd.grad(out.loss, list(theta.values()), allow_unused=True)
        for name, g in zip(theta, grads, strict=True):
            if g is not None:
                sq[name][b] = row_sq_norms(g[None])[0]
        del out, grads
    total = torch.stack(list(sq.values())).sum(0)
    return total.sqrt().float(), sq


def prepare(work: Workload) -> Prepared:
    held: dict[str, object] = {}

    def run() -> torch.Tensor:
        norms, sq = official_loop(work.model, work.batch)
        held["sq"] = sq
        return norms

    def facts() -> dict:
        work.official_sq = held["sq"]  # type: ignore[assignment]
        return {}

    return Prepared(run, facts=facts, notes=["one forward + autograd.grad per completion, row cut at its end"])
