"""Tensor checks and pointer marshalling shared by the compiled backends (``cpp`` and ``cuda``).

Nothing reaches ``vigor_kernels._C`` without passing through here: every tensor is checked for device,
dtype, rank and shape, and made contiguous. A non-contiguous input is copied once with ``.contiguous()``
(its dtype kept), so the C++ side only ever sees dense row-major memory; the copy is the caller's price
for a strided view. The kernels read valid rows only, so padding rows may hold anything (NaN included).
"""

from __future__ import annotations

import torch

from vigor_kernels.errors import VigorInputError
from vigor_kernels.ranges import RowRanges

# Codes of csrc/cpu/isa_kernels.h (DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(dtype: torch.dtype, backend: str) -> int:
    if dtype not in DTYPE_CODES:
        raise VigorInputError(f"{backend}: dtype {dtype} is not one of float32, bfloat16, float16")
    return DTYPE_CODES[dtype]


def dense(name: str, t: torch.Tensor, device_type: str, ndim: int, backend: str) -> torch.Tensor:
    """``t`` checked for device type and rank, as a contiguous tensor (a copy only if it was strided)."""
    if not isinstance(t, torch.Tensor):
        raise VigorInputError(f"{backend}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != device_type:
        raise VigorInputError(f"{backend}: {name} is on {t.device}, this backend runs on {device_type}")
    if t.dim() != ndim:
        raise VigorInputError(f"{backend}: {name} must be {ndim}-D, got shape {list(t.shape)}")
    return t if t.is_contiguous() else t.contiguous()


def features(name: str, t: torch.Tensor, device_type: str, backend: str) -> torch.Tensor:
    t = dense(name, t, device_type, 3, backend)
    dtype_code(t.dtype, backend)
    return t


def same_rows(backend: str, batch: int, length: int, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if tuple(t.shape[:2]) != (batch, length):
            raise VigorInputError(f"{backend}: {name} has shape {list(t.shape)}, expected [B={batch}, T={length}, ...]")


def same_dtype(backend: str, **tensors: torch.Tensor) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        got = ", ".join(f"{n}: {t.dtype}" for n, t in tensors.items())
        raise VigorInputError(f"{backend}: tensors must share one dtype, got {got}")
    return dtypes.pop()


def ids_tensor(ids: torch.Tensor, device_type: str, batch: int, length: int, backend: str) -> torch.Tensor:
    """int64 ``[B, T]`` ids, ``-1`` meaning no gradient; anything below -1 is rejected."""
    ids = dense("ids", ids, device_type, 2, backend)
    if ids.dtype != torch.int64:
        raise VigorInputError(f"{backend}: ids must be int64 (vigor_kernels.ops converts them), got {ids.dtype}")
    if tuple(ids.shape) != (batch, length):
        raise VigorInputError(f"{backend}: ids has shape {list(ids.shape)}, expected [{batch}, {length}]")
    if ids.numel() and int(ids.min()) < -1:
        raise VigorInputError(f"{backend}: ids must be >= 0, or -1 for tokens without gradient")
    return ids


def host_ranges(ranges: RowRanges, batch: int, length: int, backend: str) -> list[tuple[int, int]]:
    """The per-sample ``[start, end)`` rows as a list the bindings take, checked against ``[0, T]``."""
    if not isinstance(ranges, RowRanges):
        raise VigorInputError(f"{backend}: ranges must be a RowRanges (see vigor_kernels.as_row_ranges)")
    if ranges.batch != batch:
        raise VigorInputError(f"{backend}: ranges cover {ranges.batch} samples, the tensors {batch}")
    for b, (s, e) in enumerate(ranges.host):
        if not 0 <= s <= e <= length:
            raise VigorInputError(f"{backend}: ranges[{b}] = [{s}, {e}) is not inside [0, {length}]")
    return [(int(s), int(e)) for s, e in ranges.host]
