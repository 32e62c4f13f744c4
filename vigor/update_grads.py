"""Book-kept weight gradients: the policy update's gradient from what the norm pass already captured.

When the update's loss on a batch is ``sum_b c_b L_b`` (``L_b`` the scored per-sample loss, ``c_b`` a
number per sample, docs/one-pass.md#book-keeping), the gradient of every output a hooked module produced
is ``c_b G_b`` for sample b, where ``G`` is the output gradient the norm pass hooked. A module's weight
gradient is then its usual vector-Jacobian product with the rows of sample b scaled by ``c_b``:

- linear ``y = x W^T + b``:  ``grad W = sum_b c_b G_b^T X_b`` (one GEMM),  ``grad b = sum_b c_b 1^T G_b``;
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

BOOKKEPT_RULES = (LinearRule, EmbeddingRule, NormRule)


def bookkeepable(module: nn.Module, rule: object) -> bool:
    """Whether :func:`module_grads` computes this module's weight gradients exactly."""
    if not isinstance(rule, BOOKKEPT_RULES):
        return False
    return not (isinstance(module, nn.Embedding) and module.sparse)


def _scaled(g: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``g`` ``[B, ...]`` with sample b's entries times ``coef[b]``, in ``g``'s dtype."""
    return g * coef.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))


def _linear(module: nn.Module, kept, grad: torch.Tensor, coef: torch.Tensor, batch: int) -> dict:
    x = kept.plan.apply(kept.x, batch)
    g = _scaled(kept.plan.apply(grad, batch), coef)
    x = x.reshape(-1, x.shape[-1])
    g = g.reshape(-1, g.shape[-1])
    product = g.transpose(0, 1) @ x  # [out, in]
    weight = module.weight
    out = {"weight": product if isinstance(module, nn.Linear) else product.transpose(0, 1)}
    if tuple(out["weight"].shape) != tuple(weight.shape):
        raise RuntimeError(f"book-kept gradient of shape {list(out['weight'].shape)} for a weight {list(weight.shape)}")
    if getattr(module, "bias", None) is not None:
        out["bias"] = g.sum(0)
    return out


def _embedding(module: nn.Embedding, kept, grad: torch.Tensor, coef: torch.Tensor, batch: int) -> dict:
    g = grad if kept.multiplier is None else grad * kept.multiplier
    ids = kept.plan.apply(kept.ids.unsqueeze(-1), batch).reshape(-1)
    g = _scaled(kept.plan.apply(g, batch), coef).reshape(-1, grad.shape[-1])
    if module.padding_idx is not None:
        g = g.masked_fill((ids == module.padding_idx)[:, None], 0)
    return {"weight": torch.zeros_like(module.weight).index_add_(0, ids, g.to(module.weight.dtype))}


def _norm(module: nn.Module, kept, grad: torch.Tensor, coef: torch.Tensor, batch: int) -> dict:
    xhat = kept.plan.apply(kept.xhat(module).expand_as(grad), batch)
    g = _scaled(kept.plan.apply(grad, batch), coef)
    d = module.weight.shape[0]
    out = {"weight": (g * xhat).reshape(-1, d).sum(0)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = g.reshape(-1, d).sum(0)
    return out


def module_grads(module: nn.Module, rule: object, kept, grad: torch.Tensor, coef: torch.Tensor, batch: int) -> dict:
    """``{parameter attribute: gradient}`` of one hooked call for the loss ``sum_b coef[b] L_b``."""
    if isinstance(rule, LinearRule):
        return _linear(module, kept, grad, coef, batch)
    if isinstance(rule, EmbeddingRule):
        return _embedding(module, kept, grad, coef, batch)
    if isinstance(rule, NormRule):
        return _norm(module, kept, grad, coef, batch)
    raise TypeError(f"no book-kept gradient for {type(rule).__name__}")


def accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    """Add ``grad`` to ``param.grad`` as autograd's accumulation would (created on first use)."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.contiguous()  # a fresh tensor (Conv1D's is a transposed view): laid out like autograd's
    else:
        param.grad.add_(grad)
