"""The ``torch`` backend: plain PyTorch on any device, fp32 accumulation, chunked temporaries.

It is the op-level oracle the other backends are tested against, and the fallback when nothing
faster can serve a call.
"""

from __future__ import annotations

import torch

from vigor_kernels.torch_backend import embedding as _embedding
from vigor_kernels.torch_backend import head as _head
from vigor_kernels.torch_backend import linear as _linear
from vigor_kernels.torch_backend import reductions as _reductions


class TorchBackend:
    name = "torch"
    serves = "any device, float32/float16/bfloat16"
    # Its ghost forms whole Gram blocks (the symmetric half only pays off across chunks), about twice the
    # cost model's count: measured 1.8x relative to direct by bench/op_bench.py --preset cpu-small.
    ghost_cost_factor = 1.8
    # The fused head's ghost form multiplies whole [T, T] Grams per vocabulary chunk with torch GEMMs, its
    # direct form G^T H: both full products, so ghost costs twice vigor_kernels.cost's symmetric-half count.
    head_ghost_cost_factor = 2.0

    def unavailable_reason(self) -> str | None:
        return None

    def cannot_serve(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    linear_ghost = staticmethod(_linear.linear_ghost)
    linear_direct = staticmethod(_linear.linear_direct)
    bias = staticmethod(_reductions.bias)
    norm_weight = staticmethod(_reductions.norm_weight)
    embedding = staticmethod(_embedding.embedding)
    tied_head_rows = staticmethod(_embedding.tied_head_rows)
    head_pass = staticmethod(_head.head_pass)
    head_tied_rows = staticmethod(_head.head_tied_rows)


BACKEND = TorchBackend()
