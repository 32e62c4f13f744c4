"""vigor-kernels: ``vigor.per_sample_grad_norms`` (one forward, one input-gradient backward, norms from
captured layer inputs and output gradients) on one vigor_kernels backend, with the LM head fused where
the engine can (``head="auto"``) or through the model's logits (``head="materialized"``)."""

from __future__ import annotations

import torch

import vigor
import vigor_kernels as vk
from bench.methods import Prepared, Refused, Workload


def prepare(work: Workload, backend: str, head: str = "auto") -> Prepared:
    status = vk.available_backends().get(backend)
    if status is None:
        raise Refused(f"unknown backend '{backend}': vigor_kernels knows {sorted(vk.available_backends())}")
    if not status.available:
        raise Refused(status.reason)
    try:
        vk.select_backend(backend, work.device, work.dtype)
    except vk.BackendError as exc:
        raise Refused(str(exc)) from exc
    model, raw = work.model, work.raw
    batch = (raw.input_ids, raw.attention_mask, raw.loss_mask)
    # The engine's first-call self-check (one row by plain autograd) runs once per model, theta, dtype and
    # backend: measured here on its own and kept out of the timed calls.
    vigor.per_sample_grad_norms(model, *batch, backend=backend, self_check="always", head=head)
    check = vigor.engine.LAST_SELF_CHECK
    used = vigor.head_scoring.LAST_HEAD

    def run() -> torch.Tensor:
        return vigor.per_sample_grad_norms(model, *batch, backend=backend, self_check="off", head=head)

    notes = [f"vigor_kernels backend '{backend}' ({status.reason})"]
    notes.append("LM head: fused" if used.fused else f"LM head: materialized logits ({used.reason})")
    if check is not None:
        notes.append(
            f"first-call self-check (not in the timings): {check.seconds * 1e3:.0f} ms, "
            f"max per-parameter relative error {check.max_rel_err:.1e}"
        )
    return Prepared(run, notes=notes)
