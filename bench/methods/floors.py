"""The two floors every scoring method is measured against, on the same batch and the same loss.

- ``floor-train-step``: one batched forward + backward of ``sum_b L_b`` with weight gradients (a plain
  training step without the optimizer): forward F + input-gradient backward + weight-gradient backward.
- ``floor-input-grad``: the same forward + a backward that computes input gradients only (every
  parameter frozen, the gradient taken w.r.t. the embedding output). Exact per-sample norms from
  captured activations need at least this, plus the norm work.
"""

from __future__ import annotations

import torch

from bench.methods import Prepared, Workload
from vigor.batch import completion_nll, model_logits


def prepare_train_step(work: Workload) -> Prepared:
    model, batch = work.model, work.batch
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        losses = completion_nll(model_logits(model, batch), batch)
        losses.sum().backward()
        for p in params:
            p.grad = None

    return Prepared(run, notes=["batched forward + backward with weight gradients, .grad cleared"])


def prepare_input_grad(work: Workload) -> Prepared:
    model, batch = work.model, work.batch
    flags = [(p, p.requires_grad) for p in model.parameters()]
    leaf: list[torch.Tensor] = []

    def detach_embeddings(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output.detach().requires_grad_(True)
        leaf.append(out)
        return out

    for p, _ in flags:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(detach_embeddings)

    def run() -> None:
        leaf.clear()
        with torch.enable_grad():
            losses = completion_nll(model_logits(model, batch), batch)
            torch.autograd.grad(losses.sum(), leaf)
        leaf.clear()

    def cleanup() -> None:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)

    return Prepared(run, cleanup, notes=["parameters frozen; gradient w.r.t. the embedding output only"])
