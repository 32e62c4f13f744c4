"""The fused LM head at model level: score a causal LM's completions without any ``[B, L, V]`` tensor.

``FusedHead.detect(model)`` finds a head it can fuse: the model's output embedding is an ``nn.Linear``
(tied or not, bias or not) applied to the backbone's ``last_hidden_state``, followed only by a logit
transform it knows (Gemma2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
``logits_scaling``). It then checks, on a few tokens, that ``head(backbone(x))`` equals the model's own
logits; anything else (a LoRA-wrapped or custom head, a transform it does not know) makes ``detect``
return None and :func:`why_not_fused` say why, so callers fall back to the materialized logits.

``losses, result = head.completion_nll(model, batch, want_weight=..., want_bias=..., tied_ids=...)`` runs
the backbone (not the head), gathers the hidden states at the N scored positions (the rows predicting
completion tokens, sample-major) and returns the per-sample mean NLL ``[B]`` connected to them by an
autograd function. Its forward computes, in token x vocabulary chunks (``vigor_kernels.fused_head``),
the NLL and, when a backward will follow, ``dL/dh`` and the requested per-sample quantities of the head
for a unit upstream gradient; its backward scales them by the upstream gradient of each sample (they are
linear, resp. quadratic, in it) and fills ``result``:

- ``result.sq_norms["weight"]`` / ``["bias"]``: ``[B]`` squared norms of the head's per-sample gradient
  (the weight's own use only: a tied weight's embedding side and cross term are the engine's);
- ``result.tied_rows``: ``[B, L, d]`` float32, ``R[b, u] = (G_b^T H_b)[tied_ids[b, u]]`` (0 where
  ``tied_ids < 0``), what the tied input embedding's cross term ``2 sum_u g_emb[b, u] . R[b, u]`` needs.

If the head's parameters themselves require gradients, the backward also returns their ordinary
gradients (a second pass over the vocabulary), so the function is a correct autograd op in any use.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import vigor_kernels as vk
from vigor.batch import TokenBatch
from vigor.errors import UnsupportedModuleError
from vigor.model_state import preserved

VERIFY_TOKENS = 6


@dataclass
class FusedHeadResult:
    """Filled by the backward of :meth:`FusedHead.completion_nll` (empty until then)."""

    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # "weight", "bias": [B] float32
    tied_rows: torch.Tensor | None = None  # [B, L, d] float32
    weight_method: str | None = None  # "ghost" or "direct"

    @property
    def ready(self) -> bool:
        return bool(self.sq_norms) or self.tied_rows is not None


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def _logit_transform(base: nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` of the logit transforms this module knows, from the model's config."""
    config = getattr(base, "config", None)
    scale, softcap = 1.0, None
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        softcap = float(cap)
    cohere = getattr(base, "logit_scale", None)
    if cohere is not None and not isinstance(cohere, nn.Module):
        scale *= float(cohere)
    granite = getattr(config, "logits_scaling", None)
    if granite is not None:
        scale /= float(granite)
    return scale, softcap


_refusals: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
# Models whose fused logits were checked against their own, with what was checked (FusedHead._identity):
# detect() runs the model only the first time (and again when the head or its dtype/device changed).
_verified: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


@dataclass
class FusedHead:
    model: nn.Module
    backbone: nn.Module
    head: nn.Linear
    scale: float
    softcap: float | None

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.head.bias

    @property
    def vocab(self) -> int:
        return self.head.weight.shape[0]

    @classmethod
    def detect(cls, model: nn.Module) -> FusedHead | None:
        """The fused head of ``model``, or None when it cannot be fused exactly (see :func:`why_not_fused`).
        The first time (per model, head, dtype and device) it runs the model on a few tokens to check that
        the fused logits are the model's own: call it before attaching hooks that must not see that run.
        A head with forward hooks is refused (the fused path never calls the head module)."""
        try:
            found = cls._find(model)
            key = found._identity()
            if _verified.get(model) != key:
                found._verify()
                _verified[model] = key
        except _NotFusable as exc:
            _refusals[model] = str(exc)
            _verified.pop(model, None)
            return None
        _refusals.pop(model, None)
        return found

    def _identity(self) -> tuple:
        """What the numerical check depends on: the modules, the head's dtype and device, the transform."""
        w = self.weight
        return (id(self.backbone), id(self.head), id(w), w.dtype, w.device, self.scale, self.softcap)

    @classmethod
    def _find(cls, model: nn.Module) -> FusedHead:
        base = _base(model)
        name = type(base).__name__
        get_head = getattr(base, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if head is None:
            raise _NotFusable(f"{name} has no output embedding (get_output_embeddings() is None)")
        if not isinstance(head, nn.Linear):
            raise _NotFusable(f"{name}'s output head is a {type(head).__name__}, not an nn.Linear")
        if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
            raise _NotFusable(f"{name}'s output head has forward hooks, which the fused path would skip")
        backbone = getattr(base, "base_model", None)
        if backbone is None or backbone is base or not isinstance(backbone, nn.Module):
            raise _NotFusable(f"{name} has no separate backbone (base_model) returning the last hidden state")
        scale, softcap = _logit_transform(base)
        return cls(model, backbone, head, scale, softcap)

    def _verify(self) -> None:
        """Compare the fused logits with the model's own on a few tokens (any unknown transform, a head
        applied to something else than the last hidden state, shows here)."""
        device = self.weight.device
        ids = (torch.arange(VERIFY_TOKENS, device=device) * 7 + 3) % self.vocab
        ids = ids[None, :]
        with preserved(self.model), torch.no_grad():
            out = self.model(input_ids=ids, use_cache=False)
            want = getattr(out, "logits", out if isinstance(out, torch.Tensor) else None)
            hidden = self._hidden(ids, torch.ones_like(ids))
            z = hidden[0].float() @ self.weight.float().T
            if self.bias is not None:
                z = z + self.bias.float()
            z = z * self.scale
            if self.softcap is not None:
                z = self.softcap * torch.tanh(z / self.softcap)
        if want is None or tuple(want.shape) != (1, VERIFY_TOKENS, self.vocab):
            shape = None if want is None else list(want.shape)
            raise _NotFusable(
                f"{type(_base(self.model)).__name__} returned logits of shape {shape}, not [1, {VERIFY_TOKENS}, "
                f"V={self.vocab}] for {VERIFY_TOKENS} tokens (virtual tokens, or no next-token logits)"
            )
        want = want[0].float()
        tol = (1e-4 if self.weight.dtype == torch.float32 else 3e-2) * max(1.0, float(want.abs().max()))
        err = float((z - want).abs().max())
        if not math.isfinite(err) or err > tol:
            raise _NotFusable(
                f"{type(_base(self.model)).__name__}: head(last hidden state) differs from the model's logits by "
                f"{err:.3g} (> {tol:.3g}): an output transform this module does not know"
            )

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0] if isinstance(out, tuple) else out
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != self.weight.shape[1]:
            raise _NotFusable(f"{type(self.backbone).__name__} did not return [B, L, d] hidden states")
        return hidden

    def hidden_states(self, batch: TokenBatch) -> torch.Tensor:
        """The backbone's final hidden states ``[B, L, d]`` for ``batch`` (what the head would be applied to)."""
        try:
            hidden = self._hidden(batch.input_ids, batch.attention_mask)
        except _NotFusable as exc:
            raise UnsupportedModuleError(str(exc)) from None
        if tuple(hidden.shape[:2]) != (batch.size, batch.length):
            raise UnsupportedModuleError(
                f"{type(self.backbone).__name__} returned hidden states of shape {list(hidden.shape)}, not "
                f"[B, L, d] = [{batch.size}, {batch.length}, d]"
            )
        return hidden

    def scored_hidden(
        self, batch: TokenBatch, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h [N, d], targets [N], offsets [B + 1])``: the backbone's hidden states at the positions that
        predict completion tokens (position t predicts token t + 1), packed sample-major. ``hidden``: the
        ``[B, L, d]`` states of :meth:`hidden_states` when the caller ran the backbone itself."""
        if hidden is None:
            hidden = self.hidden_states(batch)
        elif hidden.dim() != 3 or tuple(hidden.shape[:2]) != (batch.size, batch.length):
            raise ValueError(f"hidden must be [B, L, d] = [{batch.size}, {batch.length}, d], got {list(hidden.shape)}")
        b_idx, t_idx = batch.loss_mask[:, 1:].nonzero(as_tuple=True)
        offsets = torch.zeros(batch.size + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(batch.loss_mask[:, 1:].sum(1).cpu(), 0)
        return hidden[b_idx, t_idx], batch.input_ids[b_idx, t_idx + 1], offsets

    def _check_model(self, model: nn.Module) -> None:
        if model is not self.model:
            raise ValueError("FusedHead: this head was detected on another model; call FusedHead.detect(model)")

    def completion_nll(
        self,
        model: nn.Module,
        batch: TokenBatch,
        *,
        want_weight: bool = False,
        want_bias: bool = False,
        tied_ids: torch.Tensor | None = None,
        method: str = "auto",
        backend: str | None = None,
        hidden: torch.Tensor | None = None,
        on_backward: Callable[[FusedHeadResult], None] | None = None,
    ) -> tuple[torch.Tensor, FusedHeadResult]:
        """Per-sample ``L_b = (1/T_b) sum_t -log p(y_t)`` float32 ``[B]`` (0 when ``T_b = 0``) and the result
        object its backward fills (module docstring). ``tied_ids`` ``[B, L]``: the input ids whose head rows
        the tied embedding needs, -1 elsewhere (:meth:`embedding_ids` builds them); ``method``: ``auto``,
        ``ghost`` or ``direct`` for the weight norm. ``hidden``: the backbone's ``[B, L, d]`` output when the
        caller ran it (the engine runs it under its observation); ``on_backward(result)`` is called as soon as
        the backward has filled ``result``, before the backward continues into the backbone."""
        self._check_model(model)
        if method not in ("auto", "ghost", "direct"):
            raise ValueError(f"method must be 'auto', 'ghost' or 'direct', got {method!r}")
        if tied_ids is not None and tuple(tied_ids.shape) != (batch.size, batch.length):
            raise ValueError(f"tied_ids must be [B, L] = [{batch.size}, {batch.length}], got {list(tied_ids.shape)}")
        h, targets, offsets = self.scored_hidden(batch, hidden)
        if (want_weight or want_bias or tied_ids is not None) and torch.is_grad_enabled() and not h.requires_grad:
            # nothing upstream is trainable (theta = the head alone): a leaf so that a backward still comes
            h = h.detach().requires_grad_(True)
        result = FusedHeadResult()
        call = _HeadCall(
            self, targets, offsets, want_weight, want_bias and self.bias is not None, tied_ids, method, backend, result,
            on_backward,
        )  # fmt: skip
        losses = _FusedNLL.apply(h, self.weight, self.bias, call)
        return losses, result

    @staticmethod
    def embedding_ids(batch: TokenBatch, padding_idx: int | None = None) -> torch.Tensor:
        """``batch.input_ids`` inside each sample's row range, -1 outside it and at ``padding_idx`` tokens:
        the ``tied_ids`` whose rows the tied input embedding's cross term needs."""
        ids = torch.where(batch.ranges.row_mask(batch.length, batch.input_ids.device), batch.input_ids, -1)
        return ids if padding_idx is None else torch.where(ids == padding_idx, -1, ids)

    def self_certainty(self, batch: TokenBatch, backend: str | None = None) -> torch.Tensor:
        """``SC_b = (1/T_b) sum_t KL(U || p_t)`` float32 ``[B]`` (0 when ``T_b = 0``), without logits:
        ``KL(U || p_t) = -log V - (1/V) sum_v log p_t(v)`` and ``sum_v log p_t(v) = sum_v z_tv - V lse_t``."""
        with torch.no_grad():
            h, targets, offsets = self.scored_hidden(batch)
            out = vk.fused_head(
                h, self.weight, targets, offsets, bias=self.bias, scale=self.scale, softcap=self.softcap,
                logit_sum=True, backend=backend,
            )  # fmt: skip
            per_row = -math.log(self.vocab) - (out.logit_sum / self.vocab - out.lse)
            sums = torch.zeros(batch.size, dtype=torch.float64, device=h.device)
            sums.index_add_(0, torch.repeat_interleave(torch.arange(batch.size), offsets.diff()).to(h.device), per_row)
        return (sums / batch.token_counts.clamp_min(1).to(sums.device)).float()


class _NotFusable(Exception):
    pass


def why_not_fused(model: nn.Module) -> str | None:
    """Why the last :meth:`FusedHead.detect` on ``model`` returned None (None if it did not)."""
    return _refusals.get(model)


@dataclass
class _HeadCall:
    head: FusedHead
    targets: torch.Tensor
    offsets: torch.Tensor
    want_weight: bool
    want_bias: bool
    tied_ids: torch.Tensor | None
    method: str
    backend: str | None
    result: FusedHeadResult
    on_backward: Callable[[FusedHeadResult], None] | None = None
    sample_of_row: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    unit: vk.HeadResult | None = None

    def run(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **wants) -> vk.HeadResult:
        return vk.fused_head(
            h, weight, self.targets, self.offsets, bias=bias, scale=self.head.scale, softcap=self.head.softcap,
            backend=self.backend, **wants,
        )  # fmt: skip


class _FusedNLL(torch.autograd.Function):
    """Per-sample NLL from packed hidden rows; the heavy work happens in the forward (one pass over the
    vocabulary), for a unit upstream gradient; the backward only rescales."""

    @staticmethod
    def forward(ctx, h, weight, bias, call: _HeadCall):
        needs_h = ctx.needs_input_grad[0]
        unit = call.run(
            h, weight, bias, grad_h=needs_h, weight_norm=call.method if needs_h and call.want_weight else None,
            bias_norm=needs_h and call.want_bias,
        )  # fmt: skip
        call.unit, call.lse = unit, unit.lse
        call.sample_of_row = torch.repeat_interleave(torch.arange(len(call.offsets) - 1), call.offsets.diff()).to(
            h.device
        )
        if needs_h and call.tied_ids is not None:
            call.result.tied_rows = vk.head_tied_rows(
                h, weight, call.targets, unit.lse, call.offsets, call.tied_ids, bias=bias, scale=call.head.scale,
                softcap=call.head.softcap, backend=call.backend,
            )  # fmt: skip
        ctx.call = call
        ctx.save_for_backward(h, weight, bias)
        return unit.nll

    @staticmethod
    def backward(ctx, grad_out):
        call: _HeadCall = ctx.call
        h, weight, bias = ctx.saved_tensors
        grad_out = grad_out.float()
        unit, result = call.unit, call.result
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = (unit.grad_h * grad_out[call.sample_of_row][:, None]).to(h.dtype)
            if unit.weight_sq is not None:
                result.sq_norms["weight"] = unit.weight_sq * grad_out.square()
                result.weight_method = unit.weight_method
            if unit.bias_sq is not None:
                result.sq_norms["bias"] = unit.bias_sq * grad_out.square()
            if result.tied_rows is not None:
                result.tied_rows = result.tied_rows * grad_out[:, None, None]
            if call.on_backward is not None:
                call.on_backward(result)
        if ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]):
            # ordinary parameter gradients: sum over samples, so recomputed with the real upstream weights
            counts = call.offsets.diff().clamp_min(1).to(h.device)
            w = (grad_out / counts)[call.sample_of_row]
            params = call.run(h, weight, bias, row_weights=w, weight_grad=True, bias_grad=True)
            grad_w = params.weight_grad.to(weight.dtype) if ctx.needs_input_grad[1] else None
            if bias is not None and ctx.needs_input_grad[2]:
                grad_b = params.bias_grad.to(bias.dtype)
        call.unit = None
        return grad_h, grad_w, grad_b, None
