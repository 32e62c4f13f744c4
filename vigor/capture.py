"""What the engine sees of the scoring forward: every use of every parameter of theta, and where each
tensor's samples are.

A ``TorchFunctionMode`` is active for the forward, so every torch function called by the model is seen
whether or not it runs inside the module that owns its operands (docs/engine.md#uses):

- a parameter of theta (or a tensor made from one: ``W.t()``, ``1 + W``, ``W.float()``) used by an op
  while none of the modules whose rule covers it is running is an uncovered use, reported with the
  parameter, the op and the module it ran in (``F.linear(h, lm_head.weight)`` in a parent's forward,
  ``dt_proj.weight @ x``, a weight used by peft's DoRA outside its layer);
- every op's outputs get a layout from its inputs' (``vigor.layout``); an op that combines samples on
  the gradient path is reported too.

The engine turns the reports into ``UnsupportedModuleError`` (or moves the parameters to the exact
autograd fallback). A global forward pre-hook / hook pair keeps the stack of running modules so that
each report can name where it happened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vigor.layout import MIXED, Axis, Layout, func_name, inplace_target, layout_of, propagate, set_layout, tensors_in

THETA_ATTR = "_vigor_theta"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# ops that read a parameter without differentiating through it
_NO_GRADIENT = _words("""
    detach size dim numel shape dtype device is_floating_point is_complex data_ptr stride element_size
    is_contiguous requires_grad grad_fn zeros_like ones_like empty_like full_like new_zeros new_ones new_empty
    new_full isnan isinf isfinite eq ne argmax argmin __len__ __eq__ __ne__ __hash__ __bool__ __format__
    untyped_storage storage_offset nbytes itemsize _base""")


@dataclass
class Report:
    """Something the forward did that the engine cannot score exactly."""

    kind: str  # "uncovered" or "mixed"
    op: str
    where: str
    params: tuple[str, ...] = ()
    detail: str = ""

    def message(self) -> str:
        if self.detail:
            return self.detail
        if self.kind == "uncovered":
            names = ", ".join(f"'{p}'" for p in self.params)
            return f"parameter {names} was used by `{self.op}` in {self.where}, outside the module that owns it"
        return f"`{self.op}` in {self.where} combined the rows of several samples on the gradient path"


@dataclass
class OpObserver:
    """Ops using the parameters of one running hooked module, recorded for its rule."""

    ops: list[tuple[str, tuple, dict, Any]] = field(default_factory=list)


class ScoringMode(TorchFunctionMode):
    """Observes the scoring forward (see the module docstring)."""

    def __init__(
        self,
        theta_names: dict[int, str],
        owners: dict[str, list[nn.Module]],
        names: dict[nn.Module, str],
        refresh: Callable[[], dict[int, str]] | None = None,
        opaque: frozenset[nn.Module] = frozenset(),
    ):
        super().__init__()
        # Modules whose rule accounts for how their rows combine inside them (routed experts gather and
        # scatter token rows); the engine labels their output from their inputs (Rule.output_layout).
        self.opaque = opaque
        self.theta_names = theta_names  # id(parameter) -> name in theta
        # A sharded model (vigor.sharding) runs with other parameter objects than those theta holds, made
        # as it runs: on meeting an unknown parameter, ``refresh`` gives the ids of all current forms.
        self.refresh = refresh
        self.unknown: set[int] = set()
        self.owners = owners  # name in theta -> hooked modules whose rule covers it
        self.names = names  # module -> qualified name
        self.stack: list[nn.Module] = []
        self.observers: dict[nn.Module, list[OpObserver]] = {}
        self.reports: list[Report] = []
        self.paused = 0

    # -- module stack (driven by the engine's global hooks) --
    def enter(self, module: nn.Module) -> None:
        self.stack.append(module)

    def leave(self, module: nn.Module) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        elif module in self.stack:  # an exception unwound several frames
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(module) :]

    def where(self) -> str:
        for module in reversed(self.stack):
            if module in self.names:
                return f"'{self.names[module]}' ({type(module).__name__}.forward)"
        return "the model's forward"

    # -- the mode --
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        name = func_name(func)
        if name in _NO_GRADIENT:
            return out
        self._account(name, args, kwargs, out)
        self._label(name, func, args, kwargs, out)
        return out

    def _theta_operands(self, args: tuple, kwargs: dict) -> set[str]:
        used: set[str] = set()
        for t in tensors_in((args, kwargs)):
            name = self.theta_names.get(id(t))
            if name is None and self.refresh is not None and isinstance(t, nn.Parameter) and id(t) not in self.unknown:
                self.theta_names = self.refresh()
                name = self.theta_names.get(id(t))
                if name is None:
                    self.unknown.add(id(t))
            if name is not None:
                used.add(name)
            used.update(getattr(t, THETA_ATTR, ()))
        return used

    def _account(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        used = self._theta_operands(args, kwargs)
        if not used:
            return
        outputs = [t for t in tensors_in(out) if t.is_floating_point() or t.is_complex()]
        if not outputs:
            return
        # A tensor made from parameters alone (``W.t()``, ``1 + W``) stands for them; once activations
        # enter, the result is data, and its later uses are not uses of the parameters.
        pure = all(layout_of(t).batch is None for t in tensors_in((args, kwargs)))
        if pure:
            for t in outputs:
                if id(t) not in self.theta_names and not isinstance(t, nn.Parameter):
                    setattr(t, THETA_ATTR, tuple(sorted(used | set(getattr(t, THETA_ATTR, ())))))
        running = set(self.stack)
        uncovered = tuple(sorted(p for p in used if not any(m in running for m in self.owners.get(p, ()))))
        if uncovered:
            self.reports.append(Report("uncovered", name, self.where(), uncovered))
        owners = {m for p in used for m in self.owners.get(p, ())}
        for module in reversed(self.stack):
            if module in owners and module in self.observers:
                self.observers[module][-1].ops.append((name, args, kwargs, out))
                break

    def _label(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if name == "__setitem__":
            self._label_setitem(args)
            return
        targets = tensors_in(out)
        if not targets:
            return
        if inplace_target(name) and args and isinstance(args[0], torch.Tensor):
            targets = [args[0]]
        for t in targets:
            layout = propagate(func, args, kwargs, t)
            set_layout(t, layout)
            if layout.mixed and t.requires_grad and not self._in_opaque():
                self.reports.append(Report("mixed", name, self.where()))

    def _in_opaque(self) -> bool:
        return bool(self.opaque) and any(m in self.opaque for m in self.stack)

    def _label_setitem(self, args: tuple) -> None:
        """``target[index] = value``: the target keeps (or, if it held no sample data yet, takes) a layout
        under which the written region lines up with ``value``'s samples; otherwise it is mixed."""
        target, index, value = args[0], args[1], args[2]
        if not isinstance(value, torch.Tensor) or layout_of(value).batch is None:
            return
        old = layout_of(target)
        if not (isinstance(index, torch.Tensor) and index.dtype == torch.bool):
            region = target[index]
            have = propagate(_expand_to, (value, region), {}, region).batch
            if isinstance(have, Axis):
                candidates = (
                    [old] if old.batch is not None else [Layout(Axis(d, have.inner), None) for d in range(target.dim())]
                )
                for candidate in candidates:
                    set_layout(target, candidate)
                    if propagate(_getitem, (target, index), {}, region).batch == have:
                        return
        set_layout(target, Layout(MIXED, old.token))
        if (target.requires_grad or value.requires_grad) and not self._in_opaque():
            self.reports.append(Report("mixed", "__setitem__", self.where()))


def _getitem(t, index):  # named like the Tensor method so that propagate maps it as an index
    return t[index]


_getitem.__name__ = "__getitem__"


def _expand_to(t, other):
    return t.expand_as(other)


_expand_to.__name__ = "expand_as"


__all__ = ["OpObserver", "Report", "ScoringMode"]
