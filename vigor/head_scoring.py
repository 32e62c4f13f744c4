"""The LM head in the engine's scoring pass: fused (``vigor.fused_head``) when the model's head allows it,
so that no ``[B, L, V]`` logits, float32 copy of them or logits gradient exists; the model's own logits
otherwise (docs/engine.md#the-lm-head).

``head="auto"`` (the default, or ``$VIGOR_HEAD``) fuses whenever :meth:`FusedHead.detect` finds the head
and nothing below rules it out, and otherwise takes the logits path; ``"fused"`` raises
``UnsupportedModuleError`` saying why it cannot fuse; ``"materialized"`` always takes the logits path.

In a fused pass the head module is not hooked and not run: the backbone runs under the engine's
observation (every use of theta seen, samples followed), its final hidden states are gathered at the
scored positions only, and the fused op, run outside the observation, computes the per-sample NLL from
them. The op's backward, which runs before the backward reaches the backbone, adds the head's per-sample
squared norms to the totals and hands a tied input embedding the rows ``R [B, L, d]`` its cross term needs.

The logits path is kept where skipping the model's own forward could change what is computed or where
the fused op's backward cannot serve: a sharded model (FSDP2 gathers the root's parameters in the root's
forward hooks), forward hooks or an instance ``forward`` on the model (or its peft wrapper), peft prompt
learning (virtual tokens), and passes with parameters in the autograd fallback (which differentiates
each sample's loss separately through the batched graph).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

import vigor_kernels as vk
from vigor.batch import TokenBatch
from vigor.errors import UnsupportedModuleError
from vigor.fused_head import FusedHead, FusedHeadResult, why_not_fused
from vigor.rules import RuleContext, TiedPair
from vigor.sharding import is_sharded
from vigor_kernels.dispatch import HeadKernels

HEAD_MODES = ("auto", "fused", "materialized")
HEAD_ENV = "VIGOR_HEAD"


@dataclass(frozen=True)
class HeadChoice:
    """Which head the last scoring pass used, and why not the fused one when it did not."""

    mode: str
    fused: bool
    reason: str = ""


LAST_HEAD: HeadChoice | None = None


@dataclass
class FusedHeadPlan:
    """The fused head of one scoring plan: which of its parameters are in theta, by name."""

    head: FusedHead
    names: dict[str, str] = field(default_factory=dict)  # "weight" / "bias" -> name in theta


def head_mode(value: str | None) -> str:
    mode = value if value is not None else os.environ.get(HEAD_ENV, "auto")
    if mode not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES} (or ${HEAD_ENV}), got '{mode}'")
    return mode


def _ruled_out(model: nn.Module) -> str | None:
    """Why the fused path, which runs the backbone and not the model's forward, could differ here."""
    if is_sharded(model):
        return "the model is sharded (FSDP2 gathers the head's parameters in the model's own forward hooks)"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for wrapper in dict.fromkeys((model, base)):
        name = type(wrapper).__name__
        if wrapper._forward_hooks or wrapper._forward_pre_hooks or hasattr(wrapper, "_hf_hook"):
            return f"{name} has forward hooks, which the fused path (backbone, then head) would skip"
        if "forward" in wrapper.__dict__:
            return f"{name}'s forward is replaced on the instance, which the fused path would skip"
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return "peft prompt learning adds virtual tokens in the model's forward"
    return None


def find_head(model: nn.Module, mode: str) -> tuple[FusedHead | None, str]:
    """``(the fused head or None, why not)``. Call it before any hook is attached: the first detection on
    a model runs it on a few tokens to check the fused logits against its own."""
    if mode == "materialized":
        return None, "head='materialized'"
    reason = _ruled_out(model)
    head = None
    if reason is None:
        head = FusedHead.detect(model)
        reason = "" if head is not None else (why_not_fused(model) or "no fusable head")
    if head is not None and mode == "auto" and head.head.weight.dtype not in (torch.float32, torch.float64):
        # The fused op accumulates in float32 where the model's own logits are rounded to its dtype: on a real
        # model in bf16 the two differ by up to ~10% on the last layers' norms (SmolLM2-135M), more than the
        # self-check (plain autograd through the model's logits) allows. Closer to the float32 truth, but
        # not the model's own function: only when asked for.
        head, reason = None, f"the head is {head.head.weight.dtype} (head='fused' scores it fused anyway)"
    if head is None and mode == "fused":
        raise UnsupportedModuleError(f"head='fused', but the LM head cannot be fused: {reason}")
    return head, reason


def fuse_plan(plan, head: FusedHead | None, mode: str, reason: str) -> HeadChoice:
    """Give ``plan`` (an ``engine.ScoringPlan``) the fused head, if any and if its fallback allows:
    the head module leaves the hooked modules and its parameters in theta go to the fused op."""
    if head is not None and plan.fallback:
        reason = f"parameters {sorted(plan.fallback)[:3]} are in the per-sample autograd fallback"
        if mode == "fused":
            raise UnsupportedModuleError(f"head='fused', but {reason}, which needs the materialized logits")
        head = None
    if head is None:
        plan.head = None
        return HeadChoice(mode, False, reason)
    names: dict[str, str] = {}
    for hooked in [h for h in plan.hooked if h.module is head.head]:
        names.update(hooked.param_names)
        plan.hooked.remove(hooked)
    plan.head = FusedHeadPlan(head, names)
    return HeadChoice(mode, True)


def _tied_ids(pair: TiedPair, batch: TokenBatch, ctx: RuleContext) -> torch.Tensor:
    """The ids whose head rows the tied embedding's cross term needs, aligned with its own rows."""
    ids, plan = pair.ids, pair.ids_plan
    same = (
        ids is not None
        and plan is not None
        and plan.batch_dim in (0, -1)
        and plan.inner == 1
        and tuple(ids.shape) == (batch.size, batch.length)
        and torch.equal(ids, batch.input_ids)
    )
    if not same:
        raise UnsupportedModuleError(
            f"the input embedding {ctx.name(pair.embedding)} tied to the LM head did not look up the batch's "
            "input_ids as [B, L]: the fused head's cross-term rows would not line up; pass head='materialized'"
        )
    pad = pair.embedding.padding_idx
    if ctx.use_ranges:
        return FusedHead.embedding_ids(batch, pad)  # -1 outside each sample's rows, as the rules skip
    return batch.input_ids if pad is None else torch.where(batch.input_ids == pad, -1, batch.input_ids)


def _head_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """A backend without the head kernels (cuda) scores the other layers; the head then runs on torch."""
    if vk.requested_backend(backend) == "auto":
        return backend
    return backend if isinstance(vk.select_backend(backend, device, dtype), HeadKernels) else "torch"


def fused_losses(plan: FusedHeadPlan, model: nn.Module, batch: TokenBatch, hidden: torch.Tensor, ctx, scoring):
    """Per-sample losses ``[B]`` from the backbone's ``hidden`` ``[B, L, d]``; the backward adds the head's
    squared norms (and a tied weight's cross term) to ``scoring.totals`` while ``scoring.collecting``."""
    head, names = plan.head, plan.names
    pair = ctx.tied.get(id(head.weight)) if "weight" in names else None
    tied_ids = _tied_ids(pair, batch, ctx) if pair is not None else None

    def collect(result: FusedHeadResult) -> None:
        if not scoring.collecting:
            return
        for attr, sq in result.sq_norms.items():
            scoring.totals[names[attr]] = scoring.totals[names[attr]] + sq
        if pair is not None:
            cross = pair.head_rows_side(result.tied_rows, ctx)
            scoring.totals[names["weight"]] = scoring.totals[names["weight"]] + cross

    losses, _ = head.completion_nll(
        model, batch, want_weight="weight" in names, want_bias="bias" in names, tied_ids=tied_ids,
        method=ctx.linear_method, backend=_head_backend(ctx.backend, hidden.device, hidden.dtype), hidden=hidden,
        on_backward=collect,
    )  # fmt: skip
    return losses


__all__ = ["HEAD_ENV", "HEAD_MODES", "LAST_HEAD", "FusedHeadPlan", "HeadChoice", "find_head", "head_mode"]
