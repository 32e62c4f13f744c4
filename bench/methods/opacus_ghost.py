"""Opacus ghost clipping: ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)``.

One batched forward and backward of ``sum_b L_b`` (``loss_reduction="sum"``, so each sample's norm is
that of ``grad L_b``) with Opacus' hooks; ``get_norm_sample()`` gives the per-sample norms (ghost norms
for Linear and Embedding, functorch per-sample gradients for the RMSNorm weights it has no sampler for).
Opacus records activations only in ``train()`` mode; the presets have no dropout, so the function is the
same. Opacus refuses a weight used twice under ghost clipping (a tied embedding / LM head): on a tied
model its own error is recorded, and ``opacus-untied`` runs it on the untied twin of the preset (same
shapes, LM head a separate matrix), checked against the official loop on that twin.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from bench.methods import Prepared, Refused, Workload, require
from bench.methods.official import official_loop
from vigor.batch import TokenBatch, completion_nll


def _strip(model: nn.Module, gsm: nn.Module | None) -> None:
    """Leave no Opacus hook, attribute or stored activation behind on ``model``."""
    if gsm is not None:
        gsm.to_standard_module()
    for m in model.modules():
        for attr in ("activations", "max_batch_len"):
            if hasattr(m, attr):
                delattr(m, attr)
    for p in model.parameters():
        p.grad = None


def _wrap(model: nn.Module, batch: TokenBatch) -> tuple[Prepared, nn.Module]:
    grad_sample = require("opacus.grad_sample", "pip install opacus (requirements/lock.txt pins it)")

    training = [(m, m.training) for m in model.modules()]
    model.train()
    gsm = grad_sample.GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True
    )

    def run() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full-backward-hook notices on every module
            out = gsm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            completion_nll(out.logits, batch).sum().backward()
        norms = gsm.get_norm_sample().float()
        gsm.zero_grad(set_to_none=True)
        for p in model.parameters():
            if hasattr(p, "_norm_sample"):
                del p._norm_sample
        return norms

    def cleanup() -> None:
        _strip(model, gsm)
        for m, flag in training:
            m.training = flag

    return Prepared(run, cleanup, notes=["train() mode (no dropout in the presets), loss_reduction='sum'"]), gsm


def prepare(work: Workload) -> Prepared:
    prepared, _ = _wrap(work.model, work.batch)
    if work.spec.tied:
        # Opacus raises inside the forward of the second use of the tied weight: get its own words.
        try:
            prepared.run()
        except NotImplementedError as exc:
            raise Refused(f"Opacus refuses the tied embedding/LM head: NotImplementedError: {exc}") from exc
        finally:
            prepared.cleanup()
        raise Refused("tied model: expected Opacus to refuse the shared weight, but it ran; not timed")
    return prepared


def prepare_untied(work: Workload) -> Prepared:
    if not work.spec.tied:
        raise Refused("the preset is untied already: see the 'opacus' row")
    twin = work.untied_twin()
    if "twin_official_norms" not in work.cache:
        # The reference first: the official loop must not run under Opacus' hooks.
        work.cache["twin_official_norms"] = official_loop(twin, work.batch)[0]
    twin_norms = work.cache["twin_official_norms"]
    prepared, _ = _wrap(twin, work.batch)
    prepared.notes.append("on the untied twin of the preset (LM head a separate matrix)")
    prepared.reference = lambda: (twin_norms, "official loop on the untied twin")
    prepared.same_model = False
    unwrap = prepared.cleanup

    def cleanup() -> None:
        unwrap()
        if not work.keep_twin:
            work.release_twin()

    prepared.cleanup = cleanup
    return prepared
