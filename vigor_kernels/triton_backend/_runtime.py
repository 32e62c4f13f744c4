"""What the kernel launchers of the ``triton`` backend share: interpreter detection, dot precision, tuning.

Triton decides at decoration time whether ``@triton.jit`` compiles for a GPU or runs in its numpy
interpreter (``TRITON_INTERPRET=1``), so whether this process interprets is read once, from a probe
kernel defined at import.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(ptr):
    tl.store(ptr, 0)


def _is_interpreted(kernel: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - a triton without an interpreter
        return False
    return isinstance(kernel, InterpretedFunction)


INTERPRETING: bool = _is_interpreted(_probe_kernel)

# Runtime autotuning (GPU only) over each kernel's small config list; VIGOR_TRITON_AUTOTUNE=0 pins the
# first config instead, e.g. to compare runs across processes bit for bit whatever the timings say.
AUTOTUNE_ENV = "VIGOR_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    return not INTERPRETING and os.environ.get(AUTOTUNE_ENV, "1").strip() not in ("0", "false", "no")


def upcast_for_dot(dtype: torch.dtype) -> bool:
    """Whether kernels convert bf16 tiles to fp32 before ``tl.dot``.

    The interpreter's ``tl.dot`` returns garbage for bf16 operands (it has no numpy bf16), while a bf16
    -> fp32 conversion is exact: under the interpreter bf16 is upcast and then multiplied in fp32 with
    the same result a tensor core gives (bf16 products are exact in fp32). On a GPU bf16 stays native.
    """
    return INTERPRETING and dtype == torch.bfloat16


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill; under the interpreter a small stand-in, so that the
    heuristics that depend on it (the direct kernel's split over T) also run in the CPU tests."""
    if device.type == "cuda" and not INTERPRETING:
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def config(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def tuned(kernel: object, configs: list[triton.Config], key: list[str]) -> object:
    """``kernel`` autotuned over ``configs`` (keyed by ``key`` and the tensors' dtypes), or pinned to
    the first config when autotuning is off. Never used under the interpreter (blocks come from the
    caller there)."""
    if not autotune_enabled():
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key)(kernel)
