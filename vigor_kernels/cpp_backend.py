"""The ``cpp`` backend: the CPU kernels of ``vigor_kernels._C`` (csrc/cpu, C++17 + OpenMP).

Serves float32, bfloat16 and float16 tensors on the CPU. Inputs are widened to fp32 once, while they are
packed for the micro-kernels; Gram / ``G^T X`` entries accumulate in fp32 and per-sample sums in double.
Threads: OpenMP's default (all cores, or ``$OMP_NUM_THREADS``). The kernels use the best of the AVX-512 /
AVX2 / baseline copies compiled in that this CPU supports (``$VIGOR_CPU_ISA`` forces a lower one).

The fused LM head (``head_pass`` / ``head_tied_rows``) is the torch backend's tiling and GEMMs around two C++
elementwise kernels on its fp32 logits chunks (vigor_kernels/cpp_head.py).

Scratch: O(T d) per sample at most (the ghost norm packs a sample's rows once; the direct norm only packs
k-blocks per thread), never O(T^2). The calling thread keeps it between calls, up to 128 MiB
(``$VIGOR_CPP_PACK_MB``), because first-touch page faults cost about as much as the kernels on small
layers; :func:`release_scratch` frees it. Details: csrc/README.md.

If ``_C`` is missing or fails to load, the package still imports: this backend then reports why through
``unavailable_reason`` and the dispatcher falls back to ``torch``. Every call passes
:func:`vigor_kernels.compiled.marshal` before it reaches C++.
"""

from __future__ import annotations

import functools

import torch

from vigor_kernels import compiled, cpp_head
from vigor_kernels.compiled import DTYPE_CODES, marshal
from vigor_kernels.input_grams import input_gram
from vigor_kernels.ranges import RowRanges

NAME = "cpp"


def _ext():
    return compiled.extension(NAME, compiled.import_failure())


def release_scratch() -> None:
    """Free the packing scratch the CPU kernels keep between calls (for the calling thread)."""
    ext = compiled.loaded()
    if ext is not None:
        ext.release_scratch()


def _gram(rows: torch.Tensor) -> torch.Tensor:
    return torch.bmm(rows, rows.transpose(1, 2))


@functools.lru_cache(maxsize=4)
def _pair_mask(rows: tuple[tuple[int, int], ...]) -> tuple[int, int, torch.Tensor]:
    """The row window ``[lo, hi)`` of ``rows`` and the bool ``[B, W, W]`` mask of the Gram entries whose row and
    column are both the sample's own; one per scoring pass (every layer has the same rows)."""
    live = [(s, e) for s, e in rows if e > s]
    lo, hi = min(s for s, _ in live), max(e for _, e in live)
    t = torch.arange(lo, hi)
    bounds = torch.tensor(rows, dtype=torch.int64)
    keep = (t[None, :] >= bounds[:, :1]) & (t[None, :] < bounds[:, 1:])
    return lo, hi, keep[:, :, None] & keep[:, None, :]


def _short_ghost(x: torch.Tensor, g: torch.Tensor, rows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``sum_{t,s} (x_t . x_s)(g_t . g_s)`` per sample over its rows, for short row windows: the samples'
    rows ``[lo, hi)`` as two batched Gram products ``[B, W, W]`` (fp32 entries, as in the kernel), each
    sample's sum in double over the entries whose row and column are both its own."""
    lo, hi, pairs = _pair_mask(tuple(rows))
    gw = g[:, lo:hi].float()
    # The Grams of the whole window, then the entries of other rows dropped with where (never a product:
    # rows outside a sample's range may hold anything, NaN included, and only reach those entries).
    grams = input_gram(x, lo, hi, lambda: _gram(x[:, lo:hi].float())) * _gram(gw)
    return torch.where(pairs, grams, 0.0).sum((1, 2), dtype=torch.float64).float()


class CppBackend:
    name = NAME
    # How much dearer, per flop of vigor_kernels.cost, this backend's ghost kernel is than its direct kernel,
    # where the choice matters (T near the crossover). Measured on the 2-core Sapphire Rapids VM, 2 threads,
    # with `python bench/op_bench.py --preset cpu-small --backends torch,cpp`: the median over the shapes with
    # T >= 1024 of (direct effective TFLOP/s) / (ghost effective TFLOP/s / 2) for cpp was 0.99, 0.99, 1.02
    # and 1.09 in four runs (single shapes 0.6 to 1.8 on a shared machine); single-threaded (CPU time) both
    # run at ~130 GFLOP/s. At T <= 512 ghost is dearer per flop (diagonal blocks, few work items), but far
    # below the crossover there. (The same measure gives ~1.8 for the torch backend, whose Grams are full.)
    ghost_cost_factor = 1.0
    # Widest row window (the rows from the first sample's first valid row to the last one's end) up to which
    # the ghost norm runs as one batched BLAS Gram per operand instead of the C++ kernel: with few rows per
    # sample the kernel's 8 x 48 micro-tiles and per-sample packing waste most of their work (B=32, T=24,
    # d=896, one thread: 15 ms in the kernel, 1.9 ms as torch.bmm; GRPO completions are often this short).
    # The [B, W, W] Grams stay small at this width. 0 sends every call to the kernel (tests of the kernel).
    short_ghost_rows = 64
    # The fused head's norms are the torch backend's GEMMs around the C++ elementwise kernels (cpp_head).
    head_ghost_cost_factor = 2.0
    head_pass = cpp_head.HEAD.head_pass
    head_tied_rows = cpp_head.HEAD.head_tied_rows

    @property
    def serves(self) -> str:
        info = _ext().build_info()
        return (
            f"CPU, float32/bfloat16/float16 with fp32 accumulation; {info['cpu_isa']} kernels, "
            f"{info['threads']} OpenMP threads"
        )

    def unavailable_reason(self) -> str | None:
        return compiled.import_failure()

    def cannot_serve(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"the cpp backend runs on the CPU, the tensors are on {device}"
        if dtype not in DTYPE_CODES:
            return f"the cpp backend serves float32, bfloat16 and float16, not {dtype}"
        return None

    def _linear(self, fn_name: str, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        call = marshal(NAME, "cpu", ranges, x=x, g=g)
        x, g = call.features
        out = torch.zeros(call.batch, dtype=torch.float32)
        if x.shape[2] and g.shape[2]:
            fn = getattr(_ext(), fn_name)
            fn(x.data_ptr(), g.data_ptr(), call.code, call.length, x.shape[2], g.shape[2], call.rows, out.data_ptr())
        return out

    def linear_ghost(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        lo, hi = ranges.window()
        if hi > lo and hi - lo <= self.short_ghost_rows:
            call = marshal(NAME, "cpu", ranges, x=x, g=g)
            return _short_ghost(*call.features, call.rows)
        return self._linear("linear_ghost", x, g, ranges)

    def linear_direct(self, x: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        return self._linear("linear_direct", x, g, ranges)

    def bias(self, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        call = marshal(NAME, "cpu", ranges, g=g)
        (g,) = call.features
        out = torch.zeros(call.batch, dtype=torch.float32)
        if g.shape[2]:
            _ext().bias(g.data_ptr(), call.code, call.length, g.shape[2], call.rows, out.data_ptr())
        return out

    def norm_weight(self, g: torch.Tensor, xhat: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        call = marshal(NAME, "cpu", ranges, same_shape=True, g=g, xhat=xhat)
        g, xhat = call.features
        out = torch.zeros(call.batch, dtype=torch.float32)
        if g.shape[2]:
            _ext().norm_weight(
                g.data_ptr(), xhat.data_ptr(), call.code, call.length, g.shape[2], call.rows, out.data_ptr()
            )
        return out

    def embedding(self, ids: torch.Tensor, g: torch.Tensor, ranges: RowRanges) -> torch.Tensor:
        call = marshal(NAME, "cpu", ranges, ids=ids, g=g)
        (g,) = call.features
        out = torch.zeros(call.batch, dtype=torch.float32)
        if g.shape[2]:
            _ext().embedding(
                call.ids.data_ptr(), g.data_ptr(), call.code, call.length, g.shape[2], call.rows, out.data_ptr()
            )
        return out

    def tied_head_rows(
        self, ids: torch.Tensor, h: torch.Tensor, g_head: torch.Tensor, ranges: RowRanges
    ) -> torch.Tensor:
        call = marshal(NAME, "cpu", ranges, ids=ids, vocab_of="g_head", h=h, g_head=g_head)
        h, g_head = call.features
        d, vocab = h.shape[2], g_head.shape[2]
        out = torch.zeros(call.batch, call.length, d, dtype=torch.float32)
        if d and vocab:
            _ext().tied_head_rows(
                call.ids.data_ptr(), h.data_ptr(), g_head.data_ptr(), call.code, call.length, d, vocab, call.rows,
                out.data_ptr(),
            )  # fmt: skip
        return out


BACKEND = CppBackend()
