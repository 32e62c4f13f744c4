"""BackPACK ``BatchL2Grad``: ``extend(model)`` and one batched backward of ``sum_b L_b`` inside
``backpack(BatchL2Grad())``; each parameter gets ``batch_l2`` (per-sample squared norms).

BackPACK extends modules it knows (Linear, Embedding, ...); a transformers RMSNorm has no BackPACK
extension, so its weights get no ``batch_l2`` (BackPACK only warns). The sum over the covered
parameters is what a BackPACK user gets; the coverage is recorded, and the norms are also checked on
the covered parameters alone (against the official loop's per-parameter norms) to tell a partial
answer from a wrong one. BackPACK's hooks store every module's input and output whenever autograd is
on, so it runs on its own copy of the model. In bfloat16 BackPACK 1.7.1 fails inside its Embedding
derivative (a float32 one-hot meets bf16 gradients in an einsum): the row then says "failed" with that error.
"""

from __future__ import annotations

import copy
import warnings

import torch

from bench.methods import Prepared, Refused, Workload, require
from vigor.batch import completion_nll, model_logits


def prepare(work: Workload) -> Prepared:
    how = "pip install --no-deps -r requirements/no-deps.txt (BackPACK without torchvision)"
    bp = require("backpack", how)
    BatchL2Grad = require("backpack.extensions", how).BatchL2Grad
    backpack, extend = bp.backpack, bp.extend

    model = copy.deepcopy(work.model)
    batch = work.batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            extend(model)
        except Exception as exc:
            raise Refused(f"backpack.extend failed: {type(exc).__name__}: {exc}") from exc
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # A weight used by two modules (tied embedding / LM head): BackPACK computes batch_l2 per use and the
    # last use in the backward (the embedding) overwrites the first, so the head's part and the cross term
    # are lost. Measured on tiny Qwen2: batch_l2 equals the embedding-only squared norm exactly.
    uses: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    shared = {n for n, p in model.named_parameters() if uses.get(id(p), 0) > 1}
    covered: list[str] = []

    def run() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no extension for Qwen2RMSNorm", backward-hook notices
            with backpack(BatchL2Grad()):
                completion_nll(model_logits(model, batch), batch).sum().backward()
        sq = {n: p.batch_l2 for n, p in model.named_parameters() if hasattr(p, "batch_l2")}
        if not sq:
            raise Refused("BatchL2Grad produced no batch_l2 on any parameter")
        covered[:] = list(sq)
        total = torch.stack([v.float() for v in sq.values()]).sum(0)
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "batch_l2"):
                del p.batch_l2
        return total.sqrt()

    def reference() -> tuple[torch.Tensor, str]:
        if work.official_sq is None:
            raise Refused("no official per-parameter norms to compare with")
        sq = torch.stack([work.official_sq[n] for n in covered]).sum(0)
        return sq.sqrt().float(), "official loop restricted to the parameters BackPACK covers"

    def facts() -> dict:
        missing = [n for n in names if n not in covered]
        return {
            "covered_params": len(covered),
            "theta_params": len(names),
            "missing_params": missing,
            "shared_params": [n for n in names if n in shared],
        }

    notes = ["on a copy of the model (BackPACK stores I/O of every module)"]
    return Prepared(run, notes=notes, reference=reference, facts=facts)
