"""The engine: exact per-sample gradient norms of a causal LM from one batched forward and one backward.

How (docs/engine.md): every module owning a parameter of theta that a rule covers gets a forward hook,
placed before any user hook, that keeps what its rule needs, and a tensor hook on its raw output that
receives the output gradient ``G`` during the backward; the rule (``vigor.rules``) turns them into
per-sample squared norms through vigor_kernels right away. All parameters are frozen during the pass, so
the backward computes input gradients only (no weight-gradient GEMMs, no ``.grad``).

What makes it exact rather than hopeful (docs/engine.md#guarantees):

- every use of every parameter of theta during the forward is observed at the op level
  (``vigor.capture``); a use outside a module whose rule covers it is refused, or, with
  ``fallback=True``, that parameter is scored by exact per-sample autograd instead;
- which sample each row belongs to is followed op by op (``vigor.layout``), never guessed from shapes;
  an op that combines samples on the gradient path is refused (or, with ``fallback=True``, all of theta
  goes to the autograd fallback);
- rows are skipped (padding, tokens after the last scored one) only where the backward shows their
  gradient is zero; otherwise the pass is run again over all rows;
- compiled models (``torch.compile``) are run eagerly for the scoring pass, so every hook fires;
- a self-check (``self_check``) compares one row's per-parameter norms with plain autograd the first
  time a (model, theta, dtype, backend) is scored, and raises if they disagree.

The model is restored exactly afterwards, also when something raises.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

import vigor_kernels as vk
from vigor import head_scoring
from vigor.batch import TokenBatch, completion_nll, model_logits, prepare_batch
from vigor.capture import OpObserver, Report, ScoringMode
from vigor.errors import SelfCheckError, UnsupportedModuleError
from vigor.layout import Axis, Layout, layout_of, set_layout
from vigor.length_buckets import length_buckets
from vigor.model_state import preserved
from vigor.params import select_params
from vigor.rules import EmbeddingRule, LinearRule, ModuleCall, Rule, RuleContext, TiedPair, find_rule
from vigor.sharding import agree, aliases, compute_dtype, forms, fsdp_params, is_sharded
from vigor_kernels import LINEAR_METHODS

log = logging.getLogger("vigor")

SELF_CHECK_ENV = "VIGOR_SELF_CHECK"
SELF_CHECK_MODES = ("off", "first", "always")
# The self-check compares one row of the batched pass with a forward of that row alone: in float32 they
# agree to ~1e-6; in bf16/fp16 the two forwards round differently, so the bound is the documented
# bf16 tolerance of the engine. A rule that is wrong is off by far more than either.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 5e-2}


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
    tied: list[tuple[nn.Embedding, nn.Module]]
    fallback: dict[str, nn.Parameter]
    head: head_scoring.FusedHeadPlan | None = None  # the fused LM head (vigor.head_scoring), not hooked

    def owners(self) -> dict[str, list[nn.Module]]:
        out: dict[str, list[nn.Module]] = {}
        for h in self.hooked:
            for name in h.param_names.values():
                out.setdefault(name, []).append(h.module)
        return out


def _dora_hint(module: nn.Module) -> str:
    if "dora" in type(module).__name__.lower():
        return " (peft DoRA, use_dora=True: its magnitude and adapters enter the weight itself, which no rule covers)"
    return ""


def plan_scoring(
    model: nn.Module, theta: dict[str, nn.Parameter], fallback: bool, to_fallback: Iterable[str] = ()
) -> ScoringPlan:
    """Rules for the modules owning theta; ``to_fallback``: parameters the autograd fallback must score."""
    to_fallback = set(to_fallback)
    name_of = {id(p): n for n, p in theta.items()}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    hooked, fallback_params = [], {n: theta[n] for n in to_fallback}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        own = {attr: name_of[id(p)] for attr, p in module._parameters.items() if p is not None and id(p) in name_of}
        if not own or any(h.module is module for h in hooked):
            continue
        for attr in own:
            owners.setdefault(id(module._parameters[attr]), []).append((module, attr))
        rule = find_rule(module, set(own))
        if rule is None:
            if not fallback:
                raise UnsupportedModuleError(
                    f"module '{mod_name}' ({type(module).__name__}){_dora_hint(module)} has trainable parameters "
                    f"{sorted(own)} but no per-sample norm rule; pass fallback=True for an exact (slow) per-sample "
                    "autograd of them, restrict params=..., or add a rule with vigor.register_rule"
                )
            fallback_params.update({n: theta[n] for n in own.values()})
            continue
        own = {a: n for a, n in own.items() if n not in to_fallback}
        if own:
            hooked.append(HookedModule(mod_name or "<model>", module, rule, own))
    tied = []
    for pairs in owners.values():
        if len(pairs) > 1 and not any(name_of[id(m._parameters[a])] in fallback_params for m, a in pairs):
            tied.append(_tied_pair(hooked, pairs))
    return ScoringPlan(theta, hooked, tied, fallback_params)


def _tied_pair(hooked: list[HookedModule], pairs: list[tuple[nn.Module, str]]) -> tuple[nn.Embedding, nn.Module]:
    names = {h.module: h.name for h in hooked}
    rules = {h.module: h.rule for h in hooked}
    emb = [m for m, _ in pairs if isinstance(rules.get(m), EmbeddingRule)]
    head = [m for m, _ in pairs if isinstance(rules.get(m), LinearRule)]
    if len(pairs) == 2 and len(emb) == 1 and len(head) == 1 and all(a == "weight" for _, a in pairs):
        return emb[0], head[0]
    where = ", ".join(f"{names.get(m, type(m).__name__)}.{a}" for m, a in pairs)
    raise UnsupportedModuleError(
        f"a parameter is shared by {where}: only an input embedding tied to an LM head has a cross-term rule; "
        "pass fallback=True to score it by exact per-sample autograd"
    )


@dataclass
class SharedUpdate:
    """A scoring pass whose forward the policy update reuses (``vigor.one_pass``).

    ``trainable``: ids of the parameters that keep ``requires_grad`` in the forward; the graph is then
    retained after the norms' backward so the update can run its own backward on the same forward.
    ``keep``: keep each hooked module's capture and output gradient, from which the update's weight
    gradient is book-kept when it is a per-sample multiple of the scored loss (``vigor.update_grads``).
    """

    trainable: frozenset[int] = frozenset()
    keep: bool = False
    kept: list[tuple[HookedModule, object, torch.Tensor]] = field(default_factory=list)
    logits: torch.Tensor | None = None

    def reset(self) -> None:
        self.kept.clear()
        self.logits = None


class _Retry(Exception):
    """The forward showed uses the fast path cannot score: run again with these parameters in fallback."""

    def __init__(self, names: set[str]) -> None:
        super().__init__(sorted(names))
        self.names = names


@dataclass
class _Pass:
    """Mutable state of one scoring pass, shared by the hooks."""

    ctx: RuleContext
    mode: ScoringMode
    allow_fallback: bool = False
    capturing: bool = True
    collecting: bool = False
    kept: dict[nn.Module, object] = field(default_factory=dict)
    refused: set = field(default_factory=set)
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    share: SharedUpdate | None = None
    outs: list[torch.Tensor] = field(default_factory=list)  # hooked outputs, when the graph is shared
    # The gradient hooks live on the graph and point back here; removed after the pass, since a graph held
    # from here (the shared logits, a kept input) would otherwise form a cycle through autograd's C++ nodes
    # that Python's collector cannot break: the graph and its activations would leak.
    grad_hooks: list = field(default_factory=list)

    def pre_hook(self, hooked: HookedModule, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.capturing or module in self.refused:
            return
        if module in self.kept or self.mode.observers.get(module):
            self._refuse(
                hooked,
                UnsupportedModuleError(
                    f"module '{hooked.name}' ran twice in one forward: a reused module's per-sample gradient "
                    "needs cross terms between its uses, which no rule provides; pass fallback=True"
                ),
            )
            return
        self.mode.observers.setdefault(module, []).append(OpObserver())

    def _refuse(self, hooked: HookedModule, err: UnsupportedModuleError) -> None:
        """Without fallback, raise; with it, leave this module to the autograd fallback (after a retry)."""
        if not self.allow_fallback:
            raise err
        self.refused.add(hooked.module)
        self.kept.pop(hooked.module, None)
        self.mode.observers.pop(hooked.module, None)
        self.mode.reports.append(Report("uncovered", "", "", tuple(hooked.param_names.values()), str(err)))

    def forward_hook(self, hooked: HookedModule, module: nn.Module, args: tuple, kwargs: dict, output: object):
        recomputed = self.collecting and module not in self.refused and isinstance(output, torch.Tensor)
        if recomputed and torch.is_grad_enabled() and not output.requires_grad:
            # Activation checkpointing recomputes the module in the backward: its output must be a leaf that
            # requires grad as in the scoring forward, or the recomputation saves other tensors and fails.
            return output.detach().requires_grad_(True)
        if not self.capturing or module in self.refused:
            return None  # a functional re-run of the module by a rule, a recomputation, or left to fallback
        observed = self.mode.observers[module].pop()
        self.mode.paused += 1
        self.capturing = False  # a rule may re-run the module functionally (see rules._affine_slope)
        try:
            if hasattr(hooked.rule, "grad_tensor"):
                self._hook_inner(hooked, module, args, kwargs, output, observed)
                return None
            if getattr(hooked.rule, "opaque", False):
                # rows combined inside the module (routed experts): its rule says whose rows its output has
                set_layout(output, hooked.rule.output_layout(module, args, kwargs, output, self.ctx))
            if not isinstance(output, torch.Tensor):
                raise UnsupportedModuleError(f"module '{hooked.name}' returned {type(output).__name__}, not a tensor")
            out, layout = self._per_sample_output(hooked, output)
            call = ModuleCall(module, args, kwargs, out, {id(out): layout}, observed.ops)
            if out is not output:
                call.layouts.update(self._expanded_inputs(observed, layout))
            kept = hooked.rule.capture(call, self.ctx)
            if not out.requires_grad:
                # Nothing upstream is trainable (parameters are frozen for the pass): make this output a
                # leaf where the backward can stop.
                out = out.detach().requires_grad_(True)
            set_layout(out, layout)
            self.kept[module] = kept
            self.grad_hooks.append(out.register_hook(functools.partial(self.grad_hook, hooked)))
            if self.share is not None and self.share.trainable:
                self.outs.append(out)
        except UnsupportedModuleError as err:
            self._refuse(hooked, err)
            return None
        finally:
            self.mode.paused -= 1
            self.capturing = True
        return out if out is not output else None

    def _hook_inner(self, hooked: HookedModule, module: nn.Module, args, kwargs, output, observed: OpObserver) -> None:
        """A rule that needs the gradient of a tensor computed inside the module (a router's logits, when
        the module returns routing decisions): hook that tensor, leave the module's output alone."""
        call = ModuleCall(module, args, kwargs, output, {}, observed.ops)
        target = hooked.rule.grad_tensor(call, self.ctx)
        if not target.requires_grad:
            raise UnsupportedModuleError(
                f"module '{hooked.name}': the tensor its rule needs the gradient of carries none (nothing before "
                "it is scored), so its per-sample gradient cannot be observed; pass fallback=True"
            )
        call.output = target
        call.layouts[id(target)] = layout_of(target)
        self.kept[module] = hooked.rule.capture(call, self.ctx)
        self.grad_hooks.append(target.register_hook(functools.partial(self.grad_hook, hooked)))

    def _per_sample_output(self, hooked: HookedModule, output: torch.Tensor) -> tuple[torch.Tensor, Layout]:
        """The module's output with a sample axis: a lookup shared by every sample (GPT-2's positions,
        ``[1, L, d]``) is expanded so each sample gets its own gradient instead of the batch's sum."""
        layout = layout_of(output)
        b = self.ctx.batch_size
        if layout.batch is not None or b == 1:
            return output, layout
        if output.dim() >= 2 and output.shape[0] == 1:
            token = Axis(1) if output.dim() > 2 and output.shape[1] == self.ctx.length else None
            return output.expand(b, *output.shape[1:]), Layout(Axis(0), token)
        raise UnsupportedModuleError(
            f"module '{hooked.name}' produced an output of shape {list(output.shape)} that no sample owns "
            "(it does not depend on the batch), so its gradient cannot be split by sample"
        )

    def _expanded_inputs(self, observed: OpObserver, layout: Layout) -> dict[int, Layout]:
        """Ids shared by every sample, expanded like the output (see ``_per_sample_output``)."""
        out = {}
        for i, (name, args, kwargs, res) in enumerate(observed.ops):
            if name == "embedding" and args and args[0].dim() >= 1 and args[0].shape[0] == 1:
                ids = args[0].expand(self.ctx.batch_size, *args[0].shape[1:])
                observed.ops[i] = (name, (ids, *args[1:]), kwargs, res)
                out[id(ids)] = Layout(Axis(0), layout.token)
        return out

    def grad_hook(self, hooked: HookedModule, grad: torch.Tensor) -> None:
        if not self.collecting or hooked.module not in self.kept:
            return
        kept = self.kept.pop(hooked.module)
        for attr, sq in hooked.rule.sq_norms(hooked.module, kept, grad, self.ctx).items():
            name = hooked.param_names.get(attr)
            if name is not None:
                self.totals[name] = self.totals[name] + sq
        if self.share is not None and self.share.keep:
            self.share.kept.append((hooked, kept, grad))


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


def graph_frontier(output: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Those of ``tensors`` from which no other of them can be reached in ``output``'s graph.

    A backward that targets them computes the gradient of every one of ``tensors`` (each lies on a path
    from ``output`` to one of them, so its gradient hook fires) without returning all those gradients at
    once, and without the weight gradients of parameters that require grad.
    """
    nodes = {t.grad_fn for t in tensors if t.grad_fn is not None}
    below: dict[object, bool] = {}  # node -> a node of ``tensors`` is reachable strictly below it
    stack = [(output.grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        if node is None or (node in below and not expanded):
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if not expanded:
            below[node] = False
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in below)
            continue
        below[node] = any(c in nodes or below.get(c, False) for c in children)
    return [t for t in tensors if t.grad_fn in below and not below[t.grad_fn]]


def _fallback_sq_norms(losses: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Exact, slow: one autograd.grad per sample through the batched graph."""
    out = {n: torch.zeros(losses.shape[0], dtype=torch.float32, device=losses.device) for n in params}
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], list(params.values()), retain_graph=True, allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            if g is not None:
                out[n][b] = g.double().square().sum().float()
    return out


def _check_global_hooks() -> None:
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks:
        raise UnsupportedModuleError(
            "global module forward hooks are registered (torch.nn.modules.module.register_module_forward_hook): "
            "they run before the engine's hooks and may change module outputs it relies on; remove them for scoring"
        )


def _forward(
    model: nn.Module,
    batch: TokenBatch,
    plan: ScoringPlan,
    ctx: RuleContext,
    state,
    allow_fallback: bool,
    share: SharedUpdate | None = None,
):
    """The observed forward: ``(per-sample losses, logits, the pass, the mode's reports)``."""
    from torch.nn.modules import module as module_mod

    names = {h.module: h.name for h in plan.hooked}
    names.update({m: n or "<model>" for n, m in model.named_modules()})
    theta_ids = {id(p): n for n, p in plan.theta.items() if n not in plan.fallback}
    refresh = None
    if is_sharded(model):  # FSDP2 runs the model with other parameter objects, made as it runs

        def refresh() -> dict[int, str]:
            ctx.tied.update(_tied_ids(model, ctx.tied.values()))
            return aliases(model, theta_ids)

    opaque = frozenset(h.module for h in plan.hooked if getattr(h.rule, "opaque", False))
    mode = ScoringMode(theta_ids, plan.owners(), names, refresh, opaque)
    scoring = _Pass(ctx, mode, allow_fallback, share=share)
    device = batch.input_ids.device
    scoring.totals = {n: torch.zeros(ctx.batch_size, dtype=torch.float32, device=device) for n in plan.theta}
    for hooked in plan.hooked:
        state.handles.append(
            hooked.module.register_forward_pre_hook(
                functools.partial(scoring.pre_hook, hooked), prepend=True, with_kwargs=True
            )
        )
        state.handles.append(
            hooked.module.register_forward_hook(
                functools.partial(scoring.forward_hook, hooked), prepend=True, with_kwargs=True
            )
        )
    _check_global_hooks()
    state.handles.append(module_mod.register_module_forward_pre_hook(lambda m, a: mode.enter(m)))
    state.handles.append(module_mod.register_module_forward_hook(lambda m, a, o: mode.leave(m), always_call=True))
    for t in (batch.input_ids, batch.attention_mask):
        set_layout(t, Layout(Axis(0), Axis(1)))
    with torch.compiler.set_stance("force_eager"), mode:
        # the fused head: the backbone's hidden states, never the [B, L, V] logits
        out = model_logits(model, batch) if plan.head is None else plan.head.head.hidden_states(batch)
    if refresh is not None:  # forms made after the last use (reshard_after_forward=int), seen by the backward
        refresh()
    for handle in state.handles[-2:]:
        handle.remove()
    del state.handles[-2:]
    scoring.capturing = False
    lay = layout_of(out)
    if ctx.batch_size > 1 and lay.batch != Axis(0) and not mode.reports:
        what = "logits" if plan.head is None else "final hidden states"
        raise UnsupportedModuleError(
            f"the model's {what} {list(out.shape)} could not be traced back to one sample per row "
            f"(their sample axis is {lay.batch}); per-sample norms would be wrong"
        )
    if plan.head is not None:  # outside the mode: the fused op's uses of the head's weight are its own
        return head_scoring.fused_losses(plan.head, model, batch, out, ctx, scoring), None, scoring, mode.reports
    return completion_nll(out, batch), out, scoring, mode.reports


def score_batch(
    model: nn.Module,
    batch: TokenBatch,
    plan: ScoringPlan,
    backend: str | None,
    linear_method: str,
    *,
    use_ranges: bool = True,
    allow_fallback: bool = False,
    share: SharedUpdate | None = None,
) -> dict[str, torch.Tensor]:
    """One forward + one backward; ``{parameter name: per-sample squared norm [B]}`` for all of theta.
    With ``share``, the forward is also kept for a policy update (see :class:`SharedUpdate`)."""
    ctx = RuleContext(
        batch_size=batch.size,
        length=batch.length,
        ranges=batch.ranges,
        backend=backend,
        linear_method=linear_method,
        module_names={h.module: h.name for h in plan.hooked},
        use_ranges=use_ranges,
    )
    ctx.tied = _tied_ids(model, [TiedPair(emb, head) for emb, head in plan.tied])
    keep_grad = {id(p) for p in plan.fallback.values()}
    if share is not None:
        share.reset()
        keep_grad |= share.trainable
    scoring = None
    try:
        with preserved(model) as state:
            for p, _ in state.requires_grad:
                p.requires_grad_(id(p) in keep_grad)
            _freeze_other_forms(model, state)
            # no autocast: the norms are those of the model in its own dtype, as the oracle computes them
            with torch.enable_grad(), torch.autocast(batch.input_ids.device.type, enabled=False):
                losses, logits, scoring, reports = _forward(model, batch, plan, ctx, state, allow_fallback, share)
                if not plan.hooked and plan.head is None:  # all of theta in the fallback: exact whatever the model does
                    reports = []
                if ctx.batch_size == 1:  # one sample: no op can combine samples ([1, L, d] -> [L, d] merges axes)
                    reports = [r for r in reports if r.kind != "mixed"]
                if reports:
                    _handle_reports(reports, plan, allow_fallback)
                if plan.fallback:
                    for n, sq in _fallback_sq_norms(losses, plan.fallback).items():
                        scoring.totals[n] += sq
                scoring.collecting = True
                roots = graph_leaves(losses, exclude=[p for p, _ in state.requires_grad])
                retain = share is not None and bool(share.trainable)
                if retain:  # parameters require grad: stop at the hooked outputs, not at the parameters
                    taken = {id(t) for t in roots}
                    roots += [t for t in graph_frontier(losses, scoring.outs) if id(t) not in taken]
                    scoring.outs.clear()
                if share is not None:
                    share.logits = logits
                if roots:
                    with vk.shared_input_grams():  # q/k/v (gate/up) form their common input's Gram once
                        torch.autograd.grad(losses.sum(), roots, allow_unused=True, retain_graph=retain)
        # every process of a sharded model runs the second pass if any needs it: a pass is a collective
        if agree(bool(ctx.outside_rows) and bool(torch.stack(ctx.outside_rows).any()), model):
            log.info("vigor: skipped rows carried gradient (padding that is not masked out): rescoring all rows")
            return score_batch(model, batch, plan, backend, linear_method, use_ranges=False, allow_fallback=False)
        return scoring.totals
    finally:
        if scoring is not None:
            scoring.kept.clear()
            for handle in scoring.grad_hooks:
                handle.remove()


def _tied_ids(model: nn.Module, pairs: Iterable[TiedPair]) -> dict[int, TiedPair]:
    """The rules find a tied pair by ``id(module.weight)``: under FSDP2 that is any form of the weight."""
    out = {}
    for pair in pairs:
        out.update({i: pair for i in aliases(model, {id(pair.embedding.weight): ""})})
    return out


def _freeze_other_forms(model: nn.Module, state) -> None:
    """FSDP2 copies ``requires_grad`` to the unsharded form only when it gathers it again; a model left
    unsharded (``reshard_after_forward=False`` after a no-grad generation) still has it set. Frozen like
    the rest (and restored) so the backward computes no weight gradient."""
    listed = {id(p) for p, _ in state.requires_grad}
    for fp in fsdp_params(model):
        for p in forms(fp):
            if id(p) not in listed:
                state.requires_grad.append((p, p.requires_grad))
                p.requires_grad_(False)


def _handle_reports(reports, plan: ScoringPlan, allow_fallback: bool) -> None:
    uncovered = {p for r in reports if r.kind == "uncovered" for p in r.params}
    mixed = [r for r in reports if r.kind == "mixed"]
    if allow_fallback:
        raise _Retry(set(plan.theta) if mixed else uncovered)
    seen, lines = set(), []
    for r in reports:
        if r.message() not in seen:
            seen.add(r.message())
            lines.append(r.message())
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    raise UnsupportedModuleError(
        "the scoring forward did something the exact fast path does not cover: "
        + "; ".join(lines[:3])
        + more
        + ". Pass fallback=True to score the affected parameters by exact per-sample autograd (slow)."
    )


@dataclass
class SelfCheck:
    """The outcome of one self-check: the row compared and the largest per-parameter relative error."""

    row: int
    max_rel_err: float
    tolerance: float
    seconds: float
    worst: str


# ids, attention and loss mask of one two-token row: what a process of a sharded model with no completion to
# score runs so that it takes part in the collectives of the others' pass (its numbers are dropped)
_PLACEHOLDER = torch.tensor([[[0, 0]], [[1, 1]], [[0, 1]]])

LAST_SELF_CHECK: SelfCheck | None = None
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _self_check_mode(value: str | None) -> str:
    mode = value if value is not None else os.environ.get(SELF_CHECK_ENV, "first")
    if mode not in SELF_CHECK_MODES:
        raise ValueError(f"self_check must be one of {SELF_CHECK_MODES} (or ${SELF_CHECK_ENV}), got '{mode}'")
    return mode


def _self_check(model: nn.Module, batch: TokenBatch, theta: dict[str, nn.Parameter], sq: dict, row: int) -> SelfCheck:
    """Row ``row`` (of ``batch``) scored alone by plain autograd against the engine's numbers."""
    from vigor.oracle import oracle_grad_norms

    global LAST_SELF_CHECK
    t0 = time.perf_counter()
    one = batch.row(row)
    _, ref = oracle_grad_norms(
        model, one.input_ids, one.attention_mask, one.loss_mask, params=list(theta), per_param=True
    )
    dtype = compute_dtype(model, next(iter(theta.values())))  # FSDP2 may run fp32 parameters in bf16
    tol = SELF_CHECK_TOLERANCE.get(dtype, 5e-2)
    total = sum(float(v[0]) for v in ref.values())
    floor = max(total, 1e-30) * (1e-4 if dtype in (torch.float32, torch.float64) else 1e-2)
    errors = {}
    for n, v in ref.items():
        want, got = float(v[0]), float(sq[n][row])
        errors[n] = (abs(got - want) / max(want, floor), got, want)
    worst = max(errors, key=lambda n: errors[n][0]) if errors else ""
    result = SelfCheck(row, errors[worst][0] if errors else 0.0, tol, time.perf_counter() - t0, worst)
    LAST_SELF_CHECK = result
    bad = sorted((n for n, e in errors.items() if not e[0] <= tol), key=lambda n: -errors[n][0])
    if bad:
        detail = "; ".join(f"{n}: engine {errors[n][1]:.6g}, autograd {errors[n][2]:.6g}" for n in bad[:5])
        raise SelfCheckError(
            f"self-check failed: on one completion the per-sample squared gradient norms of {len(bad)} parameter(s) "
            f"disagree with plain autograd beyond {tol:g} relative ({detail}). The engine's numbers for this model "
            "would be wrong. Please report it with the model's class, config and the vigor-kernels version; "
            "fallback=True or params=... without these parameters avoids the rule at fault."
        )
    log.info("vigor self-check passed: max relative error %.2e on row %d (%s)", result.max_rel_err, row, worst)
    return result


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
    self_check: str | None = None,
    head: str | None = None,
    split_by_length: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``||grad_theta L_b||_2`` for each sequence b of the batch, float32 ``[B]``.

    ``L_b`` is the mean next-token NLL over sample b's completion tokens (``loss_mask``, aligned with
    ``input_ids``; docs/reward.md), at temperature 1, with the model in eval mode. theta is every
    parameter with ``requires_grad`` (``params`` restricts it, by parameter or name; an empty theta is
    an error). A sample with no loss token gets 0 (its loss is defined as 0); the reward layer ranks it
    as invalid.

    One batched forward and one backward, no ``.grad`` written, no per-sample gradient formed; the
    model is left exactly as it was. ``backend`` (or ``$VIGOR_BACKEND``) picks the vigor_kernels
    backend; ``linear_method`` is ``auto``, ``ghost`` or ``direct``. Anything the exact fast path does
    not cover raises ``UnsupportedModuleError`` naming it, unless ``fallback=True`` (exact, one autograd
    call per sample for the parameters concerned). ``self_check`` (``first``, the default, ``always`` or
    ``off``; ``$VIGOR_SELF_CHECK``) compares one row with plain autograd, costing about 1/B of the call,
    and raises ``SelfCheckError`` on disagreement. ``head`` (``auto``, the default, ``fused`` or
    ``materialized``; ``$VIGOR_HEAD``): score the LM head without ``[B, L, V]`` logits when it can be fused
    (``vigor.head_scoring``; ``fused`` refuses when it cannot), or always through the model's logits. With
    ``per_param=True`` also returns ``{name: per-sample squared norm [B]}``. ``split_by_length``: score
    very uneven completions in a few passes of rows of similar length, each cut after its own longest
    (``vigor.length_buckets``; the same norms, less padding; never for an FSDP2-sharded model, whose
    processes must run the same passes).
    """
    check_call("per_sample_grad_norms", linear_method)
    check_mode = _self_check_mode(self_check)
    head_mode = head_scoring.head_mode(head)
    batch = prepare_batch(model, input_ids, attention_mask, loss_mask)
    theta = select_params(model, params)
    device = batch.input_ids.device
    sq = {n: torch.zeros(batch.size, dtype=torch.float32, device=device) for n in theta}
    rows, scored = batch.scored_rows()
    if fallback and is_sharded(model):
        raise UnsupportedModuleError(
            "fallback=True is not supported on an FSDP2-sharded model: the per-sample autograd fallback runs one "
            "backward (a collective) per completion, which processes with different batches cannot agree on"
        )
    if agree(bool(rows), model):
        if not rows:  # a sharded model's pass is a collective: this process takes part with a placeholder row
            scored = prepare_batch(model, *_PLACEHOLDER.to(device))
        split = split_by_length and not is_sharded(model)
        for i, (chunk, part) in enumerate(_passes(batch, rows, scored) if split else [(rows, scored)]):
            part_sq = _score(model, part, theta, fallback, backend, linear_method, head_mode)
            if chunk:
                index = torch.tensor(chunk, device=device)
                for n, v in part_sq.items():
                    sq[n][index] = v
            if i == 0:
                self_check_once(model, part, theta, part_sq, check_mode, (backend, fallback), row=0)
    norms = checked_norms(sq, batch.size, device)
    return (norms, sq) if per_param else norms


def _passes(batch: TokenBatch, rows: list[int], scored: TokenBatch) -> list[tuple[list[int], TokenBatch]]:
    """``(rows, their batch)`` per pass: ``scored`` whole, or a few passes of rows of similar length
    (vigor.length_buckets), each cut after its widest row."""
    chunks = length_buckets(batch.scored_widths(rows))
    if len(chunks) == 1:
        return [(rows, scored)]
    picked = [[rows[i] for i in chunk] for chunk in chunks]
    return [(p, batch.scored_part(p)) for p in picked]


def check_call(name: str, linear_method: str) -> None:
    """What every scoring entry point refuses before touching the model."""
    if linear_method not in LINEAR_METHODS:
        raise ValueError(f"linear_method must be one of {LINEAR_METHODS}, got '{linear_method}'")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} needs autograd: call it outside torch.inference_mode()")


def self_check_once(
    model: nn.Module, scored: TokenBatch, theta: dict, sq: dict, mode: str, variant: tuple, row: int
) -> None:
    """The self-check of ``mode`` (see ``per_sample_grad_norms``) on row ``row`` of ``scored``."""
    backend, fallback = variant
    backend_key = backend or os.environ.get("VIGOR_BACKEND")
    key = (tuple(theta), next(iter(theta.values())).dtype, backend_key, fallback, head_scoring.LAST_HEAD.fused)
    done = _CHECKED.setdefault(model, set())
    if mode == "always" or (mode == "first" and key not in done):
        _self_check(model, scored, theta, sq, row)
        done.add(key)


def checked_norms(sq: dict[str, torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    """``sqrt(sum over parameters)`` of per-parameter squared norms, refusing non-finite ones."""
    total = torch.zeros(size, dtype=torch.float32, device=device)
    for v in sq.values():
        total = total + v
    if not bool(torch.isfinite(total).all()):
        bad = (~torch.isfinite(total)).nonzero().flatten().tolist()[:5]
        raise FloatingPointError(
            f"per-sample gradient norms are not finite for rows {bad}: the model's forward or backward produced "
            "inf/NaN on them (check the inputs and the model's dtype)"
        )
    return total.clamp_min(0).sqrt()


def _score(
    model,
    scored: TokenBatch,
    theta,
    fallback: bool,
    backend,
    linear_method,
    head_mode: str = "auto",
    share: SharedUpdate | None = None,
) -> dict[str, torch.Tensor]:
    head, why_not = head_scoring.find_head(model, head_mode)  # before any hook: it may run the model
    to_fallback: set[str] = set()
    for _ in range(3):
        plan = plan_scoring(model, theta, fallback, to_fallback)
        choice = head_scoring.fuse_plan(plan, head, head_mode, why_not)
        try:
            sq = score_batch(model, scored, plan, backend, linear_method, allow_fallback=fallback, share=share)
            head_scoring.LAST_HEAD = choice
            return sq
        except _Retry as retry:
            log.info(
                "vigor: scoring %s by per-sample autograd (the fast path does not cover them)", sorted(retry.names)
            )
            to_fallback |= retry.names
    plan = plan_scoring(model, theta, fallback, set(theta))
    head_scoring.LAST_HEAD = head_scoring.fuse_plan(plan, head, head_mode, why_not)
    return score_batch(model, scored, plan, backend, linear_method, allow_fallback=False, share=share)
