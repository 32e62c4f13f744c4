"""The fused LM head in plain PyTorch: NLL, gradient w.r.t. the hidden states and per-sample head norms
from the final hidden states, in token x vocabulary chunks, never an ``N x V`` tensor.

Math (rows ``t`` of sample ``b``, ``W`` ``[V, d]``, optional bias ``c``, logit transform ``f``):
  ``r_t = W h_t + c``, ``z_t = f(r_t)`` with ``f(r) = softcap * tanh(scale * r / softcap)`` (or ``scale * r``),
  ``lse_t = log sum_v exp z_tv``, ``nll_t = lse_t - z_{t, y_t}``,
  ``G[t, v] = w_t (softmax(z_t)_v - [v = y_t]) f'(r_tv)`` (the gradient w.r.t. the raw logit ``r``),
  ``dh_t = G[t] W``, weight gradient of sample b ``G_b^T H_b``, bias gradient ``sum_{t in b} G[t]``.

Tiling: samples are grouped into row blocks of whole samples (at least ``MIN_BLOCK_ROWS`` rows, so that
the GEMMs are not starved for rows). When a block's ``rows x V`` fp32 logits fit ``block_budget`` elements
and 1/8 of the ``N x V`` logits, they are formed once (chunk by chunk over the vocabulary) and turned into
``G`` in place (one pass); otherwise the block takes two passes over the vocabulary (online logsumexp,
then ``G`` chunk by chunk), keeping as many of its first chunks' logits as ``keep_budget`` allows (at
most the block's own logits: a block in two passes is one long sample, whose logits the official loop
holds whole, and more than once) and recomputing the rest. Every per-sample quantity is a sum over vocabulary chunks c:
``||G_b^T H_b||^2 = sum_c ||G_b[:, c]^T H_b||^2`` (direct) ``= sum_c <H_b H_b^T, G_b[:, c] G_b[:, c]^T>``
(ghost), ``||sum_t G_b[t]||^2 = sum_c ||sum_t G_b[t, c]||^2``, so no per-sample ``[V, d]`` exists either.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vigor_kernels.torch_backend._chunks import budget, chunk, flat_dot

# One-pass blocks of logits: 2^26 fp32 elements (256 MiB); $VIGOR_HEAD_BLOCK_ELEMS overrides (tests use it
# to force the two-pass path).
DEFAULT_BLOCK_BUDGET = 1 << 26


# Largest temporary, as a fraction of the N x V logits: 1/8 (a sample of a group of 8 at most holds as much
# as the official loop's one-completion logits).
LOGITS_FRACTION = 8
MIN_CAP = 1 << 18
# Fewest rows a block groups (whole samples) before it is split: see head_pass.
MIN_BLOCK_ROWS = 256


def block_budget() -> int:
    return int(os.environ.get("VIGOR_HEAD_BLOCK_ELEMS", DEFAULT_BLOCK_BUDGET))


# Logits chunks a two-pass block keeps from its first pass, in all: 2^27 fp32 elements (512 MiB), so that a
# sample of up to ~880 tokens at a 152k vocabulary is never recomputed (each recomputed chunk costs its
# share of a full N x V x d GEMM); $VIGOR_HEAD_KEEP_ELEMS overrides.
DEFAULT_KEEP_BUDGET = 1 << 27


def keep_budget() -> int:
    return int(os.environ.get("VIGOR_HEAD_KEEP_ELEMS", DEFAULT_KEEP_BUDGET))


class Elementwise:
    """The elementwise work on an fp32 chunk ``z`` ``[n, c]`` of raw products ``h W^T`` (columns ``v0...`` of
    the vocabulary), in plain PyTorch. Compiled backends subclass it with fused kernels (one read and one
    write of ``z`` instead of several); the GEMMs around it stay with torch (oneDNN / cuBLAS)."""

    def finish(self, z: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None) -> None:
        """``z <- f(z + bias)`` in place: the raw products become transformed logits."""
        if bias is not None:
            z += bias.float()
        if scale != 1.0:
            z *= scale
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)

    def finish_stats(
        self, z: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None,
        targets: torch.Tensor, v0: int, want_sum: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """:meth:`finish`, then per row: ``(max_v z, sum_v exp(z - max) [fp64], z[y - v0] or 0 when y is not
        in the chunk, sum_v z [fp64] or None)``."""
        self.finish(z, bias, scale, softcap)
        m = z.amax(1)
        total = torch.exp(z - m[:, None]).sum(1, dtype=torch.float64)
        local = targets - v0
        hit = (local >= 0) & (local < z.shape[1])
        zt = torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
        return m, total, zt, (z.sum(1, dtype=torch.float64) if want_sum else None)

    def to_grad(
        self, z: torch.Tensor, lse: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, v0: int,
        scale: float, softcap: float | None, raw_bias: torch.Tensor | None = None, raw: bool = False,
    ) -> None:  # fmt: skip
        """``z <- G`` in place: ``w_t (exp(z - lse_t) - [v = y_t]) * scale * (1 - (z / softcap)^2)``; a ``raw``
        chunk (recomputed products) is first finished with ``raw_bias``."""
        if raw:
            self.finish(z, raw_bias, scale, softcap)
        slope = None
        if softcap is not None:  # d softcap*tanh(u/softcap) / du = 1 - (z/softcap)^2
            slope = torch.square(z / softcap).neg_().add_(1.0)
        z.sub_(lse[:, None]).exp_()
        rows = ((targets >= v0) & (targets < v0 + z.shape[1])).nonzero().flatten()
        z[rows, targets[rows] - v0] -= 1.0
        z.mul_(w[:, None])
        if slope is not None:
            z.mul_(slope)
        if scale != 1.0:
            z.mul_(scale)


@dataclass
class HeadSpec:
    """Everything about the head but the rows: weight ``[V, d]``, bias ``[V]`` or None, the logit transform."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None
    ew: Elementwise = field(default_factory=Elementwise)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def products(self, h: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """Raw products ``h W[v0:v1]^T`` ``[n, v1 - v0]`` in fp32 of the fp32 rows ``h``."""
        return h @ self.weight[v0:v1].float().T

    def _bias(self, v0: int, v1: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[v0:v1]

    def finish_stats(self, z: torch.Tensor, v0: int, targets: torch.Tensor, want_sum: bool):
        return self.ew.finish_stats(z, self._bias(v0, v0 + z.shape[1]), self.scale, self.softcap, targets, v0, want_sum)

    def to_grad(
        self, z: torch.Tensor, lse: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, v0: int, raw: bool
    ) -> torch.Tensor:
        """Turn logits ``z`` (columns ``v0...``; raw products if ``raw``) into ``G`` (w.r.t. the raw logits),
        in place."""
        bias = self._bias(v0, v0 + z.shape[1]) if raw else None
        self.ew.to_grad(z, lse, w, targets, v0, self.scale, self.softcap, bias, raw)
        return z


@dataclass
class HeadWants:
    grad_h: bool = False
    weight_norm: str | None = None  # "ghost", "direct" or None
    bias_norm: bool = False
    logit_sum: bool = False
    weight_grad: bool = False  # sum_b G_b^T H_b (an ordinary parameter gradient)
    bias_grad: bool = False


@dataclass
class HeadOutputs:
    lse: torch.Tensor  # [N] fp64 (sums of exps in fp64: the self-certainty subtracts it from the mean logit)
    target_logit: torch.Tensor  # [N] fp32
    logit_sum: torch.Tensor | None = None  # [N] fp64: sum_v z_tv
    grad_h: torch.Tensor | None = None  # [N, d] fp32
    weight_sq: torch.Tensor | None = None  # [B] fp32
    bias_sq: torch.Tensor | None = None  # [B] fp32
    weight_grad: torch.Tensor | None = None  # [V, d] fp32
    bias_grad: torch.Tensor | None = None  # [V] fp32


def row_blocks(offsets: tuple[int, ...], rows_max: int) -> list[tuple[int, int]]:
    """Consecutive sample ranges ``[s0, s1)`` of at most ``rows_max`` rows; a longer sample is a block
    alone. Samples without rows are skipped."""
    blocks, s0, rows = [], None, 0
    for s in range(len(offsets) - 1):
        n = offsets[s + 1] - offsets[s]
        if n == 0:
            continue
        if s0 is not None and rows + n > rows_max:
            blocks.append((s0, s))
            s0, rows = None, 0
        if s0 is None:
            s0 = s
        rows += n
    if s0 is not None:
        blocks.append((s0, len(offsets) - 1))
    return blocks


class _Block:
    """One block of whole samples: its fp32 rows and the per-chunk accumulation of every wanted output."""

    def __init__(self, h, spec, targets, w, offsets, s0, s1, wants, out):
        self.r0, self.r1 = offsets[s0], offsets[s1]
        self.spec, self.wants, self.out = spec, wants, out
        self.h = h[self.r0 : self.r1].float()
        self.targets, self.w = targets[self.r0 : self.r1], w[self.r0 : self.r1]
        # live samples as (sample, first row, last row) relative to the block
        self.samples = [(s, offsets[s] - self.r0, offsets[s + 1] - self.r0) for s in range(s0, s1)]
        self.samples = [x for x in self.samples if x[2] > x[1]]
        self.grams = None
        if wants.weight_norm == "ghost":
            self.grams = {s: self.h[a:e] @ self.h[a:e].T for s, a, e in self.samples}

    def forward_stats(self, z: torch.Tensor, v0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Finish chunk ``z`` in place; return its row maxima and sums of exps, record its target logits
        and logit sums."""
        m, total, zt, zsum = self.spec.finish_stats(z, v0, self.targets, self.out.logit_sum is not None)
        self.out.target_logit[self.r0 : self.r1] += zt
        if zsum is not None:
            self.out.logit_sum[self.r0 : self.r1] += zsum
        return m, total

    def consume(self, g: torch.Tensor, v0: int) -> None:
        """Add vocabulary chunk ``g = G[:, v0:v0+c]`` to every wanted output."""
        wants, out, v1 = self.wants, self.out, v0 + g.shape[1]
        if wants.grad_h:
            out.grad_h[self.r0 : self.r1] += g @ self.spec.weight[v0:v1].float()
        if wants.weight_grad:
            out.weight_grad[v0:v1] += g.T @ self.h
        if wants.bias_grad:
            out.bias_grad[v0:v1] += g.sum(0)
        for s, a, e in self.samples:
            gs = g[a:e]
            if wants.bias_norm:
                col = gs.sum(0)
                out.bias_sq[s] += flat_dot(col, col)
            if wants.weight_norm == "direct":
                block = gs.T @ self.h[a:e]
                out.weight_sq[s] += flat_dot(block, block)
            elif wants.weight_norm == "ghost":
                out.weight_sq[s] += flat_dot(self.grams[s], gs @ gs.T)


class _OnlineLse:
    """Running ``(max, sum of exps)`` per row over vocabulary chunks, sums in fp64."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.m = torch.full((n,), -torch.inf, dtype=torch.float32, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, m: torch.Tensor, total: torch.Tensor) -> None:
        m_new = torch.maximum(self.m, m)
        self.total = self.total * torch.exp((self.m - m_new).double()) + total * torch.exp((m - m_new).double())
        self.m = m_new

    def lse(self) -> torch.Tensor:
        return self.m.double() + self.total.log()


def _one_pass(blk: _Block, spec: HeadSpec, step: int) -> None:
    """The block's logits fit: form them once, get lse, then turn them into G in place."""
    n, vocab = blk.h.shape[0], spec.vocab
    online = _OnlineLse(n, blk.h.device)
    if step >= vocab:
        z = spec.products(blk.h, 0, vocab)
        online.add(*blk.forward_stats(z, 0))
    else:
        z = torch.empty(n, vocab, dtype=torch.float32, device=blk.h.device)
        for v0 in range(0, vocab, step):
            z[:, v0 : v0 + step] = spec.products(blk.h, v0, min(v0 + step, vocab))
            online.add(*blk.forward_stats(z[:, v0 : v0 + step], v0))
    blk.out.lse[blk.r0 : blk.r1] = online.lse()
    if not _wants_g(blk.wants):
        return
    lse = blk.out.lse[blk.r0 : blk.r1].float()
    for v0 in range(0, vocab, step):
        g = spec.to_grad(z[:, v0 : v0 + step], lse, blk.w, blk.targets, v0, raw=False)
        blk.consume(g, v0)


def _two_pass(blk: _Block, spec: HeadSpec, step: int, keep: int) -> None:
    """Online logsumexp over vocabulary chunks, then G chunk by chunk. The first chunks' logits, up to
    ``keep`` elements, are kept from the first pass; the others are recomputed."""
    n, vocab = blk.h.shape[0], spec.vocab
    online = _OnlineLse(n, blk.h.device)
    kept: dict[int, torch.Tensor] = {}
    for v0 in range(0, vocab, step):
        z = spec.products(blk.h, v0, min(v0 + step, vocab))
        online.add(*blk.forward_stats(z, v0))
        if z.numel() <= keep:
            kept[v0] = z
            keep -= z.numel()
    blk.out.lse[blk.r0 : blk.r1] = online.lse()
    if not _wants_g(blk.wants):
        return
    lse = blk.out.lse[blk.r0 : blk.r1].float()
    for v0 in range(0, vocab, step):
        z = kept.pop(v0, None)
        raw = z is None
        if raw:
            z = spec.products(blk.h, v0, min(v0 + step, vocab))
        blk.consume(spec.to_grad(z, lse, blk.w, blk.targets, v0, raw=raw), v0)


def _wants_g(w: HeadWants) -> bool:
    return w.grad_h or w.weight_norm is not None or w.bias_norm or w.weight_grad or w.bias_grad


def head_pass(
    h: torch.Tensor,
    spec: HeadSpec,
    targets: torch.Tensor,
    offsets: tuple[int, ...],
    row_weights: torch.Tensor,
    wants: HeadWants,
) -> HeadOutputs:
    """Every wanted output of the fused head for packed rows ``h`` ``[N, d]`` (see the module docstring)."""
    n_rows, d = h.shape
    vocab, batch, dev = spec.vocab, len(offsets) - 1, h.device
    f32 = dict(dtype=torch.float32, device=dev)
    lse = torch.zeros(n_rows, dtype=torch.float64, device=dev)
    out = HeadOutputs(lse=lse, target_logit=torch.zeros(n_rows, **f32))
    if wants.logit_sum:
        out.logit_sum = torch.zeros(n_rows, dtype=torch.float64, device=dev)
    if wants.grad_h:
        out.grad_h = torch.zeros(n_rows, d, **f32)
    if wants.weight_norm is not None:
        out.weight_sq = torch.zeros(batch, **f32)
    if wants.bias_norm:
        out.bias_sq = torch.zeros(batch, **f32)
    if wants.weight_grad:
        out.weight_grad = torch.zeros(vocab, d, **f32)
    if wants.bias_grad:
        out.bias_grad = torch.zeros(vocab, **f32)
    w = row_weights.float()
    # No temporary may exceed 1/LOGITS_FRACTION of the N x V logits this op replaces, nor the budgets.
    # (but 2^18 elements, 1 MiB, are always allowed: below that, chunk overheads would dominate)
    cap = max(MIN_CAP, n_rows * vocab // LOGITS_FRACTION)
    one_pass_limit, chunk_elems = min(block_budget(), cap), min(budget(), cap)
    # Blocks as large as one pass allows, and at least MIN_BLOCK_ROWS rows: a GEMM of few rows streams the
    # whole weight for little work, so a larger two-pass block beats small one-pass ones.
    rows_max = max(one_pass_limit // vocab, MIN_BLOCK_ROWS)
    for s0, s1 in row_blocks(offsets, rows_max):
        blk = _Block(h, spec, targets, w, offsets, s0, s1, wants, out)
        n = blk.r1 - blk.r0
        # [n, step] logits; a weight that is not fp32 also makes [step, d] fp32 copies of its rows
        step = max(1, min(vocab, chunk_elems // (n if spec.weight.dtype == torch.float32 else max(n, d))))
        if n * vocab <= one_pass_limit:
            _one_pass(blk, spec, step)
        else:
            _two_pass(blk, spec, step, max(one_pass_limit, min(keep_budget(), n * vocab)))
    return out


def head_tied_rows(
    h: torch.Tensor,
    spec: HeadSpec,
    targets: torch.Tensor,
    lse: torch.Tensor,
    offsets: tuple[int, ...],
    row_weights: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """``R[b, u] = sum_{t in b} G[t, ids[b, u]] h_t`` float32 ``[B, L, d]`` (0 where ``ids < 0``).

    Only the columns a sample's own ids select are needed, so they are formed directly from the saved
    ``lse``: ``Gsel = w (exp(f(h W[U]^T + c) - lse) - [y = U]) f'`` over the sample's distinct ids ``U``,
    ``[T_b, |U|]``, then ``Gsel^T H_b``; no vocabulary-sized temporary at all.
    """
    batch, length = ids.shape
    out = torch.zeros(batch, length, h.shape[1], dtype=torch.float32, device=h.device)
    w = row_weights.float()
    for b in range(batch):
        a, e = offsets[b], offsets[b + 1]
        live = ids[b] >= 0
        if e == a or not bool(live.any()):
            continue
        uniq, inverse = torch.unique(ids[b][live], return_inverse=True)
        hb, yb, wb, lb = h[a:e].float(), targets[a:e], w[a:e], lse[a:e].float()
        rows = torch.empty(uniq.shape[0], h.shape[1], dtype=torch.float32, device=h.device)
        step = chunk(uniq.shape[0], max(e - a, 1))
        for u0 in range(0, uniq.shape[0], step):
            cols = uniq[u0 : u0 + step]
            bias = None if spec.bias is None else spec.bias[cols]
            sub = HeadSpec(spec.weight[cols], bias, spec.scale, spec.softcap, spec.ew)
            z = sub.products(hb, 0, cols.shape[0])
            # targets as positions inside this column set (or -1 when y_t is not among them)
            pos = torch.searchsorted(cols, yb)
            hit = (pos < cols.shape[0]) & (cols[pos.clamp_max(cols.shape[0] - 1)] == yb)
            local = torch.where(hit, pos, -1)
            rows[u0 : u0 + step] = sub.to_grad(z, lb, wb, local, 0, raw=True).T @ hb
        out[b, live] = rows[inverse]
    return out


class HeadWith:
    """This module's tiling, GEMMs and per-sample sums around another backend's elementwise kernels: the
    ``head_pass`` / ``head_tied_rows`` members of a backend whose :class:`Elementwise` is ``make()``."""

    def __init__(self, make: Callable[[], Elementwise]) -> None:
        self.make = make

    def head_pass(
        self,
        h: torch.Tensor,
        spec: HeadSpec,
        targets: torch.Tensor,
        offsets: tuple[int, ...],
        row_weights: torch.Tensor,
        wants: HeadWants,
    ) -> HeadOutputs:
        return head_pass(h, dataclasses.replace(spec, ew=self.make()), targets, offsets, row_weights, wants)

    def head_tied_rows(
        self,
        h: torch.Tensor,
        spec: HeadSpec,
        targets: torch.Tensor,
        lse: torch.Tensor,
        offsets: tuple[int, ...],
        row_weights: torch.Tensor,
        ids: torch.Tensor,
    ) -> torch.Tensor:
        return head_tied_rows(h, dataclasses.replace(spec, ew=self.make()), targets, lse, offsets, row_weights, ids)
