"""torch.func: ``vmap(grad(per-sample loss))`` over the batch, then the norm of each per-sample gradient.

This materializes every per-sample gradient (parameters x samples), so the memory is estimated first:
if the whole batch does not fit under ``--func-max-gib`` the batch is processed in chunks of as many
samples as fit, and if not even one sample's gradient fits the method is skipped with that reason.
vmap cannot trace SDPA's data-dependent mask checks in transformers, so the model runs with eager
attention here (same math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from bench.methods import Prepared, Refused, Workload, row_sq_norms


def _sample_loss(model, params, ids, attention, loss_mask):
    """``L_b`` of one row (vmap removes the batch dimension): mean NLL over its completion tokens."""
    out = functional_call(model, params, (), {"input_ids": ids[None], "attention_mask": attention[None]})
    nll = F.cross_entropy(out.logits[0, :-1].float(), ids[1:], reduction="none")
    mask = loss_mask[1:].to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def prepare(work: Workload) -> Prepared:
    model, batch = work.model, work.batch
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    per_sample = sum(p.numel() * p.element_size() for p in params.values())
    need = per_sample * batch.size
    chunk = min(batch.size, work.func_max_bytes // per_sample)
    gib = 2**30
    if chunk < 1:
        raise Refused(
            f"per-sample gradients need {need / gib:.1f} GiB for the batch and {per_sample / gib:.2f} GiB for a "
            f"single sample, above the --func-max-gib limit of {work.func_max_bytes / gib:.1f} GiB"
        )
    notes = [f"{len(params)} parameter tensors, {per_sample / gib:.3f} GiB of gradient per sample"]
    if chunk < batch.size:
        notes.append(f"batch of {need / gib:.1f} GiB > limit: chunks of {chunk} samples")
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
        notes.append(f"eager attention instead of {previous} (vmap cannot trace its mask checks)")
    per_sample_grads = vmap(grad(lambda p, *row: _sample_loss(model, p, *row)), in_dims=(None, 0, 0, 0))
    inputs = (batch.input_ids, batch.attention_mask, batch.loss_mask.to(torch.int64))

    def run() -> torch.Tensor:
        out = []
        for start in range(0, batch.size, chunk):
            rows = [t[start : start + chunk] for t in inputs]
            grads = per_sample_grads(params, *rows)
            sq = sum(row_sq_norms(g) for g in grads.values())
            out.append(sq.sqrt().float())
            del grads
        return torch.cat(out)

    def cleanup() -> None:
        if previous != "eager":
            model.set_attn_implementation(previous)

    return Prepared(run, cleanup, notes, facts=lambda: {"chunk": chunk, "per_sample_grad_bytes": per_sample})
