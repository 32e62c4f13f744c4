"""Rules for mixture-of-experts layers: routed experts with fused 3-D weights, and their routers.

Routed experts (transformers' ``@use_experts_implementation`` modules: Qwen2-MoE, Qwen3-MoE, Mixtral,
GPT-OSS, ...) receive ``(hidden [N, d], top_k_index [N, k], top_k_weights [N, k])`` and compute, for
every routed pair ``s = (token t, slot j)`` with expert ``e = top_k_index[t, j]``::

    u_s = x_t W_up[e] (+ b_up[e]);   a_s = gate(u_s);   y_s = a_s W_down[e] (+ b_down[e])
    out[t] = sum_j top_k_weights[t, j] * y_s

so the gradient of ``W_down[e]`` for sample b is ``sum_s dy_s a_s^T`` with ``dy_s = w_s g_t``, and that of
``W_up[e]`` is ``sum_s du_s x_t^T`` with ``du_s`` the backward of ``gate`` at ``u_s`` applied to
``dy_s W_down[e]``, the sums running over the pairs of sample b routed to e (docs/moe.md). The pairs are
taken from the routing the forward really used (the module's own ``top_k_index``), and each token row's
sample from the layout the engine followed to the module's input, never from row counts.

Inside the module rows are gathered and scattered, which the op-level layout check would call mixing;
the experts rule is *opaque*: it vouches that output row t depends on input row t (and row t of the
routing) only, the engine labels the output with the input's layout, and the rule computes the norms.

The routed pairs are sorted by (expert, sample) and the groups padded into ``[experts * B, width, d]``
batches (experts taken in chunks whose padding stays within twice the routed rows), handed to the same
vigor_kernels ops as dense layers with per-group row ranges: one op call covers every sample of a chunk
of experts, and ``auto`` picks ghost or direct from the groups' row counts.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

import vigor_kernels as vk
from vigor.errors import UnsupportedModuleError
from vigor.layout import Layout, layout_of
from vigor.rules import LinearRule, ModuleCall, RuleContext

# experts implementations that compute the eager forward's function (the others are fused kernels whose
# numerics this rule has not been checked against)
EXPERTS_IMPLEMENTATIONS = (None, "eager", "grouped_mm", "batched_mm")


def _routing_args(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden, top_k_index, top_k_weights)`` by position in the experts class's own signature."""
    forward = inspect.unwrap(type(module).forward)
    bound = inspect.signature(forward).bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    if len(values) != 3 or not all(isinstance(v, torch.Tensor) for v in values):
        raise UnsupportedModuleError(
            f"{type(module).__name__}: expected to be called with (hidden_states, top_k_index, top_k_weights)"
        )
    return values[0], values[1], values[2]


def _param(module: nn.Module, name: str) -> nn.Parameter | None:
    p = module._parameters.get(name)
    return p if isinstance(p, nn.Parameter) else None


class ExpertsRule:
    """transformers' routed experts with 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` weights,
    with or without per-expert biases, either storage order (``is_transposed``)."""

    opaque = True

    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate") or "forward" in module.__dict__:
            return None
        up = "gate_up_proj" if module.has_gate else "up_proj"
        names = [up, "down_proj"]
        if getattr(module, "has_bias", False):
            names += [f"{up}_bias", "down_proj_bias"]
        own = {n for n, p in module._parameters.items() if p is not None}
        if not set(names) <= own or own - set(names):
            return None
        if any(_param(module, n).dim() != 3 for n in names[:2]):
            return None
        return tuple(names)

    def _refuse_unknown(self, module: nn.Module, ctx: RuleContext) -> None:
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
        problems = []
        if impl not in EXPERTS_IMPLEMENTATIONS:
            problems.append(f"experts implementation '{impl}' (covered: eager, grouped_mm, batched_mm)")
        if getattr(module, "has_post_expert_norm", False):
            problems.append("a norm after each expert")
        if getattr(module, "_is_expert_parallel", False):
            problems.append("expert parallelism")
        if "_apply_gate" in module.__dict__:
            problems.append("an instance-level _apply_gate")
        if problems:
            raise UnsupportedModuleError(
                f"{ctx.name(module)} ({type(module).__name__}): the experts rule does not cover "
                + ", ".join(problems)
                + "; pass fallback=True"
            )

    def output_layout(self, module: nn.Module, args: tuple, kwargs: dict, output, ctx: RuleContext) -> Layout:
        """Output row t is made from input row t and routing row t only: it keeps the input's layout,
        provided the routing rows line up with the input's."""
        self._refuse_unknown(module, ctx)
        hidden, index, weights = _routing_args(module, args, kwargs)
        if not isinstance(output, torch.Tensor) or output.shape != hidden.shape or hidden.dim() != 2:
            raise UnsupportedModuleError(
                f"{ctx.name(module)}: expected hidden states [tokens, d] and an output of the same shape"
            )
        if index.shape[0] != hidden.shape[0] or weights.shape != index.shape:
            raise UnsupportedModuleError(
                f"{ctx.name(module)}: routing {list(index.shape)} / {list(weights.shape)} does not match "
                f"the hidden states {list(hidden.shape)} row for row"
            )
        layout = layout_of(hidden)
        # The indices only select experts (no gradient), row by row. The weights carry the router's
        # gradient: row t must be sample t's own (or a constant shared by every sample).
        routing = layout_of(weights).batch
        if ctx.batch_size > 1 and routing != layout.batch and not (routing is None and not weights.requires_grad):
            raise UnsupportedModuleError(
                f"{ctx.name(module)}: its routing weights are not laid out by sample like its hidden states "
                f"({routing} vs {layout.batch}); routed rows cannot be attributed to samples"
            )
        return Layout(layout.batch, None)

    def capture(self, call: ModuleCall, ctx: RuleContext) -> _ExpertsKept:
        module = call.module
        hidden, index, weights = _routing_args(module, call.args, call.kwargs)
        n = hidden.shape[0]
        experts = _param(module, "down_proj").shape[0]
        if bool(((index < 0) | (index >= experts)).any()):
            raise UnsupportedModuleError(f"{ctx.name(module)}: routing indices outside [0, {experts})")
        plan = ctx.plan(hidden, call.layout(hidden), module, "hidden states")
        if ctx.batch_size == 1:
            sample = torch.zeros(n, dtype=torch.int64, device=hidden.device)
            position = None
        else:
            sample = torch.arange(n, device=hidden.device) // plan.inner
            position = torch.arange(n, device=hidden.device) % plan.inner if plan.inner == ctx.length else None
        return _ExpertsKept(hidden.detach(), index.detach(), weights.detach(), sample, position)

    def sq_norms(self, module: nn.Module, kept: _ExpertsKept, grad: torch.Tensor, ctx: RuleContext):
        up_name = "gate_up_proj" if module.has_gate else "up_proj"
        w_up, w_down = _param(module, up_name).detach(), _param(module, "down_proj").detach()
        b_up, b_down = _param(module, f"{up_name}_bias"), _param(module, "down_proj_bias")
        pairs = _route(kept, grad, ctx, w_down.shape[0])
        b = ctx.batch_size
        zero = torch.zeros(b, dtype=torch.float32, device=grad.device)
        out = {up_name: zero, "down_proj": zero}
        if b_up is not None:
            out[f"{up_name}_bias"] = zero
        if b_down is not None:
            out["down_proj_bias"] = zero
        for chunk in pairs.chunks():
            x, dy = (t.to(w_down.dtype) for t in pairs.padded(chunk, kept.hidden))  # [e, b * width, d]
            lo, hi = chunk.experts
            u = torch.bmm(x, w_up[lo:hi] if module.is_transposed else w_up[lo:hi].transpose(1, 2))
            if b_up is not None:
                u = u + b_up.detach()[lo:hi, None, :]
            with torch.enable_grad():
                u = u.detach().requires_grad_(True)
                a = module._apply_gate(u) if module.has_gate else module.act_fn(u)
                down = w_down[lo:hi].transpose(1, 2) if module.is_transposed else w_down[lo:hi]
                (du,) = torch.autograd.grad(a, u, torch.bmm(dy, down))
            a = a.detach()

            def per_group(t: torch.Tensor, chunk=chunk) -> torch.Tensor:
                return t.reshape(-1, chunk.width, t.shape[-1])

            def total(sq: torch.Tensor) -> torch.Tensor:
                return sq.reshape(-1, b).sum(0)

            def weight(inputs: torch.Tensor, grads: torch.Tensor, chunk=chunk) -> torch.Tensor:
                sq = vk.linear_weight_sq_norms(
                    per_group(inputs), per_group(grads), chunk.ranges, method=ctx.linear_method, backend=ctx.backend
                )
                return total(sq)

            out[up_name] = out[up_name] + weight(x, du)
            out["down_proj"] = out["down_proj"] + weight(a, dy)
            if b_up is not None:
                sq = vk.bias_sq_norms(per_group(du), chunk.ranges, backend=ctx.backend)
                out[f"{up_name}_bias"] = out[f"{up_name}_bias"] + total(sq)
            if b_down is not None:
                sq = vk.bias_sq_norms(per_group(dy), chunk.ranges, backend=ctx.backend)
                out["down_proj_bias"] = out["down_proj_bias"] + total(sq)
        return out


@dataclass
class _ExpertsKept:
    hidden: torch.Tensor  # [N, d]
    index: torch.Tensor  # [N, k]
    weights: torch.Tensor  # [N, k]
    sample: torch.Tensor  # [N]: the sample of each token row
    position: torch.Tensor | None  # [N]: the row's token position, when rows are whole [B, L] sequences


@dataclass
class _Chunk:
    """Experts ``[lo, hi)`` padded to ``width`` rows per (expert, sample) group; group ``(e - lo) * B + b``
    holds its rows ``[0, n_{e,b})``."""

    experts: tuple[int, int]
    width: int
    ranges: vk.RowRanges


@dataclass
class _Routed:
    """Routed pairs sorted by (expert, sample, token): their token rows, (expert, sample) groups, ranks
    inside the group and output gradients ``w_s g_t``; ``counts[e][b]`` pairs per group."""

    token: torch.Tensor
    group: torch.Tensor
    rank: torch.Tensor
    dy: torch.Tensor
    counts: list[list[int]]
    batch: int

    def chunks(self) -> list[_Chunk]:
        """Experts in consecutive chunks whose padded rows stay within twice the routed rows (or one
        expert), so skewed routing (one expert takes every token) costs no ``E x`` padding."""
        widths = [max(1, max(row)) for row in self.counts]
        budget = max(2 * int(self.token.numel()), 1)
        out, lo = [], 0
        while lo < len(widths):
            hi, width = lo + 1, widths[lo]
            while hi < len(widths) and (hi + 1 - lo) * self.batch * max(width, widths[hi]) <= budget:
                width = max(width, widths[hi])
                hi += 1
            counts = [c for row in self.counts[lo:hi] for c in row]
            bounds = torch.tensor([[0, c] for c in counts], dtype=torch.int64, device=self.token.device)
            out.append(_Chunk((lo, hi), width, vk.RowRanges(bounds, tuple((0, c) for c in counts))))
            lo = hi
        return out

    def padded(self, chunk: _Chunk, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = chunk.experts
        first, last = lo * self.batch, hi * self.batch
        sel = (self.group >= first) & (self.group < last)
        slot = (self.group[sel] - first) * chunk.width + self.rank[sel]
        rows = (last - first) * chunk.width
        x = hidden.new_zeros(rows, hidden.shape[-1])
        x[slot] = hidden[self.token[sel]]
        dy = self.dy.new_zeros(rows, self.dy.shape[-1])
        dy[slot] = self.dy[sel]
        return x.reshape(hi - lo, -1, x.shape[-1]), dy.reshape(hi - lo, -1, dy.shape[-1])


def _route(kept: _ExpertsKept, grad: torch.Tensor, ctx: RuleContext, experts: int) -> _Routed:
    n, k = kept.index.shape
    b = ctx.batch_size
    token = torch.arange(n, device=grad.device).repeat_interleave(k)
    expert = kept.index.reshape(-1)
    weight = kept.weights.reshape(-1)
    if kept.position is not None and ctx.use_ranges:
        # rows outside a sample's range (padding, tokens after its last scored one) are skipped, as the
        # dense rules do, and the engine is told if their gradient was not zero (it then rescores all rows)
        valid = ctx.ranges.row_mask(ctx.length, grad.device).reshape(-1)
        ctx.outside_rows.append(((grad != 0).any(-1) & ~valid).any())
        keep = valid[token]
        token, expert, weight = token[keep], expert[keep], weight[keep]
    group = expert * b + kept.sample[token]
    order = torch.argsort(group * n + token)
    token, group, weight = token[order], group[order], weight[order]
    counts = torch.bincount(group, minlength=experts * b)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.numel(), device=grad.device) - starts[group]
    dy = grad[token] * weight[:, None].to(torch.promote_types(grad.dtype, weight.dtype))
    return _Routed(token, group, rank, dy, counts.reshape(experts, b).tolist(), b)


ROUTER_CLASS = re.compile(r"(TopKRouter|Router)$")


class RouterRule(LinearRule):
    """A router whose only use of its parameters is ``F.linear(hidden, self.weight, self.bias)`` (the
    router logits) and that returns routing decisions rather than a tensor: an ordinary linear layer
    whose output gradient is that of the logits. The gradient through the top-k softmax of the routing
    weights reaches the experts' output only through the logits, so it is in that gradient."""

    def covers(self, module: nn.Module) -> tuple[str, ...] | None:
        if not ROUTER_CLASS.search(type(module).__name__) or isinstance(module, nn.Linear):
            return None
        own = {n for n, p in module._parameters.items() if p is not None}
        weight = _param(module, "weight")
        if weight is None or weight.dim() != 2 or not own <= {"weight", "bias"}:
            return None
        return tuple(sorted(own))

    def _logits_op(self, call: ModuleCall, ctx: RuleContext):
        module = call.module
        linear = [op for op in call.ops if op[0] == "linear"]
        if len(call.ops) != 1 or len(linear) != 1:
            raise UnsupportedModuleError(
                f"{ctx.name(module)} ({type(module).__name__}): the router rule covers exactly one "
                f"F.linear of its weight; its forward used its parameters in {[op[0] for op in call.ops]}"
            )
        _, args, kwargs, out = linear[0]
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if weight is not module.weight or bias is not _param(module, "bias"):
            raise UnsupportedModuleError(f"{ctx.name(module)}: its F.linear does not use its own weight and bias")
        return args[0] if args else kwargs["input"], out

    def grad_tensor(self, call: ModuleCall, ctx: RuleContext) -> torch.Tensor:
        return self._logits_op(call, ctx)[1]

    def capture(self, call, ctx):
        x, logits = self._logits_op(call, ctx)
        if call.output is not logits:
            raise UnsupportedModuleError(f"{ctx.name(call.module)}: the hooked tensor is not the router's logits")
        return super().capture(ModuleCall(call.module, (x,), {}, logits, {id(logits): layout_of(logits)}, []), ctx)


__all__ = ["EXPERTS_IMPLEMENTATIONS", "ExpertsRule", "RouterRule"]
