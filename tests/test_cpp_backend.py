"""The ``cpp`` backend beyond the shared conformance suite (tests/test_ops.py): the paths only larger or
oddly tuned inputs reach (several Gram blocks, k steps and packing waves), every compiled ISA copy, exact
widening of bf16/fp16, thread-count independence, bounded memory, input checks, and a missing build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import naive
import pytest
import torch

import vigor_kernels as vk
from vigor_kernels import cpp_backend

ROOT = Path(__file__).resolve().parent.parent
CPP = vk.available_backends()["cpp"]
needs_cpp = pytest.mark.skipif(not CPP.available, reason=f"cpp backend unavailable: {CPP.reason}")
RTOL = 1e-4


def ragged(batch: int, length: int, d: int, spans: list[tuple[int, int]], dtype=torch.float32) -> torch.Tensor:
    t = torch.randn(batch, length, d).to(dtype)
    for b, (s, e) in enumerate(spans):
        t[b, :s] = float("nan")
        t[b, e:] = float("nan")
    return t


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()) * 1e-3)


@pytest.fixture(autouse=True)
def kernel_for_every_ghost(monkeypatch):
    """The tests of this file are about the C++ kernels: short row windows go to the kernel too (the batched
    Gram path that serves them by default is tested on its own below and by tests/test_ops.py)."""
    monkeypatch.setattr(cpp_backend.CppBackend, "short_ghost_rows", 0)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 40, 61, 62])
def test_short_window_ghost_equals_the_kernel(monkeypatch, dtype, width):
    """Guards the batched-Gram path for short row windows (``CppBackend.short_ghost_rows``): the same norms
    as the C++ kernel and the naive reference, with ragged and empty ranges, NaN outside every range (never
    read), bf16/fp16 widened; a window of 64 rows is served by it, one of 65 goes to the kernel."""
    spans = [(3, 3 + width), (0, min(width, 7)), (2, 2), (5, 6), (max(0, width - 9), width)]
    length = width + 5
    x = ragged(5, length, 33, spans, dtype)
    g = ragged(5, length, 17, spans, dtype)
    ranges = torch.tensor(spans)
    kernel = vk.linear_weight_sq_norms(x, g, ranges, method="ghost", backend="cpp")
    monkeypatch.setattr(cpp_backend.CppBackend, "short_ghost_rows", 64)
    calls = []
    real = cpp_backend._short_ghost
    monkeypatch.setattr(cpp_backend, "_short_ghost", lambda *a: calls.append(a) or real(*a))
    short = vk.linear_weight_sq_norms(x, g, ranges, method="ghost", backend="cpp")
    assert bool(calls) == (width + 3 <= 64)  # the window: rows 0 to 3 + width (from width 2 on)
    close(short, naive.linear(x.double(), g.double(), spans))
    close(short, kernel.double(), rtol=1e-5)


@pytest.fixture
def small_blocks():
    """Blocks of 32 rows / features and k steps of 8 and 40, a 64 KiB pack budget: the shapes below then
    span several Gram blocks, several k steps, partial panels and several packing waves."""
    from vigor_kernels import _C

    saved = _C.get_tuning()
    _C.set_tuning(32, 8, 32, 48, 40, 1 << 16)
    yield
    _C.set_tuning(*saved)


@needs_cpp
@pytest.mark.parametrize("tuned", [False, True], ids=["default-blocks", "small-blocks"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_many_blocks(method, tuned, request):
    if tuned:
        request.getfixturevalue("small_blocks")
    spans = [(3, 290), (0, 300), (17, 18), (150, 150), (40, 223)]
    x = ragged(5, 300, 150, spans)
    g = ragged(5, 300, 37, spans)
    got = vk.linear_weight_sq_norms(x, g, torch.tensor(spans), method=method, backend="cpp")
    close(got, naive.linear(x, g, spans))
    assert got[3] == 0.0


@needs_cpp
def test_other_ops_many_blocks(small_blocks):
    spans = [(0, 70), (5, 64), (9, 9)]
    vocab = 40
    ids = torch.randint(0, vocab, (3, 70))
    g = ragged(3, 70, 33, spans)
    h = ragged(3, 70, 33, spans)
    g_head = ragged(3, 70, vocab, spans)
    ranges = torch.tensor(spans)
    close(vk.bias_sq_norms(g, ranges, backend="cpp"), naive.bias(g, spans))
    close(vk.norm_weight_sq_norms(g, h, ranges, backend="cpp"), naive.norm_weight(g, h, spans))
    close(vk.embedding_sq_norms(ids, g, ranges, backend="cpp"), naive.embedding(ids, g, spans, vocab))
    got = vk.tied_head_rows(ids, h, g_head, ranges, backend="cpp")
    want = vk.tied_head_rows(ids, h, g_head, ranges, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


ISA_SCRIPT = textwrap.dedent(
    """
    import json, torch, vigor_kernels as vk
    from vigor_kernels import _C
    torch.manual_seed(0)
    spans = [(2, 161), (0, 97)]
    x, g = torch.randn(2, 161, 70), torch.randn(2, 161, 45)
    out = {"isa": _C.build_info()["cpu_isa"]}
    for method in ("ghost", "direct"):
        out[method] = vk.linear_weight_sq_norms(x, g, torch.tensor(spans), method=method, backend="cpp").tolist()
    rows = [(g[b, s:e].double().T @ x[b, s:e].double()).square().sum().item() for b, (s, e) in enumerate(spans)]
    out["want"] = rows
    print(json.dumps(out))
    """
)


@needs_cpp
@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_every_isa_copy_is_exact(isa):
    """$VIGOR_CPU_ISA forces a lower copy of the kernels (a CPU without AVX-512 runs it)."""
    from vigor_kernels import _C

    levels = _C.build_info()["cpu_isa_levels"].split(",")
    if isa not in levels:
        pytest.skip(f"{isa} not compiled in or not supported here ({levels})")
    env = {**os.environ, "VIGOR_CPU_ISA": isa, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["isa"] == isa
    want = torch.tensor(out["want"], dtype=torch.float64)
    for method in ("ghost", "direct"):
        close(torch.tensor(out[method]), want)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_are_widened_exactly(dtype):
    """bf16/fp16 are widened to the very fp32 values (fp16 subnormals included): same result as the fp32
    copy of the same numbers, bit for bit."""
    x = torch.randn(2, 40, 24).to(dtype)
    g = (torch.randn(2, 40, 20) * 1e-5).to(dtype)  # fp16 subnormals below 6.1e-5
    if dtype == torch.float16:
        assert (g.abs() < 6.1e-5).float().mean() > 0.5
    for method in ("ghost", "direct"):
        half = vk.linear_weight_sq_norms(x, g, method=method, backend="cpp")
        full = vk.linear_weight_sq_norms(x.float(), g.float(), method=method, backend="cpp")
        assert torch.equal(half, full), method
    assert torch.equal(vk.bias_sq_norms(g, backend="cpp"), vk.bias_sq_norms(g.float(), backend="cpp"))


@needs_cpp
def test_same_bits_for_any_thread_count():
    """Sizes above the kernels' serial cut-off, so 2 and 3 threads really split the work: the same bits for
    1, 2 and 3 threads, and those bits match the naive formulas."""
    from vigor_kernels import _C

    spans = [(0, 400), (30, 170), (0, 1)]
    x, g = ragged(3, 400, 128, spans), ragged(3, 400, 96, spans)
    g_wide = ragged(3, 400, 700, spans)
    ids = torch.randint(0, 9, (3, 400))
    ranges = torch.tensor(spans)
    before = _C.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            _C.set_num_threads(threads)
            results.append(
                [
                    vk.linear_weight_sq_norms(x, g, ranges, method="ghost", backend="cpp"),
                    vk.linear_weight_sq_norms(x, g, ranges, method="direct", backend="cpp"),
                    vk.embedding_sq_norms(ids, g_wide, ranges, backend="cpp"),
                    vk.bias_sq_norms(g_wide, ranges, backend="cpp"),
                    vk.tied_head_rows(ids, x, g, ranges, backend="cpp"),
                ]
            )
    finally:
        _C.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    # and the bits they agree on are right (same shapes, against the naive float64 formulas)
    ghost, direct, emb, bias, rows = results[0]
    close(ghost, naive.linear(x, g, spans))
    close(direct, naive.linear(x, g, spans))
    close(emb, naive.embedding(ids, g_wide, spans, 9))
    close(bias, naive.bias(g_wide, spans))
    torch.testing.assert_close(rows, vk.tied_head_rows(ids, x, g, ranges, backend="torch"), rtol=1e-4, atol=1e-4)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch, vigor_kernels as vk
    x, g = torch.randn(1, 8192, 8), torch.randn(1, 8192, 8)
    vk.linear_weight_sq_norms(x[:, :64], g[:, :64], method="ghost", backend="cpp")  # load everything first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vk.linear_weight_sq_norms(x, g, method="ghost", backend="cpp")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


@needs_cpp
def test_ghost_keeps_no_t_by_t_buffer():
    """T = 8192: a T x T fp32 Gram would be 256 MiB; the tiled kernel needs well under 32 MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], env=env, capture_output=True, text=True, check=True)
    grown = int(res.stdout.strip().splitlines()[-1])
    assert grown < 32 * 2**20, f"peak RSS grew by {grown / 2**20:.1f} MiB"


class TestCheckedBeforeCpp:
    """Direct calls on the backend object (bypassing vigor_kernels.ops) are checked too."""

    @pytest.fixture
    def be(self):
        if not CPP.available:
            pytest.skip(CPP.reason)
        return vk.dispatch._load("cpp")

    def rows(self, batch=2, length=5):
        return vk.as_row_ranges(None, batch, length, torch.device("cpu"))

    def test_wrong_device(self, be):
        with pytest.raises(vk.VigorInputError, match="is on meta"):
            be.linear_ghost(torch.randn(2, 5, 3, device="meta"), torch.randn(2, 5, 4), self.rows())

    def test_wrong_dtype(self, be):
        with pytest.raises(vk.VigorInputError, match="float64"):
            be.bias(torch.randn(2, 5, 3, dtype=torch.float64), self.rows())

    def test_wrong_rank(self, be):
        with pytest.raises(vk.VigorInputError, match="3-D"):
            be.linear_direct(torch.randn(2, 5, 3, 1), torch.randn(2, 5, 4), self.rows())

    def test_mismatched_rows(self, be):
        with pytest.raises(vk.VigorInputError, match="expected"):
            be.linear_direct(torch.randn(2, 5, 3), torch.randn(2, 6, 4), self.rows())

    def test_mixed_dtypes(self, be):
        with pytest.raises(vk.VigorInputError, match="share one dtype"):
            be.linear_ghost(torch.randn(2, 5, 3), torch.randn(2, 5, 4).half(), self.rows())

    def test_ranges_of_other_batch(self, be):
        with pytest.raises(vk.VigorInputError, match="cover 3 samples"):
            be.bias(torch.randn(2, 5, 3), self.rows(batch=3))

    def test_ranges_whose_bounds_disagree_with_their_host_copy(self, be):
        """The CUDA kernels read ``bounds``, the CPU ones ``host``: both must describe the tensors' batch."""
        rows = vk.RowRanges(torch.zeros(3, 2, dtype=torch.int64), ((0, 5), (0, 5)))
        with pytest.raises(vk.VigorInputError, match=r"bounds \[3, 2\]"):
            be.bias(torch.randn(2, 5, 3), rows)

    def test_norm_weight_needs_xhat_of_g_shape(self, be):
        with pytest.raises(vk.VigorInputError, match="must match"):
            be.norm_weight(torch.randn(2, 5, 3), torch.randn(2, 5, 4), self.rows())

    def test_ranges_beyond_length(self, be):
        with pytest.raises(vk.VigorInputError, match=r"ranges\[0\]"):
            be.bias(torch.randn(2, 4, 3), self.rows(length=5))

    def test_bad_ids(self, be):
        with pytest.raises(vk.VigorInputError, match="int64"):
            be.embedding(torch.zeros(2, 5, dtype=torch.int32), torch.randn(2, 5, 3), self.rows())
        with pytest.raises(vk.VigorInputError, match=">= 0, or -1"):
            be.embedding(torch.full((2, 5), -2), torch.randn(2, 5, 3), self.rows())
        with pytest.raises(vk.VigorInputError, match="vocab"):
            be.tied_head_rows(torch.full((2, 5), 4), torch.randn(2, 5, 3), torch.randn(2, 5, 4), self.rows())

    def test_strided_input_is_copied_not_misread(self, be):
        x = torch.randn(2, 5, 6)[:, :, ::2]
        g = torch.randn(2, 5, 4)
        want = naive.linear(x, g, [(0, 5)] * 2)
        close(be.linear_ghost(x, g, self.rows()), want)

    def test_zero_width_features(self, be):
        assert torch.equal(be.linear_ghost(torch.randn(2, 5, 0), torch.randn(2, 5, 4), self.rows()), torch.zeros(2))

    def test_declines_other_devices(self, be):
        assert "CPU" in be.cannot_serve(torch.device("cuda"), torch.float32)
        assert be.cannot_serve(torch.device("cpu"), torch.float16) is None


MISSING_BUILD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, json

    class NoExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "vigor_kernels._C":
                raise ImportError("simulated missing build")
            return None

    sys.meta_path.insert(0, NoExtension())
    import torch, vigor_kernels as vk
    status = vk.available_backends()
    norms = vk.linear_weight_sq_norms(torch.ones(1, 2, 3), torch.ones(1, 2, 4))  # auto falls back to torch
    print(json.dumps({"cpp": str(status["cpp"]), "cuda": str(status["cuda"]), "norm": norms.tolist()}))
    """
)


def test_missing_build_leaves_the_package_working():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VIGOR_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", MISSING_BUILD_SCRIPT], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "unavailable" in out["cpp"] and "simulated missing build" in out["cpp"] and "pip install -e ." in out["cpp"]
    assert "unavailable" in out["cuda"] and "simulated missing build" in out["cuda"]
    assert out["norm"] == [4 * 3 * 4.0]  # ||G^T X||^2 with G^T X = 2 * ones(4, 3)
