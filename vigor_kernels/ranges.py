"""Per-sample valid row ranges: the ragged-batch description every op accepts.

Sample ``b`` owns rows ``[start_b, end_b)`` of its ``[T, d]`` slice; every other row is treated as
zero (padding), whatever its content, so NaN or garbage in padding never reaches a norm. Ops whose
cost grows with the number of rows skip the rest, so ragged groups cost ``sum_b T_b`` (or ``T_b^2``)
rather than ``B * T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from vigor_kernels.errors import VigorInputError


@dataclass(frozen=True)
class RowRanges:
    """``bounds`` is an int64 ``[B, 2]`` tensor on the data's device; ``host`` the same on the CPU.

    The host copy lets the dispatcher reason about cost (auto method, chunk sizes) without a device
    sync per op; build one with :func:`as_row_ranges` and reuse it across the layers of a model.
    """

    bounds: torch.Tensor
    host: tuple[tuple[int, int], ...]

    @property
    def batch(self) -> int:
        return len(self.host)

    # One RowRanges serves every layer of a scoring pass: what the ops derive from ``host`` on each call
    # is computed once (cached_property writes the instance dict, which a frozen dataclass allows).
    @cached_property
    def _lengths(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in self.host)

    @cached_property
    def _window(self) -> tuple[int, int]:
        live = [(s, e) for s, e in self.host if e > s]
        if not live:
            return 0, 0
        return min(s for s, _ in live), max(e for _, e in live)

    @cached_property
    def _span(self) -> int | None:
        """The largest end, or None when some range is not ``0 <= start <= end``."""
        if not all(0 <= s <= e for s, e in self.host):
            return None
        return max((e for _, e in self.host), default=0)

    def lengths(self) -> list[int]:
        return list(self._lengths)

    def window(self) -> tuple[int, int]:
        """Smallest ``[lo, hi)`` covering every sample's rows (``(0, 0)`` if all are empty)."""
        return self._window

    def inside(self, length: int) -> bool:
        """Every sample's range is inside ``[0, length]``."""
        return self._span is not None and self._span <= length

    def outside(self, length: int) -> tuple[int, tuple[int, int]] | None:
        """The first sample whose range is not inside ``[0, length]``, with its range; None if all are."""
        if self.inside(length):
            return None
        return next((b, (s, e)) for b, (s, e) in enumerate(self.host) if not 0 <= s <= e <= length)

    def to(self, device: torch.device) -> RowRanges:
        if self.bounds.device == device:
            return self
        return RowRanges(self.bounds.to(device), self.host)

    def row_mask(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """Bool ``[B, length]``: True where row t of sample b is inside its range."""
        bounds = self.bounds if device is None else self.bounds.to(device)
        t = torch.arange(length, device=bounds.device)
        return (t[None, :] >= bounds[:, :1]) & (t[None, :] < bounds[:, 1:])


def as_row_ranges(ranges: RowRanges | torch.Tensor | None, batch: int, length: int, device: torch.device) -> RowRanges:
    """Validate and normalize ``ranges`` (None means every row of every sample is valid)."""
    if ranges is None:
        bounds = torch.tensor([[0, length]] * batch, dtype=torch.int64)
        return RowRanges(bounds.to(device), tuple((0, length) for _ in range(batch)))
    if isinstance(ranges, RowRanges):
        host = ranges.host
        bounds = ranges.bounds
    elif isinstance(ranges, torch.Tensor):
        if ranges.dtype.is_floating_point or ranges.dtype == torch.bool:
            raise VigorInputError(f"ranges must be an integer tensor, got dtype {ranges.dtype}")
        bounds = ranges
        host = tuple((int(s), int(e)) for s, e in ranges.detach().cpu().reshape(-1, 2).tolist())
    else:
        raise VigorInputError(f"ranges must be a RowRanges, an int tensor [B, 2] or None, got {type(ranges)}")
    if tuple(bounds.shape) != (batch, 2) or len(host) != batch:
        raise VigorInputError(f"ranges must have shape [B, 2] = [{batch}, 2], got {list(bounds.shape)}")
    checked = ranges if isinstance(ranges, RowRanges) else RowRanges(bounds, host)
    bad = checked.outside(length)
    if bad is not None:
        b, (s, e) = bad
        raise VigorInputError(f"ranges[{b}] = [{s}, {e}) is not inside [0, {length}]: need 0 <= start <= end <= T")
    if bounds.device == torch.device(device) and bounds.dtype == torch.int64 and bounds.is_contiguous():
        return checked  # the same object, with what it has cached
    return RowRanges(bounds.to(device=device, dtype=torch.int64).contiguous(), host)
