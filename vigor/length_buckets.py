"""A batch of very uneven completions scored in a few passes of similar length.

One batched pass computes every position of its ``[B, L]`` input, so a group whose completions run from
a hundred to two thousand tokens spends much of its work on padding (and attention on padded rows costs
``L^2``). Scored instead in a few chunks of rows sorted by width (the column after their last scored
token), each chunk cut after its own widest row, the passes cost ``sum over chunks of rows x width``.
Cutting columns after a sample's last scored token changes nothing it computes in a causal LM
(``TokenBatch.select``), and every sample's norm is its own, so the norms are the same numbers.

Each further pass has a fixed cost (observing a forward, one launch per layer, smaller GEMMs), charged
as ``PASS_COST`` of the unsplit area and at least ``MIN_PASS_POSITIONS`` positions: a split is made only
where it saves more than that, greedily (the split saving most first), up to ``MAX_PASSES`` passes.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_PASSES = 4
PASS_COST = 0.15  # what one more pass is charged, as a fraction of the unsplit area (rows x width)
MIN_PASS_POSITIONS = 256  # and at least this many positions: small batches are dominated by fixed costs


def _best_split(widths: list[int], lo: int, hi: int) -> tuple[int, int]:
    """``(saving, m)``: splitting the sorted rows ``[lo, hi)`` before ``m`` saves ``saving`` positions
    (rows ``[lo, m)`` are cut to width ``widths[m - 1]`` instead of ``widths[hi - 1]``); ``(0, hi)`` if
    no split saves anything."""
    widest = widths[hi - 1]
    best = (0, hi)
    for m in range(lo + 1, hi):
        saving = (m - lo) * (widest - widths[m - 1])
        if saving > best[0]:
            best = (saving, m)
    return best


def length_buckets(
    widths: Sequence[int], max_passes: int = MAX_PASSES, pass_cost: float = PASS_COST
) -> list[list[int]]:
    """Indices into ``widths`` (positions each row needs), partitioned into at most ``max_passes``
    chunks of similar width, narrowest first; a single chunk (in the given order) when no split pays."""
    n = len(widths)
    if n < 2 or max_passes < 2:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: widths[i])
    w = [widths[i] for i in order]
    charge = max(pass_cost * n * w[-1], MIN_PASS_POSITIONS)
    if n * (w[-1] - w[0]) <= charge:  # no split can save more than a pass costs (the common case)
        return [list(range(n))]
    bounds = [(0, n)]
    while len(bounds) < max_passes:
        (saving, at), k = max((_best_split(w, lo, hi), k) for k, (lo, hi) in enumerate(bounds))
        if saving <= charge:
            break
        lo, hi = bounds[k]
        bounds[k : k + 1] = [(lo, at), (at, hi)]
    if len(bounds) == 1:
        return [list(range(n))]
    return [order[lo:hi] for lo, hi in bounds]


__all__ = ["MAX_PASSES", "MIN_PASS_POSITIONS", "PASS_COST", "length_buckets"]
