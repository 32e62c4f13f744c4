"""Per-module norm rules: what a hook captures in the forward, and how the captured input and the
output gradient turn into per-sample squared norms of the module's own parameters (docs/norms.md).

A rule never forms a per-sample gradient; it hands tensors to the ops of vigor_kernels. Which sample
each row belongs to comes from the layouts the engine follows through the forward (``vigor.layout``),
never from shapes: a :class:`RowPlan` moves the sample axis first and, where the token axis is known,
the token axis second, so the kernels can skip rows that carry no gradient (the engine checks that
they carry none). The registry is consulted in order; ``register_rule`` puts a user's rule first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

import vigor_kernels as vk
from vigor.errors import UnsupportedModuleError
from vigor.layout import Axis, Layout


@dataclass(frozen=True)
class RowPlan:
    """How to view a tensor as ``[B, rows, (*mid,) d]``: sample axis (with its merge factor), and the
    token axis when known. The same plan is applied to a layer's input and its output gradient, whose
    leading dimensions correspond."""

    batch_dim: int
    inner: int
    token_dim: int | None

    def apply(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        if batch == 1 and self.batch_dim < 0:
            return t.reshape(1, -1, t.shape[-1])
        t = t.movedim(self.batch_dim, 0)
        if self.token_dim is not None:
            token = self.token_dim if self.token_dim > self.batch_dim else self.token_dim + 1
            return t.movedim(token, 1)  # [B, L, *mid, d]: the ops fold mid into rows, ranges scaled
        return t.reshape(batch, -1, t.shape[-1])


@dataclass
class RuleContext:
    """What every rule needs from the engine for one scoring pass."""

    batch_size: int
    length: int
    ranges: vk.RowRanges
    backend: str | None
    linear_method: str
    module_names: dict[nn.Module, str]
    use_ranges: bool = True
    outside_rows: list[torch.Tensor] = field(default_factory=list)  # gradient found where rows were skipped
    tied: dict[int, TiedPair] = field(default_factory=dict)  # id(shared weight) -> this pass's pair
    _outside: torch.Tensor | None = None  # flat indices of the [B, L] rows outside the ranges

    def name(self, module: nn.Module) -> str:
        return self.module_names.get(module, type(module).__name__)

    def plan(self, t: torch.Tensor, layout: Layout, module: nn.Module, what: str, *, features: bool = True) -> RowPlan:
        """The row plan of ``t`` from its layout; refuses what cannot be attributed to samples."""
        batch = layout.batch
        feature_dims = 1 if features else 0
        if self.batch_size == 1:
            return RowPlan(-1, 1, None)
        if not isinstance(batch, Axis) or batch.dim >= t.dim() - feature_dims:
            why = "combines several samples" if batch is not None else "is shared by every sample (no sample axis)"
            raise UnsupportedModuleError(
                f"{self.name(module)} ({type(module).__name__}): its {what} of shape {list(t.shape)} {why}; "
                "its rows cannot be attributed to samples, so per-sample norms would be wrong"
            )
        if t.shape[batch.dim] != self.batch_size * batch.inner:
            raise UnsupportedModuleError(
                f"{self.name(module)}: its {what} has {t.shape[batch.dim]} entries on the sample axis, "
                f"not B x {batch.inner} = {self.batch_size * batch.inner}"
            )
        token = layout.token
        token_dim = None
        if (
            self.use_ranges
            and batch.inner == 1
            and token is not None
            and token.dim < t.dim() - feature_dims
            and t.shape[token.dim] == self.length
        ):
            token_dim = token.dim
        return RowPlan(batch.dim, batch.inner, token_dim)

    def rows(self, plan: RowPlan) -> vk.RowRanges | None:
        return self.ranges if plan.token_dim is not None else None

    def check_skipped(self, g: torch.Tensor, plan: RowPlan) -> None:
        """Rows outside the ranges are skipped; record whether the gradient on skipped left padding is
        really zero (docs/engine.md#padding)."""
        if plan.token_dim is None:
            return
        if self._outside is None:
            # Rows before a sample's first attended token (left padding). Rows after its last scored
            # token cannot reach its loss in a causal model (and the self-check compares against a
            # forward that keeps them), so only the left side needs looking at.
            t = torch.arange(self.length, device=g.device)
            before = t[None, :] < self.ranges.bounds[:, :1].to(g.device)
            self._outside = before.flatten().nonzero().flatten()
        if self._outside.numel() == 0:
            return
        rows = g.reshape(g.shape[0] * g.shape[1], -1).index_select(0, self._outside)
        self.outside_rows.append(rows.ne(0).any())  # NaN counts as gradient too


class Rule(Protocol):
    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        """Names of the module's own parameters this rule computes, or None if it does not apply."""

    def capture(self, call: ModuleCall, ctx: RuleContext) -> Any:
        """Forward: what to keep for the backward, from the module's call (inputs, output, ops)."""

    def sq_norms(self, module: nn.Module, kept: Any, grad: torch.Tensor, ctx: RuleContext) -> dict[str, torch.Tensor]:
        """Backward: per-sample squared norms ``{parameter attribute: [B] float32}``."""


@dataclass
class ModuleCall:
    """One call of a hooked module, as the engine saw it."""

    module: nn.Module
    args: tuple
    kwargs: dict
    output: torch.Tensor
    layouts: dict[int, Layout]  # id(tensor) -> layout, for the inputs and the output
    ops: list[tuple[str, tuple, dict, Any]]  # (op name, args, kwargs, output) of the ops using its parameters

    def layout(self, t: torch.Tensor) -> Layout:
        from vigor.layout import layout_of

        return self.layouts.get(id(t), layout_of(t))


def _own_params(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in module._parameters.items() if p is not None)


def _forward_is(module: nn.Module, cls: type) -> bool:
    """The module computes what ``cls.forward`` computes (not overridden by a subclass or an instance)."""
    return "forward" not in module.__dict__ and getattr(type(module), "forward", None) is cls.forward


def _affine_slope(module: nn.Module, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """``d module(*args) / d param``, for a module whose output is elementwise-affine in ``param``.

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
        return torch.func.functional_call(module, fill, args, kwargs)

    with torch.no_grad():
        return run(1.0) - run(0.0)


@dataclass
class _LinearKept:
    x: torch.Tensor
    plan: RowPlan


class LinearRule:
    """nn.Linear and transformers' Conv1D (weight transposed; the norm does not care): the output is
    ``X W^T + b`` row by row, whatever the rows are."""

    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        # A subclass that rewrites forward (Falcon's ``x @ W.T + b``) is held to the same contract by
        # ``capture`` (one product with the weight, the output's shape) and by the engine's self-check.
        if isinstance(module, nn.Linear):
            return _own_params(module)
        if type(module).__name__ == "Conv1D" and "forward" not in module.__dict__:
            return _own_params(module)
        return None

    def capture(self, call, ctx):
        x = call.args[0] if call.args else next(iter(call.kwargs.values()), None)
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModuleError(f"{ctx.name(call.module)}: called without an input tensor")
        if isinstance(call.module, nn.Linear) and not _forward_is(call.module, nn.Linear):
            _check_linear_contract(call, x, ctx)
        plan = ctx.plan(x, call.layout(x), call.module, "input")
        out_batch = call.layout(call.output).batch
        in_batch = call.layout(x).batch
        if ctx.batch_size > 1 and out_batch != in_batch:
            raise UnsupportedModuleError(
                f"{ctx.name(call.module)}: its output's sample axis ({out_batch}) differs from its input's "
                f"({in_batch}); a linear layer maps rows to rows"
            )
        return _LinearKept(x.detach(), plan)

    def sq_norms(self, module, kept, grad, ctx):
        x = kept.plan.apply(kept.x, ctx.batch_size)
        g = kept.plan.apply(grad, ctx.batch_size)
        ctx.check_skipped(g, kept.plan)
        rows = ctx.rows(kept.plan)
        out = {"weight": vk.linear_weight_sq_norms(x, g, rows, method=ctx.linear_method, backend=ctx.backend)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = vk.bias_sq_norms(g, rows, backend=ctx.backend)
        pair = ctx.tied.get(id(module.weight))
        if pair is not None:
            out["weight"] = out["weight"] + pair.head_side(x, g, ctx, rows)
        return out


_PRODUCTS = frozenset({"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm"})


def _check_linear_contract(call: ModuleCall, x: torch.Tensor, ctx: RuleContext) -> None:
    """A Linear subclass with its own forward must still compute one product of its input with the weight
    (``W`` or ``W.T``) and return rows of ``out_features``."""
    module = call.module
    products = [op for op in call.ops if op[0] in _PRODUCTS]
    shape_ok = tuple(call.output.shape) == (*x.shape[:-1], module.out_features)
    if len(products) != 1 or not shape_ok or x.shape[-1] != module.in_features:
        raise UnsupportedModuleError(
            f"{ctx.name(module)} ({type(module).__name__}) overrides nn.Linear.forward with something other than "
            "one product of its input with its weight"
        )


@dataclass
class _EmbeddingKept:
    ids: torch.Tensor
    plan: RowPlan
    multiplier: torch.Tensor | None  # d output / d weight-row, for Embedding subclasses (e.g. Gemma's scale)


class EmbeddingRule:
    """nn.Embedding and subclasses whose output is an elementwise scaling of the looked-up rows. The ids
    are the ones the module really passed to ``F.embedding`` (OPT's positions come from the attention
    mask, not from its first argument)."""

    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        if not isinstance(module, nn.Embedding):
            return None
        if module.scale_grad_by_freq or module.max_norm is not None:
            return None  # the gradient depends on token counts across the batch, or the table is renormed
        return _own_params(module)

    def capture(self, call, ctx):
        lookups = [op for op in call.ops if op[0] == "embedding"]
        if len(lookups) != 1:
            raise UnsupportedModuleError(
                f"{ctx.name(call.module)} ({type(call.module).__name__}) looked up its table {len(lookups)} "
                "times in one call; the embedding rule covers exactly one lookup"
            )
        _, op_args, op_kwargs, op_out = lookups[0]
        ids = op_args[0] if op_args else op_kwargs["input"]
        multiplier = None
        if call.output is not op_out:
            multiplier = _affine_slope(call.module, "weight", call.args, call.kwargs)
            if multiplier.shape != call.output.shape:
                multiplier = multiplier.expand_as(call.output)
        plan = ctx.plan(ids, call.layout(ids), call.module, "ids", features=False)
        if ids.dim() + 1 != call.output.dim():
            raise UnsupportedModuleError(f"{ctx.name(call.module)}: output shape does not extend its ids' shape")
        pair = ctx.tied.get(id(call.module.weight))
        if pair is not None:
            pair.ids = ids
            pair.ids_plan = plan
        return _EmbeddingKept(ids, plan, multiplier)

    def sq_norms(self, module, kept, grad, ctx):
        g = grad if kept.multiplier is None else grad * kept.multiplier
        ids = kept.plan.apply(kept.ids.unsqueeze(-1), ctx.batch_size)
        ids = ids.reshape(ids.shape[0], -1)
        g = kept.plan.apply(g, ctx.batch_size)
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        ctx.check_skipped(g, kept.plan)
        rows = ctx.rows(kept.plan)
        sq = vk.embedding_sq_norms(ids, g, rows, padding_idx=module.padding_idx, backend=ctx.backend)
        pair = ctx.tied.get(id(module.weight))
        if pair is not None:
            sq = sq + pair.embedding_side(g, ctx, rows)
        return {"weight": sq}


NORM_CLASS_NAME = re.compile(r"(RMSNorm|LayerNorm)$")


_MULTIPLY = frozenset({"mul", "__mul__", "__rmul__"})


def _weight_times_operand(call: ModuleCall) -> torch.Tensor | None:
    """``xhat`` read off the forward, when the module's output is literally ``weight * xhat``: its only use
    of a parameter is one product of the weight itself with a tensor of the output's shape and dtype, and
    that product is what it returned (Llama, Qwen, Mistral RMSNorm). ``d y / d w`` is then that tensor,
    the value ``_affine_slope``'s two functional calls would compute (``1 * xhat - 0 * xhat``), without
    running the module again. None for every other form (Gemma's ``(1 + w)``, LayerNorm's fused op, a
    bias), which keeps the functional calls."""
    module = call.module
    if len(call.ops) != 1 or _own_params(module) != ("weight",):
        return None
    name, args, kwargs, out = call.ops[0]
    if name not in _MULTIPLY or kwargs or len(args) != 2 or out is not call.output:
        return None
    weight = module.weight
    others = [a for a in args if a is not weight]
    if len(others) != 1 or not isinstance(others[0], torch.Tensor):
        return None
    xhat = others[0]
    if xhat.shape != out.shape or xhat.dtype != out.dtype or weight.dtype != out.dtype:
        return None
    return xhat.detach()


@dataclass
class _NormKept:
    args: tuple | None
    kwargs: dict
    plan: RowPlan
    slope: torch.Tensor | None = None

    def xhat(self, module: nn.Module) -> torch.Tensor:
        """``d y / d weight`` (``_affine_slope``), formed once: the norm and a book-kept update both need
        it, and once it exists the module's inputs are no longer needed (dropped, so keeping this costs
        no more memory than keeping them)."""
        if self.slope is None:
            self.slope = _affine_slope(module, "weight", self.args, self.kwargs)
            self.args, self.kwargs = None, {}
        return self.slope


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

    def capture(self, call, ctx):
        if call.output.shape[-1] != call.module.weight.shape[0]:
            raise UnsupportedModuleError(f"{ctx.name(call.module)}: the weight does not scale the last dimension")
        plan = ctx.plan(call.output, call.layout(call.output), call.module, "output")
        xhat = _weight_times_operand(call)
        if xhat is not None:
            return _NormKept(None, {}, plan, slope=xhat)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in call.args)
        return _NormKept(args, dict(call.kwargs), plan)

    def sq_norms(self, module, kept, grad, ctx):
        xhat = kept.plan.apply(kept.xhat(module).expand_as(grad), ctx.batch_size)
        g = kept.plan.apply(grad, ctx.batch_size)
        ctx.check_skipped(g, kept.plan)
        rows = ctx.rows(kept.plan)
        out = {"weight": vk.norm_weight_sq_norms(g, xhat, rows, backend=ctx.backend)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = vk.bias_sq_norms(g, rows, backend=ctx.backend)
        return out


@dataclass
class TiedPair:
    """One weight shared by an input embedding and an LM head: ``grad = G^T H + S``, so
    ``||grad||^2 = ||G^T H||^2 + ||S||^2 + 2 <G^T H, S>``. Whichever side's gradient arrives second
    adds the cross term; the first leaves behind only a ``[B, L, d]`` tensor (never the logits gradient).
    State of one scoring pass: a new pair is made for every pass."""

    embedding: nn.Embedding
    head: nn.Module
    ids: torch.Tensor | None = None
    ids_plan: RowPlan | None = None
    head_rows: torch.Tensor | None = None
    embedding_grad: torch.Tensor | None = None

    def _head_rows(self, h: torch.Tensor, g_head: torch.Tensor, ctx: RuleContext, rows) -> torch.Tensor:
        if self.ids is None:
            raise UnsupportedModuleError(
                f"tied weight of {ctx.name(self.head)}: its embedding {ctx.name(self.embedding)} did not run"
            )
        ids = self.ids_plan.apply(self.ids.unsqueeze(-1), ctx.batch_size)
        ids = ids.reshape(ids.shape[0], -1)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        g_head = g_head.reshape(g_head.shape[0], -1, g_head.shape[-1])
        if ids.shape[1] != h.shape[1]:
            raise UnsupportedModuleError(
                f"tied weight of {ctx.name(self.head)} and {ctx.name(self.embedding)}: the head sees "
                f"{h.shape[1]} rows per sample and the embedding {ids.shape[1]}; the cross term needs them aligned"
            )
        return vk.tied_head_rows(ids, h, g_head, rows, padding_idx=self.embedding.padding_idx, backend=ctx.backend)

    def head_side(self, h: torch.Tensor, g_head: torch.Tensor, ctx: RuleContext, rows=None) -> torch.Tensor:
        rows = ctx.ranges if rows is None and ctx.use_ranges else rows
        return self.head_rows_side(self._head_rows(h, g_head, ctx, rows), ctx, rows)

    def head_rows_side(self, head_rows: torch.Tensor, ctx: RuleContext, rows=None) -> torch.Tensor:
        """The head side from its rows ``R [B, L, d]``, aligned with the embedding's ids, already formed
        (the fused head forms them without the logits' gradient, ``vigor.head_scoring``)."""
        rows = ctx.ranges if rows is None and ctx.use_ranges else rows
        if self.embedding_grad is None:
            self.head_rows = head_rows
            return torch.zeros(ctx.batch_size, dtype=torch.float32, device=head_rows.device)
        cross = 2.0 * vk.row_dot(self.embedding_grad, head_rows, rows)
        self.embedding_grad = None
        return cross

    def embedding_side(self, g_emb: torch.Tensor, ctx: RuleContext, rows=None) -> torch.Tensor:
        rows = ctx.ranges if rows is None and ctx.use_ranges else rows
        if self.head_rows is None:
            self.embedding_grad = g_emb
            return torch.zeros(ctx.batch_size, dtype=torch.float32, device=g_emb.device)
        cross = 2.0 * vk.row_dot(g_emb, self.head_rows, rows)
        self.head_rows = None
        return cross


_RULES: list[Rule] = [LinearRule(), EmbeddingRule(), NormRule()]


def _add_moe_rules() -> None:
    from vigor.moe_rules import ExpertsRule, RouterRule  # imports this module

    _RULES.extend([ExpertsRule(), RouterRule()])


def register_rule(rule: Rule) -> None:
    """Add a rule for a module type the engine does not know; it is tried before the built-in ones."""
    _RULES.insert(0, rule)


def unregister_rule(rule: Rule) -> None:
    """Remove a rule added with :func:`register_rule`."""
    _RULES.remove(rule)


def find_rule(module: nn.Module, wanted: set[str]) -> Rule | None:
    """The first rule that covers every parameter in ``wanted`` (the module's parameters in theta)."""
    for rule in _RULES:
        covered = rule.covers(module)
        if covered is not None and wanted <= set(covered):
            return rule
    return None


_add_moe_rules()

__all__ = [
    "EmbeddingRule",
    "LinearRule",
    "ModuleCall",
    "NormRule",
    "RowPlan",
    "Rule",
    "RuleContext",
    "TiedPair",
    "find_rule",
    "register_rule",
    "unregister_rule",
]
