"""The triton backend on a CUDA GPU at real layer shapes: Qwen2.5-1.5B (d 1536, d_ff 8960, k/v 256) and
Qwen2.5-7B (d 3584, d_ff 18944, k/v 512), bf16 / fp16 on tensor cores and fp32 through the exact path.

Every op is held to a float64 reference formed on the GPU (the per-sample gradient itself), and to
the torch backend. Ragged batches with an all-padding sample and NaN in padding, as in the CPU suite.
Run by scripts/gpu/triton_suite.sh; skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import vigor_kernels as vk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RTOL = 1e-4
MODELS = {
    # name: (d, d_ff, d_kv, vocab)
    "qwen2.5-1.5b": (1536, 8960, 256, 151_936),
    "qwen2.5-7b": (3584, 18944, 512, 152_064),
}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def layers(model: str) -> list[tuple[str, int, int]]:
    d, d_ff, d_kv, _ = MODELS[model]
    return [("q_o", d, d), ("k_v", d, d_kv), ("up", d, d_ff), ("down", d_ff, d)]


def spans_for(batch: int, length: int) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(length)
    spans = []
    for _ in range(batch - 1):
        s = int(torch.randint(0, length // 4, (1,), generator=gen))
        spans.append((s, int(torch.randint(s + 1, length + 1, (1,), generator=gen))))
    return [(0, length), *spans[1:], (length // 2, length // 2)]  # one full, one all padding


def features(batch, length, d, dtype, spans, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(batch, length, d, device="cuda", generator=gen).to(dtype)
    for b, (s, e) in enumerate(spans):
        t[b, :s] = float("nan")
        t[b, e:] = float("nan")
    return t


def linear_reference(x, g, spans) -> torch.Tensor:
    """``||G_b^T X_b||^2`` from the per-sample gradient formed in float64 on the GPU."""
    out = []
    for b, (s, e) in enumerate(spans):
        grad = g[b, s:e].double().T @ x[b, s:e].double()
        out.append(grad.square().sum())
    return torch.stack(out)


def assert_norms(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float32 and torch.isfinite(got).all(), got
    scale = float(want.abs().max().clamp_min(1e-30))
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * scale * 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_at_model_shapes(model, dtype, method):
    batch, length = 4, 300  # 300: not a multiple of any tile
    spans = spans_for(batch, length)
    ranges = torch.tensor(spans)
    for name, d_in, d_out in layers(model):
        x = features(batch, length, d_in, dtype, spans, seed=1)
        g = features(batch, length, d_out, dtype, spans, seed=2)
        got = vk.linear_weight_sq_norms(x, g, ranges, method=method, backend="triton")
        want = linear_reference(x, g, spans)
        assert got[-1].item() == 0.0, name
        assert_norms(got, want)
        assert_norms(got, vk.linear_weight_sq_norms(x, g, ranges, method=method, backend="torch").double())


@pytest.mark.parametrize("model", sorted(MODELS))
def test_long_sequences_and_the_direct_split(model):
    """One long sample (the direct kernel splits its rows), and ghost over many tiles, bf16."""
    _, d_in, d_out = layers(model)[1]  # k/v: few weight tiles, so one sample leaves the GPU idle
    spans = [(0, 4096)]
    x = features(1, 4096, d_in, torch.bfloat16, spans, seed=3)
    g = features(1, 4096, d_out, torch.bfloat16, spans, seed=4)
    want = linear_reference(x, g, spans)
    for method in ("ghost", "direct"):
        first = vk.linear_weight_sq_norms(x, g, method=method, backend="triton")
        assert_norms(first, want)
        assert torch.equal(first, vk.linear_weight_sq_norms(x, g, method=method, backend="triton")), method


def test_strided_inputs_at_model_shape():
    """A layer input that is a slice of a wider activation (fused qkv) and a transposed-layout gradient."""
    d, _, d_kv, _ = MODELS["qwen2.5-1.5b"]
    spans = [(0, 200), (10, 150)]
    fused = features(2, 200, d + 2 * d_kv, torch.bfloat16, spans, seed=5)
    x = fused[:, :, :d]
    g = features(2, d_kv, 200, torch.bfloat16, [(0, d_kv)] * 2, seed=6).transpose(1, 2)
    for b, (s, e) in enumerate(spans):  # NaN padding through the view, which stays non-contiguous
        g[b, :s] = float("nan")
        g[b, e:] = float("nan")
    assert not x.is_contiguous() and not g.is_contiguous()
    for method in ("ghost", "direct"):
        got = vk.linear_weight_sq_norms(x, g, torch.tensor(spans), method=method, backend="triton")
        assert_norms(got, linear_reference(x, g, spans))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_reductions_and_embedding_at_model_shapes(model, dtype):
    d, d_ff, _, vocab = MODELS[model]
    batch, length = 4, 300
    spans = spans_for(batch, length)
    ranges = torch.tensor(spans)
    for width in (d, d_ff):
        g = features(batch, length, width, dtype, spans, seed=7)
        xhat = features(batch, length, width, dtype, spans, seed=8)
        assert_norms(vk.bias_sq_norms(g, ranges, backend="triton"), vk.bias_sq_norms(g, ranges, backend="torch"))
        assert_norms(
            vk.norm_weight_sq_norms(g, xhat, ranges, backend="triton"),
            vk.norm_weight_sq_norms(g, xhat, ranges, backend="torch"),
        )
    ids = torch.randint(0, 64, (batch, length), device="cuda")  # a small id range: many repeats
    ids[:, ::7] = torch.randint(0, vocab, (batch, len(range(0, length, 7))), device="cuda")
    g = features(batch, length, d, dtype, spans, seed=9)
    assert_norms(
        vk.embedding_sq_norms(ids, g, ranges, padding_idx=3, backend="triton"),
        vk.embedding_sq_norms(ids, g, ranges, padding_idx=3, backend="torch"),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tied_cross_term_at_qwen_1_5b_shape(dtype):
    """Qwen2.5-1.5B ties its embedding and LM head: the head rows over the full 151,936-token vocab."""
    d, _, _, vocab = MODELS["qwen2.5-1.5b"]
    batch, length = 2, 160
    spans = [(0, 160), (30, 101)]
    ranges = torch.tensor(spans)
    ids = torch.randint(0, vocab, (batch, length), device="cuda")
    h = features(batch, length, d, dtype, spans, seed=10)
    g_head = features(batch, length, vocab, dtype, spans, seed=11)
    got = vk.tied_head_rows(ids, h, g_head, ranges, backend="triton")
    want = vk.tied_head_rows(ids, h, g_head, ranges, backend="torch")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))
    g_emb = features(batch, length, d, dtype, spans, seed=12)
    cross = vk.tied_cross_term(ids, g_emb, h, g_head, ranges, backend="triton")
    reference = vk.tied_cross_term(ids, g_emb, h, g_head, ranges, backend="torch")
    torch.testing.assert_close(cross, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))


def test_ghost_extra_memory_is_o_of_batch():
    """16 x 4096 rows at the 7B MLP shape: the ghost op allocates a few KiB, not B x T x T floats."""
    d_in, d_out = MODELS["qwen2.5-7b"][0], MODELS["qwen2.5-7b"][1]
    batch, length = 16, 4096
    x = torch.randn(batch, length, d_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(batch, length, d_out, device="cuda", dtype=torch.bfloat16)
    vk.linear_weight_sq_norms(x, g, method="ghost", backend="triton")  # compile and tune first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vk.linear_weight_sq_norms(x, g, method="ghost", backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1 << 20, extra  # 16 x 528 tile pairs x 4 bytes, rounded up by the allocator
    assert extra < batch * length * length * 4 / 1000
