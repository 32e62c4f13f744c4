"""pytest-benchmark timings of each vigor_kernels op per backend, on ragged Qwen2.5-0.5B-like layer shapes
(these are benchmarks: the only assertions are that a result came back)."""

from __future__ import annotations

import pytest
import torch
from conftest import ragged_ranges, synchronized

import vigor_kernels as vk

B, T = 4, 256
SHAPES = {"attn_q": (896, 896), "mlp_up": (896, 4864), "mlp_down": (4864, 896)}


def _randn(*shape, device):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(device)


@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("layer", sorted(SHAPES))
def test_linear_weight(benchmark, backend, layer, method):
    name, device = backend
    d_in, d_out = SHAPES[layer]
    x, g = _randn(B, T, d_in, device=device), _randn(B, T, d_out, device=device)
    ranges = ragged_ranges(B, T, device)
    fn = lambda: vk.linear_weight_sq_norms(x, g, ranges, method=method, backend=name)
    benchmark.extra_info.update(backend=name, d_in=d_in, d_out=d_out, T=T, B=B)
    assert benchmark(synchronized(fn, device)).shape == (B,)


def test_bias(benchmark, backend):
    name, device = backend
    g = _randn(B, T, 4864, device=device)
    ranges = ragged_ranges(B, T, device)
    assert benchmark(synchronized(lambda: vk.bias_sq_norms(g, ranges, backend=name), device)).shape == (B,)


def test_norm_weight(benchmark, backend):
    name, device = backend
    g, xhat = _randn(B, T, 896, device=device), _randn(B, T, 896, device=device)
    ranges = ragged_ranges(B, T, device)
    fn = lambda: vk.norm_weight_sq_norms(g, xhat, ranges, backend=name)
    assert benchmark(synchronized(fn, device)).shape == (B,)


def test_embedding(benchmark, backend):
    name, device = backend
    ids = torch.randint(0, 4096, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    g = _randn(B, T, 896, device=device)
    ranges = ragged_ranges(B, T, device)
    fn = lambda: vk.embedding_sq_norms(ids, g, ranges, backend=name)
    assert benchmark(synchronized(fn, device)).shape == (B,)


def test_tied_head_rows(benchmark, backend):
    name, device = backend
    vocab = 4096
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    h, g_head = _randn(B, T, 896, device=device), _randn(B, T, vocab, device=device)
    ranges = ragged_ranges(B, T, device)
    fn = lambda: vk.tied_head_rows(ids, h, g_head, ranges, backend=name)
    assert benchmark(synchronized(fn, device)).shape == (B, T, 896)
