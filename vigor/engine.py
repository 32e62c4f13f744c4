"""The engine: exact per-sample gradient norms of a causal LM from one batched forward and one backward.

How (SPEC section 3): every module owning a parameter of theta gets a forward hook that keeps its input
and a tensor hook on its output that receives the output gradient ``G`` during the backward; its rule
(``vigor.rules``) turns ``(X, G)`` into per-sample squared norms through vigor_kernels right away, so
nothing is held longer than autograd would hold it. All parameters are frozen during the pass, so the
backward computes input gradients only (no weight-gradient GEMMs, no ``.grad``) and stops at the first
module of theta. The model is restored exactly afterwards, also when something raises.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vigor.batch import TokenBatch, completion_nll, model_logits, prepare_batch
from vigor.errors import UnsupportedModuleError
from vigor.model_state import preserved
from vigor.params import select_params
from vigor.rules import EmbeddingRule, LinearRule, Rule, RuleContext, TiedPair, find_rule
from vigor_kernels.ops.linear import METHODS


@dataclass
class HookedModule:
    name: str
    module: nn.Module
    rule: Rule
    param_names: dict[str, str]  # attribute on the module -> canonical parameter name in theta


@dataclass
class ScoringPlan:
    """Which modules to hook with which rule, which weights are tied, what falls back to autograd."""

    theta: dict[str, nn.Parameter]
    hooked: list[HookedModule]
    tied: list[TiedPair]
    fallback: dict[str, nn.Parameter]


def plan_scoring(model: nn.Module, theta: dict[str, nn.Parameter], fallback: bool) -> ScoringPlan:
    name_of = {id(p): n for n, p in theta.items()}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    hooked, fallback_params = [], {}
    for mod_name, module in model.named_modules():
        own = {attr: name_of[id(p)] for attr, p in module._parameters.items() if p is not None and id(p) in name_of}
        if not own:
            continue
        for attr in own:
            owners.setdefault(id(module._parameters[attr]), []).append((module, attr))
        rule = find_rule(module, set(own))
        if rule is not None:
            hooked.append(HookedModule(mod_name or "<model>", module, rule, own))
        elif fallback:
            fallback_params.update({n: theta[n] for n in own.values()})
        else:
            raise UnsupportedModuleError(
                f"module '{mod_name}' ({type(module).__name__}) has trainable parameters {sorted(own)} but no "
                "per-sample norm rule; pass fallback=True for an exact (slow) per-sample autograd of it, "
                "restrict params=..., or add a rule with vigor.register_rule"
            )
    tied = [_tied_pair(hooked, pairs, model) for pairs in owners.values() if len(pairs) > 1]
    return ScoringPlan(theta, hooked, tied, fallback_params)


def _tied_pair(hooked: list[HookedModule], pairs: list[tuple[nn.Module, str]], model: nn.Module) -> TiedPair:
    names = {h.module: h.name for h in hooked}
    rules = {h.module: h.rule for h in hooked}
    emb = [m for m, _ in pairs if isinstance(rules.get(m), EmbeddingRule)]
    head = [m for m, _ in pairs if isinstance(rules.get(m), LinearRule)]
    if len(pairs) == 2 and len(emb) == 1 and len(head) == 1 and all(a == "weight" for _, a in pairs):
        return TiedPair(emb[0], head[0])
    where = ", ".join(f"{names.get(m, type(m).__name__)}.{a}" for m, a in pairs)
    raise UnsupportedModuleError(
        f"a parameter is shared by {where}: only an input embedding tied to an LM head has a cross-term rule"
    )


@dataclass
class _Capture:
    """Mutable state of one scoring pass, shared by the hooks."""

    plan: ScoringPlan
    ctx: RuleContext
    capturing: bool = True
    collecting: bool = False
    kept: dict[nn.Module, object] = field(default_factory=dict)
    totals: dict[str, torch.Tensor] = field(default_factory=dict)

    def forward_hook(self, hooked: HookedModule, module: nn.Module, args: tuple, output: object) -> object:
        if not self.capturing:
            return None  # a functional re-run of the module by a rule, or a recomputation
        if module in self.kept:
            raise UnsupportedModuleError(
                f"module '{hooked.name}' ran twice in one forward: a reused module's per-sample gradient "
                "needs cross terms between its uses, which no rule provides"
            )
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModuleError(f"module '{hooked.name}' returned {type(output).__name__}, not a tensor")
        self.capturing = False  # a rule may re-run the module functionally (see rules._elementwise_multiplier)
        try:
            kept, replacement = hooked.rule.capture(module, args, output, self.ctx)
        finally:
            self.capturing = True
        out = output if replacement is None else replacement
        if not out.requires_grad:
            # Nothing upstream is trainable (parameters are frozen for the pass): make this output a
            # leaf where the backward can stop.
            out = out.detach().requires_grad_(True)
        self.kept[module] = kept
        out.register_hook(functools.partial(self.grad_hook, hooked))
        return out if out is not output else None

    def grad_hook(self, hooked: HookedModule, grad: torch.Tensor) -> None:
        if not self.collecting:
            return
        kept = self.kept.pop(hooked.module)
        for attr, sq in hooked.rule.sq_norms(hooked.module, kept, grad, self.ctx).items():
            name = hooked.param_names.get(attr)
            if name is not None:
                self.totals[name] = self.totals[name] + sq


def graph_leaves(output: torch.Tensor, exclude: Iterable[torch.Tensor] = ()) -> list[torch.Tensor]:
    """The leaf tensors ``output`` was computed from (model parameters excluded).

    The backward targets these, wherever they came from: the leaves the forward hooks made, but also
    leaves others made, such as transformers' ``enable_input_require_grads`` hook (installed by
    gradient checkpointing), which turns a frozen embedding's output into a leaf. Targeting only the
    leaves keeps ``autograd.grad`` from returning (and holding) every layer's output gradient.
    """
    skip = {id(t) for t in exclude}
    seen, stack, leaves = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            if id(variable) not in skip:
                leaves.append(variable)
            continue
        stack.extend(parent for parent, _ in node.next_functions)
    return leaves


def _fallback_sq_norms(losses: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Exact, slow: one autograd.grad per sample through the batched graph (samples never interact)."""
    out = {n: torch.zeros(losses.shape[0], dtype=torch.float32, device=losses.device) for n in params}
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], list(params.values()), retain_graph=True, allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            if g is not None:
                out[n][b] = g.double().square().sum().float()
    return out


def score_batch(
    model: nn.Module, batch: TokenBatch, plan: ScoringPlan, backend: str | None, linear_method: str
) -> dict[str, torch.Tensor]:
    """One forward + one backward; ``{parameter name: per-sample squared norm [B]}`` for all of theta."""
    device = batch.input_ids.device
    ctx = RuleContext(
        batch_size=batch.size,
        length=batch.length,
        ranges=batch.ranges,
        backend=backend,
        linear_method=linear_method,
        module_names={h.module: h.name for h in plan.hooked},
        tied={id(pair.embedding.weight): pair for pair in plan.tied},
    )
    capture = _Capture(plan, ctx)
    capture.totals = {n: torch.zeros(batch.size, dtype=torch.float32, device=device) for n in plan.theta}
    fallback_ids = {id(p) for p in plan.fallback.values()}
    try:
        with preserved(model) as state:
            for p, _ in state.requires_grad:
                p.requires_grad_(id(p) in fallback_ids)
            for hooked in plan.hooked:
                hook = functools.partial(capture.forward_hook, hooked)
                state.handles.append(hooked.module.register_forward_hook(hook))
            with torch.enable_grad():
                losses = completion_nll(model_logits(model, batch), batch)
                capture.capturing = False
                if plan.fallback:
                    for n, sq in _fallback_sq_norms(losses, plan.fallback).items():
                        capture.totals[n] += sq
                capture.collecting = True
                roots = graph_leaves(losses, exclude=[p for p, _ in state.requires_grad])
                if roots:
                    torch.autograd.grad(losses.sum(), roots, allow_unused=True)
        return capture.totals
    finally:
        capture.kept.clear()


def per_sample_grad_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_mask: torch.Tensor,
    *,
    params: Iterable[nn.Parameter] | Iterable[str] | None = None,
    backend: str | None = None,
    per_param: bool = False,
    fallback: bool = False,
    linear_method: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``||grad_theta L_b||_2`` for each sequence b of the batch, float32 ``[B]``.

    ``L_b`` is the mean next-token NLL over sample b's completion tokens (``loss_mask``, aligned with
    ``input_ids``; SPEC section 1), at temperature 1, with the model in eval mode. theta is every
    parameter with ``requires_grad`` (``params`` restricts it, by parameter or name). A sample with no
    loss token gets 0 (its loss is defined as 0); the reward layer ranks it as invalid.

    One batched forward and one backward, no ``.grad`` written, no per-sample gradient formed; the
    model is left exactly as it was. ``backend`` (or ``$VIGOR_BACKEND``) picks the vigor_kernels
    backend; ``linear_method`` is ``auto``, ``ghost`` or ``direct``. A trainable module without a rule
    raises ``UnsupportedModuleError`` unless ``fallback=True`` (exact, one autograd call per sample).
    With ``per_param=True`` also returns ``{name: per-sample squared norm [B]}``.
    """
    if linear_method not in METHODS:
        raise ValueError(f"linear_method must be one of {METHODS}, got '{linear_method}'")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("per_sample_grad_norms needs autograd: call it outside torch.inference_mode()")
    batch = prepare_batch(model, input_ids, attention_mask, loss_mask)
    plan = plan_scoring(model, select_params(model, params), fallback)
    sq = score_batch(model, batch, plan, backend, linear_method)
    total = torch.zeros(batch.size, dtype=torch.float32, device=batch.input_ids.device)
    for v in sq.values():
        total = total + v
    norms = total.clamp_min(0).sqrt()
    return (norms, sq) if per_param else norms
