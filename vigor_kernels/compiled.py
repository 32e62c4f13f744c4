"""``vigor_kernels._C``, loaded once, and the one gate every call of the two backends built on it passes.

``cpp`` (csrc/cpu) and ``cuda`` (csrc/cuda) hand raw pointers to C++, so nothing reaches ``_C`` unchecked,
even when a backend object is called directly instead of through ``vigor_kernels.ops``: :func:`marshal`
checks a call's tensors in one go (device type, dtype, rank, shapes, one device, ids, row ranges) and makes
them contiguous. A strided input is copied once with ``.contiguous()`` (its dtype kept), so the C++ side
only ever sees dense row-major memory; the copy is the caller's price for a strided view. The kernels read
valid rows only, so padding rows may hold anything (NaN included).

If ``_C`` is missing or fails to load, the package still imports: both backends then say why through
:func:`import_failure` and the dispatcher falls back to another backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch

from vigor_kernels.errors import BackendError, VigorInputError
from vigor_kernels.ranges import RowRanges

try:
    from vigor_kernels import _C
except Exception as exc:  # a missing or broken build must not break `import vigor_kernels`
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

# Codes of csrc/cpu/isa_kernels.h (DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def loaded() -> ModuleType | None:
    """The extension module, or None when it did not load."""
    return _C


def import_failure() -> str | None:
    """Why ``_C`` is unusable (None when it loaded)."""
    if _C is not None:
        return None
    return f"vigor_kernels._C did not load ({_IMPORT_ERROR}); build it with `pip install -e .` (see README)"


def extension(backend: str, unavailable: str | None) -> ModuleType:
    """``_C`` for ``backend``, or a :class:`BackendError` with the backend's reason for being unavailable."""
    if unavailable or _C is None:
        raise BackendError(f"backend '{backend}' is not available: {unavailable or import_failure()}")
    return _C


@dataclass(frozen=True)
class Call:
    """One checked call: the feature tensors (dense, in the order given), the ids, their dtype's code, the
    batch shape ``[B, T]`` and each sample's valid rows."""

    features: tuple[torch.Tensor, ...]
    ids: torch.Tensor | None
    code: int
    batch: int
    length: int
    rows: tuple[tuple[int, int], ...]
    ranges: RowRanges

    @property
    def device(self) -> torch.device:
        return self.features[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].dtype

    def max_rows(self) -> int:
        """The most valid rows any sample has."""
        return max((e - s for s, e in self.rows), default=0)

    def device_bounds(self) -> torch.Tensor:
        """The int64 ``[B, 2]`` row bounds on the tensors' device, contiguous (for the CUDA kernels)."""
        return self.ranges.bounds.to(device=self.device, dtype=torch.int64).contiguous()


def _dense(backend: str, name: str, t: object, device_type: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise VigorInputError(f"{backend}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != device_type:
        raise VigorInputError(f"{backend}: {name} is on {t.device}, this backend runs on {device_type}")
    if t.dim() != ndim:
        raise VigorInputError(f"{backend}: {name} must be {ndim}-D, got shape {list(t.shape)}")
    return t if t.is_contiguous() else t.contiguous()


def _ids(
    backend: str, ids: object, device_type: str, batch: int, length: int, vocab: tuple[str, int] | None
) -> torch.Tensor:
    """int64 ``[B, T]`` ids, ``-1`` meaning no gradient; below -1 (or from the ``vocab`` width up) is rejected."""
    ids = _dense(backend, "ids", ids, device_type, 2)
    if ids.dtype != torch.int64:
        raise VigorInputError(f"{backend}: ids must be int64 (vigor_kernels.ops converts them), got {ids.dtype}")
    if tuple(ids.shape) != (batch, length):
        raise VigorInputError(f"{backend}: ids has shape {list(ids.shape)}, expected [{batch}, {length}]")
    if ids.numel() and int(ids.min()) < -1:
        raise VigorInputError(f"{backend}: ids must be >= 0, or -1 for tokens without gradient")
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab[1]:
        raise VigorInputError(
            f"{backend}: ids reach {int(ids.max())} but {vocab[0]} has only {vocab[1]} columns (vocab)"
        )
    return ids


def _rows(backend: str, ranges: object, batch: int, length: int) -> tuple[tuple[int, int], ...]:
    """The per-sample ``[start, end)`` rows the bindings take (any sequence of pairs), checked against ``[0, T]``."""
    if not isinstance(ranges, RowRanges):
        raise VigorInputError(f"{backend}: ranges must be a RowRanges (see vigor_kernels.as_row_ranges)")
    if ranges.batch != batch or tuple(ranges.bounds.shape) != (batch, 2):
        raise VigorInputError(
            f"{backend}: ranges cover {ranges.batch} samples (bounds {list(ranges.bounds.shape)}), the tensors {batch}"
        )
    bad = ranges.outside(length)
    if bad is not None:
        b, (s, e) = bad
        raise VigorInputError(f"{backend}: ranges[{b}] = [{s}, {e}) is not inside [0, {length}]")
    return ranges.host


def marshal(
    backend: str,
    device_type: str,
    ranges: RowRanges,
    *,
    ids: torch.Tensor | None = None,
    vocab_of: str | None = None,
    same_shape: bool = False,
    **features: torch.Tensor,
) -> Call:
    """Check one call of a compiled backend: ``features`` are ``[B, T, d]`` tensors sharing ``[B, T]`` (their
    whole shape with ``same_shape``) and one dtype of :data:`DTYPE_CODES`; ``ids`` int64 ``[B, T]`` (below the
    width of feature ``vocab_of`` if given); every tensor on one device of ``device_type``; ``ranges`` inside
    ``[0, T]``."""
    dense = {name: _dense(backend, name, t, device_type, 3) for name, t in features.items()}
    for t in dense.values():
        if t.dtype not in DTYPE_CODES:
            raise VigorInputError(f"{backend}: dtype {t.dtype} is not one of float32, bfloat16, float16")
    (first, lead), *others = dense.items()
    batch, length = lead.shape[0], lead.shape[1]
    for name, t in others:
        if tuple(t.shape[:2]) != (batch, length):
            raise VigorInputError(f"{backend}: {name} has shape {list(t.shape)}, expected [B={batch}, T={length}, ...]")
        if same_shape and t.shape != lead.shape:
            raise VigorInputError(
                f"{backend}: {name} has shape {list(t.shape)}, {first} {list(lead.shape)}; they must match"
            )
    if len({t.dtype for t in dense.values()}) != 1:
        got = ", ".join(f"{n}: {t.dtype}" for n, t in dense.items())
        raise VigorInputError(f"{backend}: tensors must share one dtype, got {got}")
    vocab = None if vocab_of is None else (vocab_of, dense[vocab_of].shape[2])
    checked_ids = None if ids is None else _ids(backend, ids, device_type, batch, length, vocab)
    everything = {**dense, **({} if checked_ids is None else {"ids": checked_ids})}
    if len({t.device for t in everything.values()}) != 1:
        where = {n: str(t.device) for n, t in everything.items()}
        raise VigorInputError(f"{backend}: tensors are on different devices: {where}")
    rows = _rows(backend, ranges, batch, length)
    return Call(tuple(dense.values()), checked_ids, DTYPE_CODES[lead.dtype], batch, length, rows, ranges)


@dataclass(frozen=True)
class LogitsChunk:
    """One checked LM-head logits chunk call: ``z`` fp32 ``[n, c]`` (updated in place, so never copied), the
    bias slice (dense, or None) and its dtype's code, int64 targets ``[n]``, the transform."""

    z: torch.Tensor
    bias: torch.Tensor | None
    bias_code: int
    targets: torch.Tensor
    scale: float
    softcap: float | None

    @property
    def row_stride(self) -> int:
        return self.z.stride(0) if self.z.shape[0] > 1 else self.z.shape[1]


def _row_vector(backend: str, name: str, t: object, device_type: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.device.type != device_type or tuple(t.shape) != (n,):
        got = f"{t.dtype} {list(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise VigorInputError(f"{backend}: {name} must be a [{n}] tensor on {device_type}, got {got}")
    if dtype.is_floating_point != t.dtype.is_floating_point or t.dtype == torch.bool:
        raise VigorInputError(
            f"{backend}: {name} must be {'float' if dtype.is_floating_point else 'integer'}, got {t.dtype}"
        )
    return t.to(dtype).contiguous()


def marshal_logits_chunk(
    backend: str,
    device_type: str,
    z: object,
    targets: object,
    *,
    bias: object = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> LogitsChunk:
    """Check one call of the fused head's elementwise kernels: ``z`` a 2-D float32 ``[n, c]`` tensor with unit
    column stride and rows that do not overlap (any row stride >= c: a column slice of a wider buffer is
    fine; it is written in place, so a strided copy is refused rather than made), ``targets`` integer ``[n]``
    (any values: one outside the chunk selects no column), ``bias`` None or ``[c]`` of float32 / bfloat16 /
    float16, ``scale`` finite and non-zero, ``softcap`` None or positive, all on one ``device_type`` device;
    ``z`` outside autograd (it is overwritten behind autograd's back)."""
    if not isinstance(z, torch.Tensor):
        raise VigorInputError(f"{backend}: the logits chunk must be a torch.Tensor, got {type(z).__name__}")
    if z.device.type != device_type or z.dim() != 2 or z.dtype != torch.float32:
        raise VigorInputError(
            f"{backend}: the logits chunk must be a 2-D float32 tensor on {device_type}, "
            f"got {z.dtype} {list(z.shape)} on {z.device}"
        )
    if z.requires_grad:
        raise VigorInputError(f"{backend}: the logits chunk requires grad; the kernels overwrite it outside autograd")
    n, c = z.shape
    if (c > 1 and z.stride(1) != 1) or (n > 1 and c > 0 and z.stride(0) < c):
        raise VigorInputError(
            f"{backend}: the logits chunk {list(z.shape)} has strides {list(z.stride())}: its columns must be "
            "adjacent (unit column stride) and its rows must not overlap"
        )
    checked_targets = _row_vector(backend, "targets", targets, device_type, n, torch.int64)
    bias_code = 0
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.device != z.device or tuple(bias.shape) != (c,):
            raise VigorInputError(f"{backend}: the bias chunk must be a [{c}] tensor on {z.device} or None")
        if bias.dtype not in DTYPE_CODES:
            raise VigorInputError(f"{backend}: bias dtype {bias.dtype} is not one of float32, bfloat16, float16")
        bias, bias_code = bias.contiguous(), DTYPE_CODES[bias.dtype]
    if not (math.isfinite(scale) and scale != 0.0):
        raise VigorInputError(f"{backend}: scale must be finite and non-zero, got {scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0.0):
        raise VigorInputError(f"{backend}: softcap must be a positive number or None, got {softcap}")
    if checked_targets.device != z.device:
        raise VigorInputError(f"{backend}: targets are on {checked_targets.device}, the logits chunk on {z.device}")
    return LogitsChunk(z, bias, bias_code, checked_targets, float(scale), None if softcap is None else float(softcap))


def row_vector(backend: str, chunk: LogitsChunk, name: str, t: object) -> torch.Tensor:
    """A per-row input of ``chunk`` (``lse``, row weights) as dense float32 ``[n]`` on its device."""
    vec = _row_vector(backend, name, t, chunk.z.device.type, chunk.z.shape[0], torch.float32)
    if vec.device != chunk.z.device:
        raise VigorInputError(f"{backend}: {name} is on {vec.device}, the logits chunk on {chunk.z.device}")
    return vec
