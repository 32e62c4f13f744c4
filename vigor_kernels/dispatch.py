"""Backend registry and selection.

A backend is a module exposing ``BACKEND``, an object with the members of :class:`Backend` (and of
:class:`HeadKernels` when it has the fused LM head's kernels). Modules are
imported lazily, so a broken optional backend (no triton, a failed C++ build) never stops the package
from importing: it is reported by :func:`available_backends` with its reason instead.

Selection, per call: the ``backend`` argument, else the ``VIGOR_BACKEND`` environment variable, else
``auto``, which takes the first backend in :data:`AUTO_ORDER` for the tensors' device that can serve
them. A backend named explicitly that cannot serve the call raises :class:`BackendError` saying why.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from vigor_kernels.errors import BackendError
from vigor_kernels.ranges import RowRanges

if TYPE_CHECKING:
    from vigor_kernels.torch_backend.head import HeadOutputs, HeadSpec, HeadWants

BACKEND_MODULES = {
    "torch": "vigor_kernels.torch_backend",
    "triton": "vigor_kernels.triton_backend",
    "cpp": "vigor_kernels.cpp_backend",
    "cuda": "vigor_kernels.cuda_backend",
}
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "VIGOR_BACKEND"


class Backend(Protocol):
    """What every backend implements, and all that the dispatcher and the ops read of it. Inputs arrive
    validated and normalized by vigor_kernels.ops: 3-D feature tensors ``[B, T, d]`` on one device,
    ``RowRanges`` on that device, ids with ``-1`` for tokens that carry no gradient. Every method returns
    float32."""

    name: str
    serves: str  # what it runs on, in which dtypes (shown by available_backends)
    ghost_cost_factor: float  # its ghost kernel's cost per flop relative to its direct one (vigor_kernels.cost)

    def unavailable_reason(self) -> str | None: ...

    def cannot_serve(self, device: torch.device, dtype: torch.dtype) -> str | None: ...

    def linear_ghost(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor: ...

    def linear_direct(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor: ...

    def bias(self, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor: ...

    def norm_weight(self, g: torch.Tensor, xhat: torch.Tensor, ranges: RowRanges) -> torch.Tensor: ...

    def embedding(self, ids: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor: ...

    def tied_head_rows(
        self, ids: torch.Tensor, h: torch.Tensor, g_head: torch.Tensor, ranges: RowRanges
    ) -> torch.Tensor: ...


@runtime_checkable
class HeadKernels(Protocol):
    """The fused LM head's kernels (vigor_kernels.ops.head), which only some backends have."""

    head_ghost_cost_factor: float  # as ghost_cost_factor, for the head's norms

    def head_pass(
        self,
        h: torch.Tensor,
        spec: HeadSpec,
        targets: torch.Tensor,
        offsets: tuple[int, ...],
        row_weights: torch.Tensor,
        wants: HeadWants,
    ) -> HeadOutputs: ...

    def head_tied_rows(
        self,
        h: torch.Tensor,
        spec: HeadSpec,
        targets: torch.Tensor,
        lse: torch.Tensor,
        offsets: tuple[int, ...],
        row_weights: torch.Tensor,
        ids: torch.Tensor,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it serves when available

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


_loaded: dict[str, Backend | BaseException] = {}


def _load(name: str) -> Backend:
    if name not in BACKEND_MODULES:
        raise BackendError(f"unknown backend '{name}': choose one of {sorted(BACKEND_MODULES)} or 'auto'")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKEND_MODULES[name]).BACKEND
        except Exception as exc:  # an optional backend may fail to import in any way
            _loaded[name] = exc
    found = _loaded[name]
    if isinstance(found, BaseException):
        raise BackendError(f"backend '{name}' failed to import: {type(found).__name__}: {found}")
    reason = found.unavailable_reason()
    if reason:
        raise BackendError(f"backend '{name}' is not available: {reason}")
    return found


def available_backends() -> dict[str, BackendStatus]:
    """Every known backend, whether this install can use it, and why not."""
    out = {}
    for name in BACKEND_MODULES:
        try:
            backend = _load(name)
            out[name] = BackendStatus(name, True, backend.serves)
        except BackendError as exc:
            out[name] = BackendStatus(name, False, str(exc))
    return out


def requested_backend(backend: str | None = None) -> str:
    name = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name != "auto" and name not in BACKEND_MODULES:
        source = "backend argument" if backend else f"${ENV_VAR}"
        raise BackendError(f"unknown backend '{name}' ({source}): choose one of {sorted(BACKEND_MODULES)} or 'auto'")
    return name


def select_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that serves a call on ``device``/``dtype`` (see module docstring)."""
    name = requested_backend(backend)
    if name != "auto":
        chosen = _load(name)
        reason = chosen.cannot_serve(device, dtype)
        if reason:
            raise BackendError(f"backend '{name}' cannot serve this call: {reason}")
        return chosen
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        try:
            chosen = _load(candidate)
        except BackendError:
            continue
        if chosen.cannot_serve(device, dtype) is None:
            return chosen
    raise BackendError(f"no backend can serve tensors on {device} with dtype {dtype}")
