"""The ``triton`` backend: fused Triton kernels, one file per op family, each kernel beside its launcher.

Serves CUDA tensors in float32, float16 and bfloat16 (fp32 accumulation; fp32 inputs multiplied
exactly, never through TF32). On the CPU it serves only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before import), which is how the CPU test suite runs its kernels; bf16
is then upcast to fp32 inside the kernels (see :func:`_runtime.upcast_for_dot`).
"""

from __future__ import annotations

import functools

import torch

from vigor_kernels.triton_backend import _calibration, _runtime
from vigor_kernels.triton_backend import embedding as _embedding
from vigor_kernels.triton_backend import linear_direct as _linear_direct
from vigor_kernels.triton_backend import linear_ghost as _linear_ghost
from vigor_kernels.triton_backend import reductions as _reductions

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


class TritonBackend:
    name = "triton"

    @property
    def serves(self) -> str:
        where = "CUDA, and CPU through the Triton interpreter" if _runtime.INTERPRETING else "CUDA"
        return f"{where}; float32/float16/bfloat16"

    @property
    def ghost_cost_factor(self) -> float:
        """Calibrated ghost-vs-direct cost ratio on this GPU (bench/triton_calibrate.py), 1.0 if not calibrated."""
        if _runtime.INTERPRETING or not torch.cuda.is_available():
            return 1.0
        return _calibration.GHOST_COST_FACTORS.get(_device_name(torch.cuda.current_device()), 1.0)

    def unavailable_reason(self) -> str | None:
        if _runtime.INTERPRETING or torch.cuda.is_available():
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 was not set before import (needed to run on the CPU)"

    def cannot_serve(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not float32, float16 or bfloat16"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if _runtime.INTERPRETING:
                return None
            return "Triton runs on the CPU only under TRITON_INTERPRET=1, set before vigor_kernels is imported"
        return f"device type '{device.type}' is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"

    linear_ghost = staticmethod(_linear_ghost.linear_ghost)
    linear_direct = staticmethod(_linear_direct.linear_direct)
    bias = staticmethod(_reductions.bias)
    norm_weight = staticmethod(_reductions.norm_weight)
    embedding = staticmethod(_embedding.embedding)
    tied_head_rows = staticmethod(_embedding.tied_head_rows)


BACKEND = TritonBackend()
