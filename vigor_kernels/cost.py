"""Cost model that picks the ghost or the direct linear-weight norm for one call.

Per sample with ``T`` valid rows, in floating-point operations (2 per multiply-add):
  ghost:  the upper triangles of ``X X^T`` and ``G G^T``  = 2 * T^2 (d_in + d_out) / 2 = T^2 (d_in + d_out)
  direct: ``G^T X`` (d_out x d_in, inner dimension T)     = 2 T d_in d_out
so ghost wins while ``T < 2 d_in d_out / (d_in + d_out)`` (the harmonic mean of the two widths), scaled by
how efficiently a backend runs each form. Every backend declares ``ghost_cost_factor`` (> 1 means its ghost
kernel is relatively slower than their direct kernel), calibrated by measurement.
"""

from __future__ import annotations

from collections.abc import Sequence


def ghost_flops(lengths: Sequence[int], d_in: int, d_out: int) -> float:
    return float(sum(t * t for t in lengths)) * (d_in + d_out)


def direct_flops(lengths: Sequence[int], d_in: int, d_out: int) -> float:
    return 2.0 * float(sum(lengths)) * d_in * d_out


def crossover_length(d_in: int, d_out: int, ghost_cost_factor: float = 1.0) -> float:
    """Sequence length below which ghost is cheaper (uniform lengths)."""
    return 2.0 * d_in * d_out / ((d_in + d_out) * ghost_cost_factor)


def choose_linear_method(lengths: Sequence[int], d_in: int, d_out: int, ghost_cost_factor: float = 1.0) -> str:
    ghost = ghost_flops(lengths, d_in, d_out) * ghost_cost_factor
    return "ghost" if ghost <= direct_flops(lengths, d_in, d_out) else "direct"
