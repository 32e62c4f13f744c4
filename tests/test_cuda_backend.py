"""The ``cuda`` backend beyond the shared conformance suite. On a machine without a GPU only the build and
availability checks run; scripts/gpu/cuda_suite.sh runs the rest (and tests/test_ops.py with
VIGOR_TEST_BACKENDS=cuda) on a GPU."""

from __future__ import annotations

import os
import shutil

import naive
import pytest
import torch

import vigor_kernels as vk

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
RTOL = 1e-4


def _ext():
    try:
        from vigor_kernels import _C
    except ImportError:
        return None
    return _C


def test_cuda_sources_are_compiled_where_nvcc_is():
    """CI has nvcc but no GPU: the build must still have compiled the CUDA kernels."""
    ext = _ext()
    if ext is None:
        pytest.skip("vigor_kernels._C is not built")
    if shutil.which("nvcc") is None or os.environ.get("VIGOR_WITH_CUDA", "1") in ("0", "false", "OFF", "off"):
        pytest.skip("no nvcc on PATH (or VIGOR_WITH_CUDA=0): the CUDA kernels are not expected")
    info = ext.build_info()
    assert info["cuda"], info
    if not os.environ.get("VIGOR_CUDA_ARCHS"):
        assert info["cuda_archs"].split(",") == ["80", "90"]


def test_cuda_says_why_it_is_unavailable():
    status = vk.available_backends()["cuda"]
    if status.available:
        assert HAS_GPU
        return
    assert any(s in status.reason for s in ("no CUDA device", "without CUDA", "did not load")), status.reason
    with pytest.raises(vk.BackendError, match="cuda"):
        vk.bias_sq_norms(torch.randn(2, 3, 4), backend="cuda")


def ragged(batch, length, d, spans, dtype, device="cuda"):
    t = torch.randn(batch, length, d).to(dtype)
    for b, (s, e) in enumerate(spans):
        t[b, :s] = float("nan")
        t[b, e:] = float("nan")
    return t.to(device)


def close(got, want, rtol=RTOL):
    got = got.cpu().double()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()) * 1e-3)


SPANS = [(3, 190), (0, 200), (17, 18), (100, 100), (64, 129)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_many_tiles(method, dtype):
    """Several 64-row tiles per sample, features not a multiple of the 16-wide k step, ragged samples."""
    x = ragged(5, 200, 150, SPANS, dtype)
    g = ragged(5, 200, 37, SPANS, dtype)
    got = vk.linear_weight_sq_norms(x, g, torch.tensor(SPANS), method=method, backend="cuda")
    assert got.device.type == "cuda" and got.dtype == torch.float32
    close(got, naive.linear(x.cpu(), g.cpu(), SPANS))
    assert got[3].item() == 0.0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_other_ops_many_tiles(dtype):
    vocab = 300
    ranges = torch.tensor(SPANS)
    ids = torch.randint(0, 50, (5, 200), device="cuda")  # repeats inside a sample
    g = ragged(5, 200, 300, SPANS, dtype)
    h = ragged(5, 200, 300, SPANS, dtype)
    g_head = ragged(5, 200, vocab, SPANS, dtype)
    close(vk.bias_sq_norms(g, ranges, backend="cuda"), naive.bias(g.cpu(), SPANS))
    close(vk.norm_weight_sq_norms(g, h, ranges, backend="cuda"), naive.norm_weight(g.cpu(), h.cpu(), SPANS))
    close(vk.embedding_sq_norms(ids, g, ranges, backend="cuda"), naive.embedding(ids.cpu(), g.cpu(), SPANS, vocab))
    close(
        vk.embedding_sq_norms(ids, g, ranges, padding_idx=3, backend="cuda"),
        naive.embedding(ids.cpu(), g.cpu(), SPANS, vocab, padding_idx=3),
    )
    got = vk.tied_head_rows(ids, h, g_head, ranges, backend="cuda")
    want = vk.tied_head_rows(ids.cpu(), h.cpu(), g_head.cpu(), ranges, backend="torch")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
def test_bitwise_reproducible_and_on_the_current_stream():
    x, g = torch.randn(3, 300, 96, device="cuda"), torch.randn(3, 300, 80, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        runs = [vk.linear_weight_sq_norms(x, g, method="ghost", backend="cuda") for _ in range(3)]
        direct = vk.linear_weight_sq_norms(x, g, method="direct", backend="cuda")
    side.synchronize()
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    close(runs[0], naive.linear(x.cpu(), g.cpu(), [(0, 300)] * 3))  # the reproducible bits are also right
    close(direct, naive.linear(x.cpu(), g.cpu(), [(0, 300)] * 3))


@gpu
@pytest.mark.gpu
def test_rejects_host_tensors():
    be = vk.dispatch._load("cuda")
    rows = vk.as_row_ranges(None, 2, 5, torch.device("cpu"))
    with pytest.raises(vk.VigorInputError, match="is on cpu"):
        be.linear_ghost(torch.randn(2, 5, 3), torch.randn(2, 5, 4), rows)
