"""Book-kept weight gradients: the policy update's gradient from what the norm pass already captured.

When the update's loss on a batch is ``sum_b c_b L_b`` (``L_b`` the scored per-sample loss, ``c_b`` a
number per sample, docs/one-pass.md#book-keeping), the gradient of every output a hooked module produced
is ``c_b G_b`` for sample b, where ``G`` is the output gradient the norm pass hooked. A module's weight
gradient is then its usual vector-Jacobian product with the rows of sample b scaled by ``c_b``:

- linear ``y = x W^T + b``:  ``grad W = sum_b c_b G_b^T X_b = G^T (c X)`` (one GEMM; ``c X`` formed once per
  input, which q/k/v and gate/up share),  ``grad b = sum_b c_b 1^T G_b = G^T c``;
- embedding ``y = s * W[ids]``:  row ``W[v]`` gets ``sum c_b s G_bt`` over the tokens with id ``v``
  (none for ``padding_idx``, as in ``F.embedding``'s backward);
- norm ``y = w * xhat (+ bias)``:  ``grad w = sum_b c_b sum_t G_bt * xhat_bt``, ``xhat = dy/dw`` taken
  from the module itself as the norm rule does.

A tied weight gets the sum of its embedding's and its head's terms, as autograd accumulates it. Only
these three rules are book-kept; anything else (experts, routers, user rules, the autograd fallback)
leaves the update to an ordinary backward (``bookkeepable``).
"""

from __future__ import annotations

import torch
from torch import nn

from vigor.rules import EmbeddingRule, LinearRule, NormRule
from vigor_kernels.input_grams import memory_key

BOOKKEPT_RULES = (LinearRule, EmbeddingRule, NormRule)


def bookkeepable(module: nn.Module, rule: object) -> bool:
    """Whether :func:`module_grads` computes this module's weight gradients exactly."""
    if not isinstance(rule, BOOKKEPT_RULES):
        return False
    return not (isinstance(module, nn.Embedding) and module.sparse)


def kept_bytes_per_row(module: nn.Module, rule: object) -> int:
    """What book-keeping holds for one token row of a hooked module until the update (an estimate made
    before the pass): its captured input and output gradient (linear), the ids and output gradient
    (embedding), ``xhat`` and the output gradient (norm; per-head norms hold one row per head, more)."""
    size = module.weight.element_size()
    if isinstance(rule, LinearRule):
        return (module.weight.shape[0] + module.weight.shape[1]) * size
    if isinstance(rule, EmbeddingRule):
        return module.weight.shape[1] * size + 8
    if isinstance(rule, NormRule):
        return 2 * module.weight.shape[0] * size
    return 0


def _scaled(g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``g`` ``[B, ...]`` with sample b's entries times ``coef[b]``, in ``g``'s dtype."""
    return g * coef.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class ScaledInputs:
    """The rows of a captured input scaled by their sample's coefficient, for one ``write_grads``: q/k/v
    (gate/up) read the same input and come one after the other, so the last ``c X`` formed serves the next
    layer when its input is the same memory (address, offset, shape, strides, version). Every captured
    tensor is alive while this exists, so no key can be reused by other data."""

    def __init__(self, coef: torch.Tensor) -> None:
        self.coef = coef
        self._last: tuple[tuple, torch.Tensor] | None = None

    def product(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``sum_b c_b g_b^T x_b`` ``[g's width, x's width]`` for ``[B, ..., d]`` tensors: with the input's
        scaled rows when the previous layer formed them, or when the input is not the wider side (they may
        serve the next layer); else with the output gradient's."""
        key = memory_key(x)
        shared = self._last is not None and self._last[0] == key
        if not shared and g.shape[-1] < x.shape[-1]:
            return _rows(_scaled(g, self.coef)).transpose(0, 1) @ _rows(x)
        if not shared:
            self._last = (key, _rows(_scaled(x, self.coef)))
        return _rows(g).transpose(0, 1) @ self._last[1]

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """``coef`` repeated over each sample's rows of ``t`` ``[B, ...]``: ``[rows]`` in ``t``'s dtype."""
        per_sample = t.numel() // (t.shape[0] * t.shape[-1]) if t.numel() else 0
        return self.coef.to(t.dtype).repeat_interleave(per_sample)


def _linear(module: nn.Module, kept, grad: torch.Tensor, scaled: ScaledInputs, batch: int) -> dict:
    x = kept.plan.apply(kept.x, batch)
    g = kept.plan.apply(grad, batch)
    product = scaled.product(x, g)  # [out, in]
    weight = module.weight
    out = {"weight": product if isinstance(module, nn.Linear) else product.transpose(0, 1)}
    if tuple(out["weight"].shape) != tuple(weight.shape):
        raise RuntimeError(f"book-kept gradient of shape {list(out['weight'].shape)} for a weight {list(weight.shape)}")
    if getattr(module, "bias", None) is not None:
        out["bias"] = g.reshape(-1, g.shape[-1]).transpose(0, 1) @ scaled.weights(g)
    return out


def _embedding(module: nn.Embedding, kept, grad: torch.Tensor, scaled: ScaledInputs, batch: int) -> dict:
    g = grad if kept.multiplier is None else grad * kept.multiplier
    ids = kept.plan.apply(kept.ids.unsqueeze(-1), batch).reshape(-1)
    g = _scaled(kept.plan.apply(g, batch), scaled.coef).reshape(-1, grad.shape[-1])
    if module.padding_idx is not None:
        g = g.masked_fill((ids == module.padding_idx)[:, None], 0)
    return {"weight": torch.zeros_like(module.weight).index_add_(0, ids, g.to(module.weight.dtype))}


def _norm(module: nn.Module, kept, grad: torch.Tensor, scaled: ScaledInputs, batch: int) -> dict:
    xhat = kept.plan.apply(kept.xhat(module).expand_as(grad), batch)
    g = _scaled(kept.plan.apply(grad, batch), scaled.coef)
    d = module.weight.shape[0]
    out = {"weight": (g * xhat).reshape(-1, d).sum(0)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = g.reshape(-1, d).sum(0)
    return out


def module_grads(module: nn.Module, rule: object, kept, grad: torch.Tensor, scaled: ScaledInputs, batch: int) -> dict:
    """``{parameter attribute: gradient}`` of one hooked call for the loss ``sum_b coef[b] L_b``
    (``scaled.coef``; ``scaled`` is shared by the calls of one write)."""
    if isinstance(rule, LinearRule):
        return _linear(module, kept, grad, scaled, batch)
    if isinstance(rule, EmbeddingRule):
        return _embedding(module, kept, grad, scaled, batch)
    if isinstance(rule, NormRule):
        return _norm(module, kept, grad, scaled, batch)
    raise TypeError(f"no book-kept gradient for {type(rule).__name__}")


def accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    """Add ``grad`` to ``param.grad`` as autograd's accumulation would (created on first use)."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.contiguous()  # a fresh tensor (Conv1D's is a transposed view): laid out like autograd's
    else:
        param.grad.add_(grad)
