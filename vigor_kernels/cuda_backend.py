"""The ``cuda`` backend: the CUDA C++ kernels of ``vigor_kernels._C`` (csrc/cuda/norms.cu).

The second GPU implementation, held against the Triton kernels. Serves float32, bfloat16 and float16 on a
CUDA device of compute capability >= 8.0 (the build compiles sm_80 and sm_90 code plus PTX, which newer
GPUs JIT-compile). fp32 accumulation in the tiles, double for the per-tile and per-sample sums; no
atomics, so results are bitwise reproducible. Kernels run on the tensors' device and current stream;
scratch is allocated here with torch (its caching allocator), never inside C++.

Unavailable, with the reason, when ``_C`` did not load, was built without nvcc, or torch sees no GPU.
"""

from __future__ import annotations

import torch

from vigor_kernels import compiled
from vigor_kernels.compiled import DTYPE_CODES, Call, marshal
from vigor_kernels.errors import BackendError
from vigor_kernels.ranges import RowRanges

NAME = "cuda"
MIN_CAPABILITY = (8, 0)
ROW_THREADS = 256  # features per block of the bias / norm-weight kernel (csrc/cuda/norms.cu THREADS)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CudaBackend:
    name = NAME
    # Not measured yet (needs a GPU): scripts/gpu/cuda_suite.sh benchmarks ghost and direct side by side.
    ghost_cost_factor = 1.0

    @property
    def serves(self) -> str:
        archs = self._ext().build_info()["cuda_archs"]
        return f"CUDA (sm_{archs.replace(',', ', sm_')}), float32/bfloat16/float16"

    def unavailable_reason(self) -> str | None:
        ext = compiled.loaded()
        if ext is None:
            return compiled.import_failure()
        if not ext.has_cuda:
            return "vigor_kernels._C was built without CUDA (nvcc not found at build time, or VIGOR_WITH_CUDA=0)"
        if not torch.cuda.is_available():
            return f"torch sees no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
        return None

    def cannot_serve(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA devices, the tensors are on {device}"
        if dtype not in DTYPE_CODES:
            return f"the cuda backend serves float32, bfloat16 and float16, not {dtype}"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return f"the cuda kernels need compute capability >= 8.0, {device} has {capability[0]}.{capability[1]}"
        return None

    def _ext(self):
        return compiled.extension(NAME, self.unavailable_reason())

    def _marshal(self, ranges: RowRanges, **kwargs) -> Call:
        """:func:`compiled.marshal` for CUDA tensors, and a device these kernels run on."""
        call = marshal(NAME, "cuda", ranges, **kwargs)
        reason = self.cannot_serve(call.device, call.dtype)
        if reason:
            raise BackendError(f"backend '{NAME}' cannot serve this call: {reason}")
        return call

    def _linear(self, ghost: bool, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        call = self._marshal(ranges, x=x, g=g)
        (x, g), device = call.features, call.device
        batch, length, d_in = x.shape
        d_out = g.shape[2]
        out = torch.zeros(batch, dtype=torch.float32, device=device)
        if batch == 0 or d_in == 0 or d_out == 0:
            return out
        ext = self._ext()
        with torch.cuda.device(device):
            bounds, max_len = call.device_bounds(), call.max_rows()
            stream = _stream(device)
            if ghost:
                nb = max(1, _ceil(max_len, ext.cuda_tile))
                partial = torch.empty(batch * nb * nb, dtype=torch.float64, device=device)
                ext.cuda_linear_ghost(
                    x.data_ptr(), g.data_ptr(), call.code, batch, length, d_in, d_out, bounds.data_ptr(), max_len,
                    partial.data_ptr(), out.data_ptr(), stream,
                )  # fmt: skip
            else:
                tiles = _ceil(d_in, ext.cuda_tile) * _ceil(d_out, ext.cuda_tile)
                partial = torch.empty(batch * tiles, dtype=torch.float64, device=device)
                ext.cuda_linear_direct(
                    x.data_ptr(), g.data_ptr(), call.code, batch, length, d_in, d_out, bounds.data_ptr(),
                    partial.data_ptr(), out.data_ptr(), stream,
                )  # fmt: skip
        return out

    def linear_ghost(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._linear(True, x, g, ranges)

    def linear_direct(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._linear(False, x, g, ranges)

    def _row_sum_sq(self, call: Call) -> torch.Tensor:
        g, xhat = call.features[0], (call.features[1] if len(call.features) > 1 else None)
        batch, length, d = g.shape
        out = torch.zeros(batch, dtype=torch.float32, device=g.device)
        if batch == 0 or d == 0:
            return out
        ext = self._ext()
        with torch.cuda.device(g.device):
            bounds = call.device_bounds()
            partial = torch.empty(batch * _ceil(d, ROW_THREADS), dtype=torch.float64, device=g.device)
            ext.cuda_row_sum_sq(
                g.data_ptr(), 0 if xhat is None else xhat.data_ptr(), call.code, batch, length, d, bounds.data_ptr(),
                partial.data_ptr(), out.data_ptr(), _stream(g.device),
            )  # fmt: skip
        return out

    def bias(self, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._row_sum_sq(self._marshal(ranges, g=g))

    def norm_weight(self, g: torch.Tensor, xhat: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._row_sum_sq(self._marshal(ranges, same_shape=True, g=g, xhat=xhat))

    def embedding(self, ids: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        call = self._marshal(ranges, ids=ids, g=g)
        (g,) = call.features
        batch, length, d = g.shape
        out = torch.zeros(batch, dtype=torch.float32, device=g.device)
        if batch == 0 or d == 0:
            return out
        ext = self._ext()
        with torch.cuda.device(g.device):
            bounds, max_len = call.device_bounds(), call.max_rows()
            nb = max(1, _ceil(max_len, ext.cuda_tile))
            partial = torch.empty(batch * nb * nb, dtype=torch.float64, device=g.device)
            ext.cuda_embedding(
                call.ids.data_ptr(), g.data_ptr(), call.code, batch, length, d, bounds.data_ptr(), max_len,
                partial.data_ptr(), out.data_ptr(), _stream(g.device),
            )  # fmt: skip
        return out

    def tied_head_rows(
        self, ids: torch.Tensor, h: torch.Tensor, g_head: torch.Tensor, ranges: RowRanges
    ) -> torch.Tensor:
        call = self._marshal(ranges, ids=ids, vocab_of="g_head", h=h, g_head=g_head)
        (h, g_head), device = call.features, call.device
        batch, length, d = h.shape
        vocab = g_head.shape[2]
        out = torch.zeros(batch, length, d, dtype=torch.float32, device=device)
        if batch == 0 or d == 0 or vocab == 0:
            return out
        ext = self._ext()
        with torch.cuda.device(device):
            bounds, max_len = call.device_bounds(), call.max_rows()
            ext.cuda_tied_head_rows(
                call.ids.data_ptr(), h.data_ptr(), g_head.data_ptr(), call.code, batch, length, d, vocab,
                bounds.data_ptr(), max_len, out.data_ptr(), _stream(device),
            )  # fmt: skip
        return out


BACKEND = CudaBackend()
