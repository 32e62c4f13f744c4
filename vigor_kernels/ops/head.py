"""The fused LM head: per-sample completion NLL, the gradient w.r.t. the final hidden states and the head's
per-sample squared gradient norms, from the hidden states at the scored positions only. No ``N x V``
logits (nor their gradient) ever exists: the backends work in token x vocabulary chunks.

Rows are *packed*: ``h`` ``[N, d]`` holds the N scored positions of all samples, sample-major, and
``offsets`` ``[B + 1]`` (cumulative counts, as flash-attention's ``cu_seqlens``) gives sample b the rows
``[offsets[b], offsets[b + 1])``. Row ``t`` predicts ``targets[t]``; ``row_weights[t]`` is the weight of
its NLL in its sample's loss (``1 / T_b`` for the mean, the default). With the logit transform
``z = softcap * tanh(scale * (W h + c) / softcap)`` (or ``scale * (W h + c)`` without soft-capping):

- ``lse_t = log sum_v exp z_tv`` by an online (chunked) logsumexp, ``nll_b = sum_t w_t (lse_t - z_{t,y_t})``;
- ``sum_v log p_t(v) = sum_v z_tv - V lse_t`` (self-certainty) without the logits;
- ``G[t, v] = w_t (softmax(z_t)_v - [v = y_t]) dz_tv/dr_tv``: ``dh = G W``, per-sample
  ``||G_b^T H_b||^2`` (ghost or direct, picked by :mod:`vigor_kernels.cost`), ``||sum_t G_b[t]||^2``,
  and the rows ``R[b, u] = (G_b^T H_b)[ids[b, u]]`` a tied input embedding needs for its cross term.

Accumulation is fp32 (sums over the vocabulary in fp64) for fp32 / bf16 / fp16 inputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from vigor_kernels._checks import FLOAT_DTYPES
from vigor_kernels.cost import choose_linear_method
from vigor_kernels.dispatch import HeadKernels, requested_backend, select_backend
from vigor_kernels.errors import BackendError, VigorInputError
from vigor_kernels.torch_backend.head import HeadOutputs, HeadSpec, HeadWants

WEIGHT_NORMS = (None, "auto", "ghost", "direct")


@dataclass(frozen=True)
class PackedRows:
    """Validated packed-row description: ``offsets`` on the host, the row -> sample map on the device."""

    offsets: tuple[int, ...]
    sample_of_row: torch.Tensor  # int64 [N]
    counts: torch.Tensor  # int64 [B]

    @property
    def batch(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> list[int]:
        return [e - s for s, e in itertools.pairwise(self.offsets)]

    def per_sample(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum of a per-row quantity over each sample's rows, float32 ``[B]``."""
        out = torch.zeros(self.batch, dtype=torch.float64, device=per_row.device)
        return out.index_add_(0, self.sample_of_row, per_row.double()).float()


def packed_rows(offsets: Sequence[int] | torch.Tensor, n_rows: int, device: torch.device) -> PackedRows:
    """Check ``offsets`` (``[B + 1]``, starting at 0, non-decreasing, ending at ``n_rows``)."""
    if isinstance(offsets, torch.Tensor):
        if offsets.dtype.is_floating_point or offsets.dtype == torch.bool or offsets.dim() != 1:
            raise VigorInputError(f"offsets must be a 1-D integer tensor, got {offsets.dtype} {list(offsets.shape)}")
        host = tuple(int(v) for v in offsets.tolist())
    else:
        try:
            host = tuple(int(v) for v in offsets)
        except (TypeError, ValueError):
            raise VigorInputError(f"offsets must be a sequence of ints or an int tensor, got {offsets!r}") from None
    if len(host) < 2 or host[0] != 0 or host[-1] != n_rows:
        raise VigorInputError(f"offsets must be [0, ..., N={n_rows}] with B + 1 entries, got {list(host)[:8]}")
    if any(b < a for a, b in itertools.pairwise(host)):
        raise VigorInputError(f"offsets must be non-decreasing, got {list(host)[:8]}")
    counts = torch.tensor([b - a for a, b in itertools.pairwise(host)], dtype=torch.int64)
    sample_of_row = torch.repeat_interleave(torch.arange(len(host) - 1), counts)
    return PackedRows(host, sample_of_row.to(device), counts.to(device))


@dataclass
class HeadResult:
    """What :func:`fused_head` returns; the fields not asked for are None."""

    nll: torch.Tensor  # [B] fp32: sum_t w_t nll_t over the sample's rows
    lse: torch.Tensor  # [N] fp64
    target_logit: torch.Tensor  # [N] fp32
    logit_sum: torch.Tensor | None  # [N] fp64: sum_v z_tv
    grad_h: torch.Tensor | None  # [N, d] fp32
    weight_sq: torch.Tensor | None  # [B] fp32: ||G_b^T H_b||^2
    bias_sq: torch.Tensor | None  # [B] fp32: ||sum_t G_b[t]||^2
    weight_grad: torch.Tensor | None  # [V, d] fp32: sum_b G_b^T H_b
    bias_grad: torch.Tensor | None  # [V] fp32
    weight_method: str | None  # the method that computed weight_sq


def _check_head(
    h: object, weight: object, bias: object, targets: object, scale: float, softcap: float | None
) -> tuple[torch.Tensor, HeadSpec]:
    for name, t in (("h", h), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise VigorInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if h.dim() != 2 or weight.dim() != 2:
        raise VigorInputError(f"h must be [N, d] and weight [V, d], got {list(h.shape)} and {list(weight.shape)}")
    if h.dtype not in FLOAT_DTYPES or weight.dtype != h.dtype:
        raise VigorInputError(f"h and weight must share one float dtype (fp32/bf16/fp16): {h.dtype}, {weight.dtype}")
    if weight.shape[1] != h.shape[1]:
        raise VigorInputError(f"weight is {list(weight.shape)}: its width must equal h's d = {h.shape[1]}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise VigorInputError(f"bias must be a [V={weight.shape[0]}] tensor or None")
        if bias.dtype != h.dtype:
            raise VigorInputError(f"bias has dtype {bias.dtype}, h {h.dtype}: they must match")
    if targets.dim() != 1 or targets.shape[0] != h.shape[0] or targets.dtype.is_floating_point:
        raise VigorInputError(f"targets must be integer [N={h.shape[0]}], got {targets.dtype} {list(targets.shape)}")
    devices = {t.device for t in (h, weight, targets, *(() if bias is None else (bias,)))}
    if len(devices) > 1:
        raise VigorInputError(f"h, weight, bias and targets are on different devices: {sorted(map(str, devices))}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise VigorInputError(f"targets must be token ids in [0, V={weight.shape[0]})")
    if not (math.isfinite(scale) and scale != 0.0):
        raise VigorInputError(f"scale must be finite and non-zero, got {scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0.0):
        raise VigorInputError(f"softcap must be a positive number or None, got {softcap}")
    return targets.to(torch.int64), HeadSpec(weight, bias, float(scale), None if softcap is None else float(softcap))


def _row_weights(row_weights: torch.Tensor | None, rows: PackedRows, n_rows: int, device: torch.device) -> torch.Tensor:
    if row_weights is None:
        per_sample = 1.0 / rows.counts.clamp_min(1).to(torch.float32)
        return per_sample[rows.sample_of_row]
    if not isinstance(row_weights, torch.Tensor) or tuple(row_weights.shape) != (n_rows,):
        raise VigorInputError(f"row_weights must be a float tensor [N={n_rows}] or None")
    if not row_weights.dtype.is_floating_point or not bool(torch.isfinite(row_weights).all()):
        raise VigorInputError("row_weights must be finite floats")
    return row_weights.to(device=device, dtype=torch.float32)


def _backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> HeadKernels:
    """The backend for a head op: the selected one if it has the head kernels; under ``auto`` a backend
    without them gives way to ``torch`` (every backend but torch is optional for this op family)."""
    chosen = select_backend(backend, device, dtype)
    if isinstance(chosen, HeadKernels):
        return chosen
    if requested_backend(backend) != "auto":
        raise BackendError(f"backend '{chosen.name}' has no fused LM-head kernel; use 'torch' or 'auto'")
    return cast(HeadKernels, select_backend("torch", device, dtype))  # the torch backend has them


def fused_head(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    offsets: Sequence[int] | torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    grad_h: bool = False,
    weight_norm: str | None = None,
    bias_norm: bool = False,
    logit_sum: bool = False,
    weight_grad: bool = False,
    bias_grad: bool = False,
    backend: str | None = None,
) -> HeadResult:
    """Per-sample NLL and, on request, ``dL/dh``, the head's per-sample squared norms, ``sum_v z`` and the
    ordinary parameter gradients, in one pass over the vocabulary (see the module docstring).

    h: ``[N, d]`` hidden states at the scored positions (packed by ``offsets``); weight ``[V, d]`` (and
    bias ``[V]``) in h's dtype; targets ``[N]``. ``weight_norm``: None, ``auto``, ``ghost`` or ``direct``.
    """
    if weight_norm not in WEIGHT_NORMS:
        raise VigorInputError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
    targets, spec = _check_head(h, weight, bias, targets, scale, softcap)
    rows = packed_rows(offsets, h.shape[0], h.device)
    w = _row_weights(row_weights, rows, h.shape[0], h.device)
    be = _backend(backend, h.device, h.dtype)
    method = weight_norm
    if weight_norm == "auto":
        method = choose_linear_method(rows.lengths(), h.shape[1], weight.shape[0], be.head_ghost_cost_factor)
    has_bias = bias is not None
    wants = HeadWants(grad_h, method, bias_norm and has_bias, logit_sum, weight_grad, bias_grad and has_bias)
    out: HeadOutputs = be.head_pass(h, spec, targets, rows.offsets, w, wants)
    nll = rows.per_sample(w * (out.lse - out.target_logit))
    return HeadResult(
        nll, out.lse, out.target_logit, out.logit_sum, out.grad_h, out.weight_sq, out.bias_sq,
        out.weight_grad, out.bias_grad, method,
    )  # fmt: skip


def head_tied_rows(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    offsets: Sequence[int] | torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``R[b, u] = sum_{t in b} G[t, ids[b, u]] h_t``: for each input token u of sample b, the row of its
    per-sample head weight gradient ``G_b^T H_b`` that a tied input embedding meets; float32
    ``[B, L, d]``, zero where ``ids[b, u] < 0``. ``lse`` is :func:`fused_head`'s. The cross term of a
    tied weight is then ``2 sum_u g_emb[b, u] . R[b, u]``.
    """
    targets, spec = _check_head(h, weight, bias, targets, scale, softcap)
    rows = packed_rows(offsets, h.shape[0], h.device)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != rows.batch:
        raise VigorInputError(f"ids must be an integer tensor [B={rows.batch}, L]")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise VigorInputError(f"ids must be integers (-1 for no row), got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= weight.shape[0]):
        raise VigorInputError(f"ids must be in [0, V={weight.shape[0]}) or -1")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (h.shape[0],):
        raise VigorInputError(f"lse must be the [N={h.shape[0]}] tensor fused_head returned")
    w = _row_weights(row_weights, rows, h.shape[0], h.device)
    be = _backend(backend, h.device, h.dtype)
    return be.head_tied_rows(h, spec, targets, lse, rows.offsets, w, ids.to(h.device, torch.int64))
