"""Per-module norm rules: what a hook captures in the forward, and how the captured input and the
output gradient turn into per-sample squared norms of the module's own parameters (SPEC section 3).

A rule never forms a per-sample gradient; it hands tensors to the ops of vigor_kernels. The registry
is consulted in order; ``register_rule`` puts a user's rule first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

import vigor_kernels as vk
from vigor.errors import UnsupportedModuleError


@dataclass
class RuleContext:
    """What every rule needs from the engine for one scoring pass."""

    batch_size: int
    length: int
    ranges: vk.RowRanges
    backend: str | None
    linear_method: str
    module_names: dict[nn.Module, str]
    tied: dict[int, TiedPair] = field(default_factory=dict)  # id(parameter) -> pair

    def name(self, module: nn.Module) -> str:
        return self.module_names.get(module, type(module).__name__)

    def token_major(self, t: torch.Tensor, module: nn.Module, what: str) -> torch.Tensor:
        """View ``t`` as ``[B, L, (*mid,) d]``: the rows of each sample first, in token order."""
        b, n = self.batch_size, self.length
        if t.dim() >= 3 and t.shape[0] == b and t.shape[1] == n:
            return t
        if t.dim() == 2 and t.shape[0] == b * n:
            return t.reshape(b, n, t.shape[1])
        if t.dim() >= 4 and t.shape[0] == b:
            seq_dims = [i for i in range(2, t.dim() - 1) if t.shape[i] == n]
            if len(seq_dims) == 1:
                return t.movedim(seq_dims[0], 1)
        raise UnsupportedModuleError(
            f"{self.name(module)} ({type(module).__name__}): cannot map its {what} of shape {list(t.shape)} "
            f"to per-sample token rows [B={b}, L={n}, ..., d]"
        )


class Rule(Protocol):
    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        """Names of the module's own parameters this rule computes, or None if it does not apply."""

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor, ctx: RuleContext) -> tuple[Any, Any]:
        """Forward hook: ``(what to keep for the backward, replacement output or None)``."""

    def sq_norms(self, module: nn.Module, kept: Any, grad: torch.Tensor, ctx: RuleContext) -> dict[str, torch.Tensor]:
        """Backward: per-sample squared norms ``{parameter attribute: [B] float32}``."""


def _own_params(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in module._parameters.items() if p is not None)


def _affine_slope(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``d module(x) / d param``, for a module whose output is elementwise-affine in ``param``.

    That covers norm weights (``w * xhat``, Gemma's ``(1 + w) * xhat``, with or without bias) and scaled
    embeddings: ``y(param = 1) - y(param = 0)``, every other parameter set to 0, is then exactly the
    factor that turns the output gradient into the parameter's, computed by the module's own code in its
    own dtype (both evaluations are exact in floating point for these forms). The 0/1 parameters are
    stride-0 views, so even a ``[V, d]`` embedding table costs no memory.
    """
    params = dict(module.named_parameters(recurse=False))

    def run(value: float) -> torch.Tensor:
        fill = {n: torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p) for n, p in params.items()}
        fill[name] = torch.full((), value, dtype=params[name].dtype, device=params[name].device).expand_as(params[name])
        return torch.func.functional_call(module, fill, (x,))

    with torch.no_grad():
        return run(1.0) - run(0.0)


class LinearRule:
    """nn.Linear and transformers' Conv1D (weight transposed; the norm does not care)."""

    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            return _own_params(module)
        return None

    def capture(self, module, args, output, ctx):
        return ctx.token_major(args[0].detach(), module, "input"), None

    def sq_norms(self, module, kept, grad, ctx):
        g = ctx.token_major(grad, module, "output gradient")
        out = {"weight": vk.linear_weight_sq_norms(kept, g, ctx.ranges, method=ctx.linear_method, backend=ctx.backend)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = vk.bias_sq_norms(g, ctx.ranges, backend=ctx.backend)
        pair = ctx.tied.get(id(module.weight))
        if pair is not None:
            out["weight"] = out["weight"] + pair.head_side(kept, g, ctx)
        return out


@dataclass
class _EmbeddingKept:
    ids: torch.Tensor
    multiplier: torch.Tensor | None  # d output / d weight-row, for Embedding subclasses (e.g. Gemma's scale)


class EmbeddingRule:
    """nn.Embedding and subclasses whose output is an elementwise scaling of the looked-up rows."""

    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        if not isinstance(module, nn.Embedding):
            return None
        if module.scale_grad_by_freq:
            return None  # the gradient depends on token counts across the batch: not per-sample
        return _own_params(module)

    def capture(self, module, args, output, ctx):
        ids = args[0]
        replacement = None
        if ids.dim() == 2 and ids.shape[0] == 1 and ctx.batch_size > 1:
            # shared lookups (GPT-2's position ids are [1, L]): give every sample its own copy so the
            # output gradient stays per-sample instead of being summed over the batch
            ids = ids.expand(ctx.batch_size, -1)
            output = replacement = output.expand(ctx.batch_size, *output.shape[1:])
        if tuple(ids.shape) != (ctx.batch_size, ctx.length):
            raise UnsupportedModuleError(
                f"{ctx.name(module)} (Embedding) was called with ids of shape {list(ids.shape)}, "
                f"not the batch's [B={ctx.batch_size}, L={ctx.length}]"
            )
        multiplier = None
        if type(module) is not nn.Embedding:
            multiplier = _affine_slope(module, "weight", args[0])
            multiplier = multiplier.expand_as(output) if multiplier.shape != output.shape else multiplier
        pair = ctx.tied.get(id(module.weight))
        if pair is not None:
            pair.ids = ids
        return _EmbeddingKept(ids, multiplier), replacement

    def sq_norms(self, module, kept, grad, ctx):
        g = grad if kept.multiplier is None else grad * kept.multiplier
        sq = vk.embedding_sq_norms(kept.ids, g, ctx.ranges, padding_idx=module.padding_idx, backend=ctx.backend)
        pair = ctx.tied.get(id(module.weight))
        if pair is not None:
            sq = sq + pair.embedding_side(g, ctx)
        return {"weight": sq}


NORM_CLASS_NAME = re.compile(r"(RMSNorm|LayerNorm)$")


class NormRule:
    """RMSNorm / LayerNorm families: Llama/Qwen ``w * xhat``, Gemma ``(1 + w) * xhat``, LayerNorm with
    bias, per-head q/k norms. The weight gradient is ``sum_t g_t * xhat_t`` whatever the form, with
    ``xhat = d y / d w`` obtained from the module itself (see ``_affine_slope``)."""

    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        known = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or NORM_CLASS_NAME.search(type(module).__name__)
        weight = getattr(module, "weight", None)
        if not known or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            return None
        names = _own_params(module)
        return names if set(names) <= {"weight", "bias"} else None

    def capture(self, module, args, output, ctx):
        return args[0].detach(), None

    def sq_norms(self, module, kept, grad, ctx):
        xhat = _affine_slope(module, "weight", kept)
        g = ctx.token_major(grad, module, "output gradient")
        out = {
            "weight": vk.norm_weight_sq_norms(
                g, ctx.token_major(xhat, module, "input"), ctx.ranges, backend=ctx.backend
            )
        }
        if getattr(module, "bias", None) is not None:
            out["bias"] = vk.bias_sq_norms(g, ctx.ranges, backend=ctx.backend)
        return out


@dataclass
class TiedPair:
    """One weight shared by an input embedding and an LM head: ``grad = G^T H + S``, so
    ``||grad||^2 = ||G^T H||^2 + ||S||^2 + 2 <G^T H, S>``. Whichever side's gradient arrives second
    adds the cross term; the first leaves behind only a ``[B, L, d]`` tensor (never the logits gradient)."""

    embedding: nn.Embedding
    head: nn.Module
    ids: torch.Tensor | None = None
    head_rows: torch.Tensor | None = None
    embedding_grad: torch.Tensor | None = None

    def _head_rows(self, h: torch.Tensor, g_head: torch.Tensor, ctx: RuleContext) -> torch.Tensor:
        if self.ids is None:
            raise UnsupportedModuleError(
                f"tied weight of {ctx.name(self.head)}: its embedding {ctx.name(self.embedding)} did not run"
            )
        return vk.tied_head_rows(
            self.ids, h, g_head, ctx.ranges, padding_idx=self.embedding.padding_idx, backend=ctx.backend
        )

    def head_side(self, h: torch.Tensor, g_head: torch.Tensor, ctx: RuleContext) -> torch.Tensor:
        if self.embedding_grad is None:
            self.head_rows = self._head_rows(h, g_head, ctx)
            return torch.zeros(ctx.batch_size, dtype=torch.float32, device=h.device)
        cross = 2.0 * vk.row_dot(self.embedding_grad, self._head_rows(h, g_head, ctx), ctx.ranges)
        self.embedding_grad = None
        return cross

    def embedding_side(self, g_emb: torch.Tensor, ctx: RuleContext) -> torch.Tensor:
        if self.head_rows is None:
            self.embedding_grad = g_emb
            return torch.zeros(ctx.batch_size, dtype=torch.float32, device=g_emb.device)
        cross = 2.0 * vk.row_dot(g_emb, self.head_rows, ctx.ranges)
        self.head_rows = None
        return cross


_RULES: list[Rule] = [LinearRule(), EmbeddingRule(), NormRule()]


def register_rule(rule: Rule) -> None:
    """Add a rule for a module type the engine does not know; it is tried before the built-in ones."""
    _RULES.insert(0, rule)


def find_rule(module: nn.Module, wanted: set[str]) -> Rule | None:
    """The first rule that covers every parameter in ``wanted`` (the module's parameters in theta)."""
    for rule in _RULES:
        covered = rule.covers(module)
        if covered is not None and wanted <= set(covered):
            return rule
    return None


__all__ = [
    "EmbeddingRule",
    "LinearRule",
    "NormRule",
    "Rule",
    "RuleContext",
    "TiedPair",
    "find_rule",
    "register_rule",
]
