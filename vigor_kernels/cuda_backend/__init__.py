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

from vigor_kernels.cpp_backend import _C, unavailable_import_reason
from vigor_kernels.cpp_backend import _marshal as m
from vigor_kernels.errors import BackendError, VigorInputError
from vigor_kernels.ranges import RowRanges

NAME = "cuda"
MIN_CAPABILITY = (8, 0)
ROW_THREADS = 256  # features per block of the bias / norm-weight kernel (csrc/cuda/norms.cu THREADS)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class CudaBackend:
    name = NAME
    # Not measured yet (needs a GPU): scripts/gpu/cuda_suite.sh benchmarks ghost and direct side by side.
    ghost_cost_factor = 1.0

    @property
    def serves(self) -> str:
        return f"CUDA (sm_{_C.build_info()['cuda_archs'].replace(',', ', sm_')}), float32/bfloat16/float16"

    def unavailable_reason(self) -> str | None:
        if _C is None:
            return unavailable_import_reason()
        if not _C.has_cuda:
            return "vigor_kernels._C was built without CUDA (nvcc not found at build time, or VIGOR_WITH_CUDA=0)"
        if not torch.cuda.is_available():
            return f"torch sees no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
        return None

    def cannot_serve(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA devices, the tensors are on {device}"
        if dtype not in m.DTYPE_CODES:
            return f"the cuda backend serves float32, bfloat16 and float16, not {dtype}"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return f"the cuda kernels need compute capability >= 8.0, {device} has {capability[0]}.{capability[1]}"
        return None

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _ext():
        if _C is None or not _C.has_cuda:
            raise BackendError(f"backend '{NAME}' is not available: {CudaBackend().unavailable_reason()}")
        return _C

    @staticmethod
    def _bounds(ranges: RowRanges, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """The int64 [B, 2] bounds on ``device`` (contiguous) and the longest sample."""
        host = m.host_ranges(ranges, batch, length, NAME)
        bounds = ranges.bounds.to(device=device, dtype=torch.int64).contiguous()
        if tuple(bounds.shape) != (batch, 2):
            raise VigorInputError(f"{NAME}: ranges.bounds has shape {list(bounds.shape)}, expected [{batch}, 2]")
        return bounds, max((e - s for s, e in host), default=0)

    @staticmethod
    def _stream(device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def _features(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = m.features(name, t, "cuda", NAME)
        reason = self.cannot_serve(t.device, t.dtype)
        if reason:
            raise BackendError(f"backend '{NAME}' cannot serve this call: {reason}")
        return t

    @staticmethod
    def _same_device(**tensors: torch.Tensor) -> torch.device:
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise VigorInputError(
                f"{NAME}: tensors are on different devices: " + str({n: str(t.device) for n, t in tensors.items()})
            )
        return devices.pop()

    # -- ops -----------------------------------------------------------------------------------------

    def _linear(self, ghost: bool, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        x, g = self._features("x", x), self._features("g", g)
        device = self._same_device(x=x, g=g)
        batch, length, d_in = x.shape
        d_out = g.shape[2]
        m.same_rows(NAME, batch, length, g=g)
        code = m.dtype_code(m.same_dtype(NAME, x=x, g=g), NAME)
        out = torch.zeros(batch, dtype=torch.float32, device=device)
        if batch == 0 or d_in == 0 or d_out == 0:
            return out
        with torch.cuda.device(device):
            bounds, max_len = self._bounds(ranges, batch, length, device)
            stream = self._stream(device)
            if ghost:
                nb = max(1, _ceil(max_len, _C.cuda_tile))
                partial = torch.empty(batch * nb * nb, dtype=torch.float64, device=device)
                self._ext().cuda_linear_ghost(
                    x.data_ptr(),
                    g.data_ptr(),
                    code,
                    batch,
                    length,
                    d_in,
                    d_out,
                    bounds.data_ptr(),
                    max_len,
                    partial.data_ptr(),
                    out.data_ptr(),
                    stream,
                )
            else:
                tiles = _ceil(d_in, _C.cuda_tile) * _ceil(d_out, _C.cuda_tile)
                partial = torch.empty(batch * tiles, dtype=torch.float64, device=device)
                self._ext().cuda_linear_direct(
                    x.data_ptr(),
                    g.data_ptr(),
                    code,
                    batch,
                    length,
                    d_in,
                    d_out,
                    bounds.data_ptr(),
                    partial.data_ptr(),
                    out.data_ptr(),
                    stream,
                )
        return out

    def linear_ghost(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._linear(True, x, g, ranges)

    def linear_direct(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._linear(False, x, g, ranges)

    def _row_sum_sq(self, g: torch.Tensor, xhat: torch.Tensor | None, ranges: RowRanges) -> torch.Tensor:
        g = self._features("g", g)
        batch, length, d = g.shape
        if xhat is not None:
            xhat = self._features("xhat", xhat)
            self._same_device(g=g, xhat=xhat)
            if xhat.shape != g.shape:
                raise VigorInputError(f"{NAME}: xhat has shape {list(xhat.shape)}, g {list(g.shape)}; they must match")
            m.same_dtype(NAME, g=g, xhat=xhat)
        out = torch.zeros(batch, dtype=torch.float32, device=g.device)
        if batch == 0 or d == 0:
            return out
        with torch.cuda.device(g.device):
            bounds, _ = self._bounds(ranges, batch, length, g.device)
            partial = torch.empty(batch * _ceil(d, ROW_THREADS), dtype=torch.float64, device=g.device)
            self._ext().cuda_row_sum_sq(
                g.data_ptr(),
                0 if xhat is None else xhat.data_ptr(),
                m.dtype_code(g.dtype, NAME),
                batch,
                length,
                d,
                bounds.data_ptr(),
                partial.data_ptr(),
                out.data_ptr(),
                self._stream(g.device),
            )
        return out

    def bias(self, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._row_sum_sq(g, None, ranges)

    def norm_weight(self, g: torch.Tensor, xhat: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._row_sum_sq(g, xhat, ranges)

    def embedding(self, ids: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        g = self._features("g", g)
        batch, length, d = g.shape
        ids = m.ids_tensor(ids, "cuda", batch, length, NAME)
        self._same_device(ids=ids, g=g)
        out = torch.zeros(batch, dtype=torch.float32, device=g.device)
        if batch == 0 or d == 0:
            return out
        with torch.cuda.device(g.device):
            bounds, max_len = self._bounds(ranges, batch, length, g.device)
            nb = max(1, _ceil(max_len, _C.cuda_tile))
            partial = torch.empty(batch * nb * nb, dtype=torch.float64, device=g.device)
            self._ext().cuda_embedding(
                ids.data_ptr(),
                g.data_ptr(),
                m.dtype_code(g.dtype, NAME),
                batch,
                length,
                d,
                bounds.data_ptr(),
                max_len,
                partial.data_ptr(),
                out.data_ptr(),
                self._stream(g.device),
            )
        return out

    def tied_head_rows(
        self, ids: torch.Tensor, h: torch.Tensor, g_head: torch.Tensor, ranges: RowRanges
    ) -> torch.Tensor:
        h, g_head = self._features("h", h), self._features("g_head", g_head)
        batch, length, d = h.shape
        vocab = g_head.shape[2]
        m.same_rows(NAME, batch, length, g_head=g_head)
        code = m.dtype_code(m.same_dtype(NAME, h=h, g_head=g_head), NAME)
        ids = m.ids_tensor(ids, "cuda", batch, length, NAME)
        device = self._same_device(ids=ids, h=h, g_head=g_head)
        if ids.numel() and int(ids.max()) >= vocab:
            raise VigorInputError(f"{NAME}: ids reach {int(ids.max())} but g_head has only {vocab} columns (vocab)")
        out = torch.zeros(batch, length, d, dtype=torch.float32, device=device)
        if batch == 0 or d == 0 or vocab == 0:
            return out
        with torch.cuda.device(device):
            bounds, max_len = self._bounds(ranges, batch, length, device)
            self._ext().cuda_tied_head_rows(
                ids.data_ptr(),
                h.data_ptr(),
                g_head.data_ptr(),
                code,
                batch,
                length,
                d,
                vocab,
                bounds.data_ptr(),
                max_len,
                out.data_ptr(),
                self._stream(device),
            )
        return out


BACKEND = CudaBackend()
