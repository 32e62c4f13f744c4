"""Op conformance suite: every available backend against the naive float64 formulas of tests/naive.py.

Shapes are small and awkward on purpose (T = 1, T not a multiple of any block, d = 3, a sample that
is all padding, NaN in padding rows, strided inputs, per-head 4-D inputs) so that it also runs under
TRITON_INTERPRET=1 on a CPU.
"""

from __future__ import annotations

import math

import naive
import pytest
import torch
from conftest import backends_under_test, device_for
from torch.utils._python_dispatch import TorchDispatchMode

import vigor_kernels as vk

BACKENDS = backends_under_test()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, d_in, d_out)
SHAPES = [(1, 1, 3, 3), (3, 17, 3, 5), (2, 33, 20, 7), (4, 64, 16, 16), (2, 130, 40, 24)]
RTOL = 1e-4


def spans_for(batch: int, length: int, kind: str) -> list[tuple[int, int]]:
    if kind == "full":
        return [(0, length)] * batch
    gen = torch.Generator().manual_seed(batch * 1000 + length)
    spans = []
    for _ in range(batch):
        s = int(torch.randint(0, max(1, length // 3), (1,), generator=gen))
        e = int(torch.randint(s, length + 1, (1,), generator=gen))
        spans.append((s, e))
    spans[-1] = (length // 2, length // 2)  # one sample with no valid row at all
    return spans


def features(batch, length, d, dtype, device, spans=None, poison=True):
    """Random features rounded to dtype; rows outside spans hold NaN (must never leak into a norm)."""
    t = torch.randn(batch, length, d, dtype=torch.float32).to(dtype)
    if spans is not None and poison:
        for b, (s, e) in enumerate(spans):
            t[b, :s] = float("nan")
            t[b, e:] = float("nan")
    return t.to(device)


def assert_close_norms(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), got
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(scale) * 1e-3)


def skip_if_cannot(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """A backend may decline a dtype on a device (e.g. bf16 under the Triton interpreter), but only by
    saying so through cannot_serve: the test then checks that the forced call raises that reason."""
    chosen = vk.select_backend("torch", device, dtype)  # always possible
    assert chosen.name == "torch"
    reason = vk.dispatch._load(backend).cannot_serve(device, dtype)
    if reason:
        with pytest.raises(vk.BackendError, match="cannot serve"):
            vk.bias_sq_norms(torch.zeros(1, 1, 1, dtype=dtype, device=device), backend=backend)
        pytest.skip(f"{backend} declines {dtype} on {device}: {reason}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["full", "ragged"])
@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
def test_linear(backend, dtype, shape, kind, method):
    device = device_for(backend)
    skip_if_cannot(backend, device, dtype)
    batch, length, d_in, d_out = shape
    spans = spans_for(batch, length, kind)
    x = features(batch, length, d_in, dtype, device, spans)
    g = features(batch, length, d_out, dtype, device, spans)
    ranges = torch.tensor(spans)
    got = vk.linear_weight_sq_norms(x, g, ranges, method=method, backend=backend)
    assert_close_norms(got, naive.linear(x.cpu(), g.cpu(), spans))
    assert got[-1].item() == 0.0 or kind == "full"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_strided_and_per_head(backend, method):
    """Non-contiguous inputs (a transposed view) and 4-D [B, T, H, d] inputs (heads folded into rows)."""
    device = device_for(backend)
    base_x = torch.randn(5, 19, 3, 2, device=device)  # [d_in=5, T, H, B] -> permuted view
    x = base_x.permute(3, 1, 2, 0)
    g = torch.randn(2, 19, 3, 7, device=device)[:, :, :, ::2]  # d_out = 4, stride 2
    assert not x.is_contiguous() and not g.is_contiguous()
    spans = [(2, 19), (0, 11)]
    got = vk.linear_weight_sq_norms(x, g, torch.tensor(spans), method=method, backend=backend)
    assert_close_norms(got, naive.linear(x.cpu(), g.cpu(), spans))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_bias_and_norm_weight(backend, dtype, shape):
    device = device_for(backend)
    skip_if_cannot(backend, device, dtype)
    batch, length, d, _ = shape
    spans = spans_for(batch, length, "ragged")
    g = features(batch, length, d, dtype, device, spans)
    xhat = features(batch, length, d, dtype, device, spans)
    ranges = torch.tensor(spans)
    assert_close_norms(vk.bias_sq_norms(g, ranges, backend=backend), naive.bias(g.cpu(), spans))
    got = vk.norm_weight_sq_norms(g, xhat, ranges, backend=backend)
    assert_close_norms(got, naive.norm_weight(g.cpu(), xhat.cpu(), spans))


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_weight_per_head(backend):
    """q/k norms: the weight is shared by every head, so heads are summed like rows."""
    device = device_for(backend)
    g = torch.randn(3, 6, 4, 5, device=device)
    xhat = torch.randn(3, 6, 4, 5, device=device)
    spans = [(0, 6), (1, 4), (2, 2)]
    got = vk.norm_weight_sq_norms(g, xhat, torch.tensor(spans), backend=backend)
    assert_close_norms(got, naive.norm_weight(g.cpu(), xhat.cpu(), spans))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 17, 5), (2, 40, 24)], ids=str)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding(backend, dtype, shape, padding_idx):
    device = device_for(backend)
    skip_if_cannot(backend, device, dtype)
    batch, length, d = shape
    vocab = 7  # small, so tokens repeat inside a sample
    spans = spans_for(batch, length, "ragged")
    ids = torch.randint(0, vocab, (batch, length), device=device)
    g = features(batch, length, d, dtype, device, spans)
    got = vk.embedding_sq_norms(ids, g, torch.tensor(spans), padding_idx=padding_idx, backend=backend)
    assert_close_norms(got, naive.embedding(ids.cpu(), g.cpu(), spans, vocab, padding_idx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (3, 17, 5, 11), (2, 37, 16, 29)], ids=str)
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_tied_cross_term(backend, dtype, shape, padding_idx):
    device = device_for(backend)
    skip_if_cannot(backend, device, dtype)
    batch, length, d, vocab = shape
    spans = spans_for(batch, length, "ragged")
    ids = torch.randint(0, vocab, (batch, length), device=device)
    g_emb = features(batch, length, d, dtype, device, spans)
    h = features(batch, length, d, dtype, device, spans)
    g_head = features(batch, length, vocab, dtype, device, spans)
    got = vk.tied_cross_term(ids, g_emb, h, g_head, torch.tensor(spans), padding_idx=padding_idx, backend=backend)
    want = naive.tied_cross(ids.cpu(), g_emb.cpu(), h.cpu(), g_head.cpu(), spans, padding_idx)
    # the cross term has either sign and can nearly cancel: compare against the size of its parts
    scale = (
        naive.linear(h.cpu(), g_head.cpu(), spans).sqrt()
        * naive.embedding(ids.cpu(), g_emb.cpu(), spans, vocab, padding_idx).sqrt()
    )
    got = got.cpu().double()
    assert torch.isfinite(got).all()
    assert ((got - want).abs() <= RTOL * (want.abs() + 2 * scale) + 1e-30).all(), (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_bitwise_deterministic(backend):
    """Two calls give the same bits, and those bits are right (same shapes, against the naive formula)."""
    device = device_for(backend)
    x, g = torch.randn(3, 45, 12, device=device), torch.randn(3, 45, 9, device=device)
    for method in ("ghost", "direct"):
        first = vk.linear_weight_sq_norms(x, g, method=method, backend=backend)
        again = vk.linear_weight_sq_norms(x, g, method=method, backend=backend)
        assert torch.equal(first, again), method
        assert_close_norms(first, naive.linear(x.cpu(), g.cpu(), [(0, 45)] * 3))


class LargestTemporary(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_torch_backend_never_builds_a_t_by_t_tensor(monkeypatch, method):
    """At T = 4096 every temporary stays within the chunk budget (no [B, T, T] or [T, T] tensor)."""
    batch, length, budget = 2, 4096, 1 << 21
    monkeypatch.setenv("VIGOR_TORCH_CHUNK_ELEMS", str(budget))
    x, g = torch.randn(batch, length, 4), torch.randn(batch, length, 3)
    with LargestTemporary() as spy:
        got = vk.linear_weight_sq_norms(x, g, method=method, backend="torch")
    assert spy.largest <= budget < length * length
    assert_close_norms(got, naive.linear(x, g, [(0, length)] * batch))


def test_auto_follows_the_cost_model():
    assert vk.choose_linear_method([16] * 4, 512, 512) == "ghost"
    assert vk.choose_linear_method([4096] * 4, 64, 64) == "direct"
    crossover = vk.crossover_length(896, 4864)
    assert math.isclose(crossover, 2 * 896 * 4864 / (896 + 4864))
    below, above = int(crossover) - 1, int(crossover) + 1
    assert vk.choose_linear_method([below], 896, 4864) == "ghost"
    assert vk.choose_linear_method([above], 896, 4864) == "direct"


class TestBadInput:
    def test_mismatched_rows(self):
        with pytest.raises(vk.VigorInputError, match="leading dims"):
            vk.linear_weight_sq_norms(torch.randn(2, 5, 3), torch.randn(2, 6, 4))

    def test_wrong_rank(self):
        with pytest.raises(vk.VigorInputError, match="at least 3-D"):
            vk.linear_weight_sq_norms(torch.randn(5, 3), torch.randn(5, 4))

    def test_integer_features(self):
        with pytest.raises(vk.VigorInputError, match="float32, float16 or bfloat16"):
            vk.bias_sq_norms(torch.ones(2, 5, 3, dtype=torch.int32))

    def test_mixed_dtypes(self):
        with pytest.raises(vk.VigorInputError, match="share one dtype"):
            vk.linear_weight_sq_norms(torch.randn(2, 5, 3), torch.randn(2, 5, 4, dtype=torch.float64).half())

    def test_ranges_out_of_bounds(self):
        with pytest.raises(vk.VigorInputError, match=r"ranges\[1\]"):
            vk.bias_sq_norms(torch.randn(2, 5, 3), torch.tensor([[0, 5], [3, 6]]))

    def test_ranges_shape(self):
        with pytest.raises(vk.VigorInputError, match=r"shape \[B, 2\]"):
            vk.bias_sq_norms(torch.randn(2, 5, 3), torch.tensor([0, 5]))

    def test_float_ranges(self):
        with pytest.raises(vk.VigorInputError, match="integer tensor"):
            vk.bias_sq_norms(torch.randn(2, 5, 3), torch.tensor([[0.0, 5.0], [0.0, 5.0]]))

    def test_float_ids(self):
        with pytest.raises(vk.VigorInputError, match="ids must be an integer tensor"):
            vk.embedding_sq_norms(torch.zeros(2, 5), torch.randn(2, 5, 3))

    def test_negative_ids(self):
        with pytest.raises(vk.VigorInputError, match="non-negative"):
            vk.embedding_sq_norms(torch.full((2, 5), -3), torch.randn(2, 5, 3))

    def test_ids_beyond_head_vocab(self):
        with pytest.raises(vk.VigorInputError, match="vocab"):
            vk.tied_head_rows(torch.full((1, 4), 9), torch.randn(1, 4, 3), torch.randn(1, 4, 5))

    def test_unknown_method(self):
        with pytest.raises(vk.VigorInputError, match="method"):
            vk.linear_weight_sq_norms(torch.randn(2, 5, 3), torch.randn(2, 5, 4), method="fast")

    def test_unknown_backend_argument(self):
        with pytest.raises(vk.BackendError, match="unknown backend 'nope'"):
            vk.bias_sq_norms(torch.randn(2, 5, 3), backend="nope")

    def test_unknown_backend_env(self, monkeypatch):
        monkeypatch.setenv("VIGOR_BACKEND", "nope")
        with pytest.raises(vk.BackendError, match=r"\$VIGOR_BACKEND"):
            vk.bias_sq_norms(torch.randn(2, 5, 3))

    def test_env_forces_backend(self, monkeypatch):
        monkeypatch.setenv("VIGOR_BACKEND", "torch")
        assert vk.select_backend(None, torch.device("cpu"), torch.float32).name == "torch"

    def test_unavailable_backend_says_why(self):
        missing = [n for n, s in vk.available_backends().items() if not s.available]
        for name in missing:
            with pytest.raises(vk.BackendError, match=name):
                vk.bias_sq_norms(torch.randn(2, 5, 3), backend=name)

    def test_mixed_devices(self):
        meta = torch.randn(2, 5, 4, device="meta")
        with pytest.raises(vk.VigorInputError, match="different devices"):
            vk.linear_weight_sq_norms(torch.randn(2, 5, 3), meta)


def test_required_backends_are_available():
    """CI lists the backends it must test in $VIGOR_REQUIRE_BACKENDS; a missing one is a failure, not a skip."""
    import os

    required = [b for b in os.environ.get("VIGOR_REQUIRE_BACKENDS", "torch").split(",") if b]
    status = vk.available_backends()
    missing = {b: str(status[b]) for b in required if not status[b].available}
    assert not missing, missing
