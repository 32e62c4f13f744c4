"""Every op on every backend at real model widths, against the naive float64 formulas of tests/naive.py.

tests/test_ops.py keeps d <= 40 so that it runs under the Triton interpreter; bugs that only show once a
row spans several feature chunks, tiles or vector widths (a chunk loop that skips or repeats features past
the first chunk) pass it. Here the widths are those of Qwen2.5-0.5B and a bit more, none a multiple of any
tile, chunk or vector width (900 = d_model >= 896, 4870 = d_ff >= 4864), with very few rows (B = 2, ragged
spans of at most 5 rows, NaN outside them).

Under the Triton interpreter (16-wide blocks, one Python-level program per block) a 4870 x 900 direct
kernel is ~17k programs per sample: there the direct kernel pairs each real width with a narrow one
(900 x 17, 17 x 900, i.e. 57 feature blocks on the wide side) and the reductions run at d = 900 only
(57 chunks with a partial tail); the ghost kernel, the embedding and the tied head rows keep every width.
On a GPU, or for any other backend, every case runs at full width.
"""

from __future__ import annotations

import naive
import pytest
import torch
from conftest import backends_under_test, device_for

import vigor_kernels as vk

D_MODEL, D_FF = 900, 4870
VOCAB = 4870  # the tied head's logit width; tokens drawn from a few ids so that rows share embedding rows
LENGTH = 6
SPANS = [(1, 6), (0, 3)]
RTOL = 1e-4
BACKENDS = backends_under_test()
NARROW = 17  # the direct kernel's narrow side under the interpreter


def interpreted(backend: str) -> bool:
    if backend != "triton":
        return False
    from vigor_kernels.triton_backend import _runtime

    return _runtime.INTERPRETING


def poisoned(d: int, device: torch.device) -> torch.Tensor:
    t = torch.randn(len(SPANS), LENGTH, d)
    for b, (s, e) in enumerate(SPANS):
        t[b, :s] = float("nan")
        t[b, e:] = float("nan")
    return t.to(device)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("d_in", "d_out"), [(D_MODEL, D_FF), (D_FF, D_MODEL)], ids=["up", "down"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_linear_at_real_widths(backend, method, d_in, d_out):
    """Guards the linear kernels' feature tiling/chunking past the first tile, on both sides (a wide
    output as in up/gate projections, a wide input as in down projections)."""
    device = device_for(backend)
    if method == "direct" and interpreted(backend):
        d_in, d_out = (d_in, NARROW) if d_in > d_out else (NARROW, d_out)
    x, g = poisoned(d_in, device), poisoned(d_out, device)
    got = vk.linear_weight_sq_norms(x, g, torch.tensor(SPANS), method=method, backend=backend)
    assert_close(got, naive.linear(x.cpu(), g.cpu(), SPANS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [D_MODEL, D_FF])
def test_bias_and_norm_weight_at_real_widths(backend, d):
    """Guards the row-sum reductions' feature chunking (e.g. a chunk width that skips or repeats features
    after the first chunk: a few percent off at d = 300, invisible at d <= 150)."""
    if d > D_MODEL and interpreted(backend):
        pytest.skip("d = 900 already spans 57 interpreter chunks; d = 4870 would take half a minute")
    device = device_for(backend)
    g, xhat = poisoned(d, device), poisoned(d, device)
    ranges = torch.tensor(SPANS)
    assert_close(vk.bias_sq_norms(g, ranges, backend=backend), naive.bias(g.cpu(), SPANS))
    got = vk.norm_weight_sq_norms(g, xhat, ranges, backend=backend)
    assert_close(got, naive.norm_weight(g.cpu(), xhat.cpu(), SPANS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_and_tied_cross_term_at_real_widths(backend):
    """Guards the embedding kernel's segment sums and the tied head rows' gather over a wide model dim
    and a wide vocabulary (the cross term is compared with the size of its parts, as it may cancel)."""
    device = device_for(backend)
    ids = torch.randint(0, 4, (len(SPANS), LENGTH))
    ids[0, 4] = VOCAB - 1  # a last-column vocabulary row
    ids = ids.to(device)
    g_emb, h, g_head = poisoned(D_MODEL, device), poisoned(D_MODEL, device), poisoned(VOCAB, device)
    ranges = torch.tensor(SPANS)
    got = vk.embedding_sq_norms(ids, g_emb, ranges, padding_idx=1, backend=backend)
    assert_close(got, naive.embedding(ids.cpu(), g_emb.cpu(), SPANS, VOCAB, padding_idx=1))
    cross = vk.tied_cross_term(ids, g_emb, h, g_head, ranges, padding_idx=1, backend=backend).cpu().double()
    want = naive.tied_cross(ids.cpu(), g_emb.cpu(), h.cpu(), g_head.cpu(), SPANS, padding_idx=1)
    parts = (naive.linear(h.cpu(), g_head.cpu(), SPANS) * naive.embedding(ids.cpu(), g_emb.cpu(), SPANS, VOCAB)).sqrt()
    assert torch.isfinite(cross).all()
    assert ((cross - want).abs() <= RTOL * (want.abs() + 2 * parts)).all(), (cross, want)
