"""Save and restore everything a scoring pass changes on a model (modes, requires_grad, hooks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ModelState:
    """Per-module ``training`` flags, per-parameter ``requires_grad`` and the hooks added since."""

    def __init__(self, model: nn.Module) -> None:
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag


@contextmanager
def preserved(model: nn.Module, *, eval_mode: bool = True) -> Iterator[ModelState]:
    """Run a block with the model in eval mode (no dropout: rewards are a property of the policy), then
    put every flag back as it was, whatever the block raised."""
    state = ModelState(model)
    try:
        if eval_mode:
            model.eval()
        yield state
    finally:
        state.restore()
