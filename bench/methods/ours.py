"""vigor-kernels: ``vigor.per_sample_grad_norms`` (one forward, one input-gradient backward, norms from
captured layer inputs and output gradients) on one vigor_kernels backend."""

from __future__ import annotations

import torch

import vigor
import vigor_kernels as vk
from bench.methods import Prepared, Refused, Workload


def prepare(work: Workload, backend: str) -> Prepared:
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
    vigor.per_sample_grad_norms(model, *batch, backend=backend, self_check="always")
    check = vigor.engine.LAST_SELF_CHECK

    def run() -> torch.Tensor:
        return vigor.per_sample_grad_norms(model, *batch, backend=backend, self_check="off")

    notes = [f"vigor_kernels backend '{backend}' ({status.reason})"]
    if check is not None:
        notes.append(
            f"first-call self-check (not in the timings): {check.seconds * 1e3:.0f} ms, "
            f"max per-parameter relative error {check.max_rel_err:.1e}"
        )
    return Prepared(run, notes=notes)
