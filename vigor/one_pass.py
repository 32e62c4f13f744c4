"""One forward for the VIGOR norms and the policy update that follows them (docs/one-pass.md).

A GRPO step scores its completions (one forward + an input-gradient backward) and then updates the policy
on the same completions with the same weights (another forward + a full backward). :func:`score_for_update`
runs the scoring pass once and keeps what the update needs, in one of two forms:

- ``"bookkept"``: when the update's first loss is ``sum_b c_b L_b`` for numbers ``c_b`` known once the
  norms are (GRPO at ratio 1 with no KL term and temperature 1), the update's weight gradient is written
  from the inputs and output gradients the norm pass captured (:meth:`SharedScore.write_grads`, one GEMM
  per linear layer): no second forward and no second backward.
- ``"graph"``: otherwise, the forward runs with the update's parameters requiring grad and its graph is
  retained after the norms' backward; the update computes its loss from :attr:`SharedScore.logits` and
  runs its own backward on that graph: no second forward.

Either way the norms are those of :func:`vigor.per_sample_grad_norms` (same rules, same checks, the same
first-call self-check); the pass runs with the model in eval mode and without autocast, so the caller must
make sure the update sees the same function (no dropout, no autocast; ``vigor.trainer.one_pass`` checks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vigor import engine
from vigor.batch import TokenBatch, prepare_batch
from vigor.errors import UnsupportedModuleError
from vigor.params import select_params
from vigor.sharding import is_sharded
from vigor.update_grads import ScaledInputs, accumulate, bookkeepable, kept_bytes_per_row, module_grads
from vigor_kernels.input_grams import memory_key

MODES = ("bookkept", "graph")
OVER_BUDGET = "book-keeping would hold"  # how SharedScore.why_graph starts when max_kept_bytes decided


@dataclass
class SharedScore:
    """The norms of a batch and what its policy update reuses from the same forward."""

    norms: torch.Tensor  # [B] float32, as per_sample_grad_norms
    sq: dict[str, torch.Tensor]  # {theta name: per-sample squared norm [B]}
    logits: torch.Tensor | None  # [B, L, V]: with its graph in "graph" mode, detached in "bookkept" mode
    mode: str
    batch: TokenBatch
    _share: engine.SharedUpdate
    why_graph: str = ""  # why a pass asked to book-keep reuses the graph instead (empty when it did not ask)

    def kept_bytes(self) -> int:
        """Memory held for the book-keeping (captured inputs and output gradients) until write_grads."""
        seen: set[tuple] = set()
        total = 0
        for _, kept, grad in self._share.kept:
            for t in (grad, *vars(kept).values()):
                for x in t if isinstance(t, tuple) else (t,):
                    # layers reading one input keep views of the same memory: count it once
                    key = memory_key(x) if isinstance(x, torch.Tensor) else None
                    if key is not None and key not in seen:
                        seen.add(key)
                        total += x.numel() * x.element_size()
        return total

    def release(self) -> None:
        """Drop the logits (and with them the graph) and the captured tensors."""
        self.logits = None
        self._share.logits = None
        self._share.kept.clear()

    def write_grads(self, coef: torch.Tensor) -> None:
        """Add the gradient of ``sum_b coef[b] L_b`` to ``.grad`` of every parameter of theta (bookkept mode),
        then release the captured tensors."""
        if self.mode != "bookkept":
            raise RuntimeError(f"write_grads needs a bookkept pass; this one is {self.mode!r}")
        if not self._share.kept and self.batch.token_counts.any():
            raise RuntimeError("write_grads called twice (the captured tensors are released by the first call)")
        coef = coef.to(device=self.norms.device, dtype=torch.float32)
        if coef.shape != (self.batch.size,):
            raise ValueError(f"coef must have shape [{self.batch.size}], got {list(coef.shape)}")
        size = self.batch.size
        scaled = ScaledInputs(coef)
        for hooked, kept, grad in self._share.kept:
            for attr, g in module_grads(hooked.module, hooked.rule, kept, grad, scaled, size).items():
                if attr in hooked.param_names:
                    accumulate(hooked.module._parameters[attr], g)
        self._share.kept.clear()


def score_for_update(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_mask: torch.Tensor,
    *,
    params: Iterable[nn.Parameter] | Iterable[str] | None = None,
    update_params: Iterable[nn.Parameter] | None = None,
    bookkeep: bool = True,
    max_kept_bytes: int | None = None,
    backend: str | None = None,
    linear_method: str = "auto",
    self_check: str | None = None,
) -> SharedScore:
    """Per-sample norms of ``theta`` (``params``, as :func:`vigor.per_sample_grad_norms`) from a forward
    the update of ``update_params`` (default: every parameter that requires grad) reuses.

    ``bookkeep=True`` picks the bookkept mode when it is exact for this model: the update's parameters
    are all in theta and every module owning them has a book-kept rule (linear, embedding, norm);
    otherwise the graph mode. ``max_kept_bytes``: book-keep only if what it would hold until
    :meth:`SharedScore.write_grads` (:func:`estimate_kept_bytes`) is at most this. The batch is scored whole
    (all rows, all columns) so the logits line up with the caller's batch; rows with no loss token get
    norm 0.
    """
    engine.check_call("score_for_update", linear_method)
    if is_sharded(model):
        raise UnsupportedModuleError("score_for_update does not support FSDP2-sharded models; score and update apart")
    check_mode = engine._self_check_mode(self_check)
    batch = prepare_batch(model, input_ids, attention_mask, loss_mask)
    theta = select_params(model, params)
    update = list(update_params) if update_params is not None else [p for p in model.parameters() if p.requires_grad]
    plan = engine.plan_scoring(model, theta, fallback=False)
    why_graph = ""
    if bookkeep and not _bookkeepable(plan, theta, update):
        why_graph = "book-keeping is not exact here (a module without a book-kept rule, or an update outside theta)"
    elif bookkeep and max_kept_bytes is not None:
        need = _estimate(plan, batch)
        if need > max_kept_bytes:
            why_graph = f"{OVER_BUDGET} ~{need / 2**20:.1f} MiB, over the {max_kept_bytes / 2**20:.1f} MiB allowed"
    mode = "bookkept" if bookkeep and not why_graph else "graph"
    share = engine.SharedUpdate(
        trainable=frozenset() if mode == "bookkept" else frozenset(id(p) for p in update), keep=mode == "bookkept"
    )
    # the update needs the logits: the fused head (which never forms them) is not used here
    sq = engine._score(model, batch, theta, False, backend, linear_method, "materialized", share=share)
    valid = (batch.token_counts > 0).nonzero().flatten()
    if valid.numel():
        row = int(valid[0])
        engine.self_check_once(model, batch, theta, sq, check_mode, (backend, False), row=row)
    norms = engine.checked_norms(sq, batch.size, batch.input_ids.device)
    logits = share.logits if mode == "graph" else share.logits.detach()
    if mode == "bookkept":
        share.logits = None  # the forward's graph is spent: free its activations before the update
    return SharedScore(norms, sq, logits, mode, batch, share, why_graph)


def _estimate(plan: engine.ScoringPlan, batch: TokenBatch) -> int:
    return batch.size * batch.length * sum(kept_bytes_per_row(h.module, h.rule) for h in plan.hooked)


def estimate_kept_bytes(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_mask: torch.Tensor,
    *,
    params: Iterable[nn.Parameter] | Iterable[str] | None = None,
) -> int:
    """What a bookkept :func:`score_for_update` of this batch would hold until ``write_grads``, estimated from
    the layer widths before any forward: every hooked module's input (or ``xhat``, or ids) and output
    gradient, for every token row of the batch. Layers reading one input share it, so the real figure
    (:meth:`SharedScore.kept_bytes`) is lower; per-head norms hold more rows than tokens."""
    batch = prepare_batch(model, input_ids, attention_mask, loss_mask)
    return _estimate(engine.plan_scoring(model, select_params(model, params), fallback=False), batch)


def _bookkeepable(plan: engine.ScoringPlan, theta: dict[str, nn.Parameter], update: list[nn.Parameter]) -> bool:
    """Book-keeping writes the gradient of theta only, through the book-kept rules only."""
    if plan.fallback:
        return False
    in_theta = {id(p) for p in theta.values()}
    if not all(id(p) in in_theta for p in update):
        return False
    return all(bookkeepable(h.module, h.rule) for h in plan.hooked)
