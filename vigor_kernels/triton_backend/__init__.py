"""The ``triton`` backend: fused Triton kernels, one file per op family, each kernel beside its launcher.

Serves CUDA tensors in float32, float16 and bfloat16 with fp32 accumulation: 16-bit inputs go to the
tensor cores natively, fp32 inputs are multiplied exactly (``input_precision="ieee"``, never TF32, which
would miss the 1e-4 tolerance). On the CPU it serves only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before import), which is how the CPU test suite runs its kernels; the
interpreter's ``tl.dot`` is wrong for bf16, so there bf16 tiles are converted to fp32 (exactly) before
the product (:func:`_runtime.upcast_for_dot`). ``auto`` never picks it on the CPU.

- ``linear_ghost`` (linear_ghost.py): grid over (row-tile pair ``i <= j``, sample); each program forms the
  ``X_i X_j^T`` and ``G_i G_j^T`` blocks on chip, multiplies and sums them, twice off the diagonal;
  pairs past a sample's valid rows do nothing. Extra memory: one float per (sample, pair).
- ``linear_direct`` (linear_direct.py): grid over (weight tile, row chunk, sample); ``G^T X`` blocks on
  chip, squared and summed; the rows are split into chunks (partial blocks summed in a fixed order)
  only when the batch is too small to fill the GPU.
- ``bias`` / ``norm_weight`` (reductions.py), ``embedding`` and ``tied_head_rows`` (embedding.py).
- ``head_pass`` / ``head_tied_rows`` (head.py): the fused LM head's elementwise steps on logits chunks,
  around the torch backend's GEMMs and tiling.
- Every reduction ends in per-program partials summed in a fixed order (_reduce.py): no atomics, the
  same bits every run. Tile sizes are fixed per dtype; on a GPU the rest (K chunk, warps, stages) is
  autotuned once per layer shape, or pinned with ``VIGOR_TRITON_AUTOTUNE=0``.

``method="auto"`` picks ghost or direct by :mod:`vigor_kernels.cost` scaled by ``ghost_cost_factor``,
measured per GPU model by ``bench/gpu/triton_calibrate.py`` (scripts/gpu/triton_suite.sh calibrate), which
writes the measured ghost/direct crossover length of every Qwen2.5 layer shape to its results folder and,
with ``--install``, the fitted factor to ``calibration.json`` beside this file (read at import).
Uncalibrated GPUs use 1.0: the FLOP-count crossover ``T* = 2 d_in d_out / (d_in + d_out)``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from vigor_kernels.triton_backend import _runtime
from vigor_kernels.triton_backend import embedding as _embedding
from vigor_kernels.triton_backend import head as _head
from vigor_kernels.triton_backend import linear_direct as _linear_direct
from vigor_kernels.triton_backend import linear_ghost as _linear_ghost
from vigor_kernels.triton_backend import reductions as _reductions

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# GPU model -> {"ghost_cost_factor": f, "source": the calibration run}, written by triton_calibrate.py --install
_CALIBRATION: dict[str, dict] = json.loads(Path(__file__).with_name("calibration.json").read_text())


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
        """Calibrated ghost-vs-direct cost ratio on this GPU (bench/gpu/triton_calibrate.py), 1.0 if not calibrated."""
        if _runtime.INTERPRETING or not torch.cuda.is_available():
            return 1.0
        entry = _CALIBRATION.get(_device_name(torch.cuda.current_device()))
        return float(entry["ghost_cost_factor"]) if entry else 1.0

    # the fused head's norms are the torch backend's GEMMs (see torch_backend.head_ghost_cost_factor)
    head_ghost_cost_factor = 2.0

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
    head_pass = _head.HEAD.head_pass
    head_tied_rows = _head.HEAD.head_tied_rows


BACKEND = TritonBackend()
