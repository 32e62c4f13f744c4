"""The oracle: the official VIGOR computation, one completion at a time with a full ``autograd.grad``.

Slow by design (a parameter-sized gradient per completion) and obviously right; tests and
``vigor verify`` hold the engine to it. Same batch rows (same padding, same positions), same loss, same
eval mode as the engine; squared norms accumulated in float64. On an FSDP2-sharded model the whole
parameters are gathered first (``vigor.sharding.full_parameters``), which costs the whole model's memory.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vigor.batch import completion_nll, model_logits, prepare_batch
from vigor.model_state import preserved
from vigor.params import select_params
from vigor.sharding import full_parameters


def oracle_grad_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_mask: torch.Tensor,
    *,
    params: Iterable[nn.Parameter] | Iterable[str] | None = None,
    per_param: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same contract as :func:`vigor.per_sample_grad_norms`, computed by a per-completion loop."""
    batch = prepare_batch(model, input_ids, attention_mask, loss_mask)
    names = list(select_params(model, params))
    # A sharded model's forward uses gathered copies of its parameters, not the shards ``named_parameters``
    # lists outside it: autograd w.r.t. the shards would be zero. Gathered, the names list the copies.
    with full_parameters(model):
        return _oracle(model, batch, select_params(model, names), per_param)


def _oracle(model: nn.Module, batch, theta: dict[str, nn.Parameter], per_param: bool):
    device = batch.input_ids.device
    sq = {n: torch.zeros(batch.size, dtype=torch.float64, device=device) for n in theta}
    with preserved(model):
        for p in theta.values():
            p.requires_grad_(True)
        for b in range(batch.size):
            if int(batch.token_counts[b]) == 0:
                continue
            row = batch.row(b)
            with torch.enable_grad():
                loss = completion_nll(model_logits(model, row), row)[0]
                grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
            for n, g in zip(theta, grads, strict=True):
                if g is not None:
                    sq[n][b] = g.double().square().sum()
    total = torch.zeros(batch.size, dtype=torch.float64, device=device)
    for v in sq.values():
        total += v
    norms = total.sqrt().float()
    return (norms, {n: v.float() for n, v in sq.items()}) if per_param else norms
