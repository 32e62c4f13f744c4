"""The fused LM-head ops (vigor_kernels.ops.head) on every backend that has them, against the naive float64
formulas of tests/naive.py (full logits, each sample's head gradient formed whole).

Shapes are small and ragged (an empty sample, a one-row sample, vocabularies that are not multiples of any
chunk), and the chunk budgets are shrunk so that both the one-pass path (a block's logits kept) and the
two-pass path (online logsumexp, then recomputed chunks) run with several vocabulary chunks.
"""

from __future__ import annotations

import itertools
import os

import naive
import pytest
import torch
from conftest import backends_under_test, device_for

import vigor_kernels as vk
from vigor_kernels.torch_backend import head as torch_head

HEAD_BACKENDS = [b for b in backends_under_test() if hasattr(vk.dispatch._load(b), "head_pass")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OFFSETS = [0, 5, 5, 6, 19, 30]  # samples of 5, 0, 1, 13, 11 rows
TRANSFORMS = {"plain": (1.0, None), "scaled": (0.37, None), "softcap": (1.0, 2.5), "both": (3.0, 4.0)}


def head_inputs(dtype, device, vocab=301, d=12, with_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = OFFSETS[-1]
    h = torch.randn(n, d, generator=gen).to(dtype).to(device)
    weight = (torch.randn(vocab, d, generator=gen) * 0.5).to(dtype).to(device)
    bias = (torch.randn(vocab, generator=gen) * 0.3).to(dtype).to(device) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    return h, weight, bias, targets


def unit_weights(offsets):
    counts = torch.tensor([b - a for a, b in itertools.pairwise(offsets)])
    return (1.0 / counts.clamp_min(1).float()).repeat_interleave(counts)


def assert_rel(got, want, rtol=1e-4):
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all()
    scale = float(want.abs().max().clamp_min(1e-30))
    err = float((got - want).abs().max()) / scale
    assert err <= rtol, f"max error {err:.3g} of the largest magnitude (tolerance {rtol})"


def skip_interpreted_repeats(
    backend: str, dtype: torch.dtype, transform: str, path: str, method: str = "ghost"
) -> None:
    """Under the Triton interpreter (minutes per dozen calls) run what its kernels change: fp32 and fp16
    inputs (the interpreter has no bf16 arithmetic), no transform and both transforms, bias or not, one
    weight-norm method (ghost and direct are the torch backend's GEMMs on the kernels' output)."""
    repeat = dtype == torch.bfloat16 or transform in ("scaled", "softcap") or method != "ghost" or "kept" in path
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and repeat:
        pytest.skip("covered on the interpreter by the other combinations (see skip_interpreted_repeats)")


@pytest.fixture(params=["one-pass", "two-pass", "two-pass-kept"])
def path(request, monkeypatch):
    """Small budgets: several vocabulary chunks. one-pass: one block, its logits kept (the 1/8 cap lifted);
    two-pass: blocks of a few rows of whole samples, all past the one-pass limit, logits recomputed;
    two-pass-kept: one block in two passes, its first chunks' logits kept. Checks the path taken."""
    chunk_elems, limit, min_rows = {
        "one-pass": (2000, 1 << 20, 256),
        "two-pass": (2000, 1, 4),
        "two-pass-kept": (600, 1300, 256),
    }[request.param]
    monkeypatch.setenv("VIGOR_TORCH_CHUNK_ELEMS", str(chunk_elems))
    monkeypatch.setenv("VIGOR_HEAD_BLOCK_ELEMS", str(limit))
    monkeypatch.setenv("VIGOR_HEAD_KEEP_ELEMS", str(limit))
    monkeypatch.setattr(torch_head, "MIN_BLOCK_ROWS", min_rows)
    one = request.param == "one-pass"
    if one:
        monkeypatch.setattr(torch_head, "LOGITS_FRACTION", 1)
    taken = []
    for name in ("_one_pass", "_two_pass"):
        real = getattr(torch_head, name)
        monkeypatch.setattr(torch_head, name, lambda *a, _n=name, _f=real: (taken.append(_n), _f(*a))[1])
    yield request.param
    if request.node.callspec.params.get("backend") in ("torch", "cpp"):  # both run the torch tiling
        assert taken == (["_one_pass"] if one else ["_two_pass"] * (4 if request.param == "two-pass" else 1))


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_fused_head_matches_naive(backend, dtype, transform, with_bias, method, path):
    """NLL, lse, sum of logits, dL/dh, per-sample weight/bias squared norms and the summed parameter
    gradients, all against full float64 logits of the same (dtype-rounded) inputs."""
    skip_interpreted_repeats(backend, dtype, transform, path, method)
    device = device_for(backend)
    h, weight, bias, targets = head_inputs(dtype, device, with_bias=with_bias)
    scale, softcap = TRANSFORMS[transform]
    got = vk.fused_head(
        h, weight, targets, torch.tensor(OFFSETS), bias=bias, scale=scale, softcap=softcap, grad_h=True,
        weight_norm=method, bias_norm=True, logit_sum=True, weight_grad=True, bias_grad=True, backend=backend,
    )  # fmt: skip
    b_cpu = None if bias is None else bias.cpu()
    want = naive.head(h.cpu(), weight.cpu(), b_cpu, targets.cpu(), OFFSETS, unit_weights(OFFSETS), scale, softcap)
    assert got.weight_method == method
    for name in ("nll", "lse", "logit_sum", "grad_h", "weight_sq", "weight_grad"):
        assert_rel(getattr(got, name), want[name])
    if with_bias:
        assert_rel(got.bias_sq, want["bias_sq"])
        assert_rel(got.bias_grad, want["bias_grad"])
    else:
        assert got.bias_sq is None and got.bias_grad is None
    assert float(got.nll[1]) == 0.0 and float(got.weight_sq[1]) == 0.0  # the empty sample


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transform", ["plain", "both"])
def test_tied_rows_match_naive(backend, dtype, transform, path):
    """R[b, u] = (G_b^T H_b)[ids[b, u]] for repeated ids, ids equal to targets and -1 (no row)."""
    skip_interpreted_repeats(backend, dtype, transform, path)
    device = device_for(backend)
    h, weight, bias, targets = head_inputs(dtype, device)
    scale, softcap = TRANSFORMS[transform]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, 40, (len(OFFSETS) - 1, 17), generator=gen)
    ids[3, :4] = targets[6:10].cpu()  # sample 3's own targets among its ids
    lse = vk.fused_head(h, weight, targets, OFFSETS, bias=bias, scale=scale, softcap=softcap, backend=backend).lse
    got = vk.head_tied_rows(
        h, weight, targets, lse, OFFSETS, ids.to(device), bias=bias, scale=scale, softcap=softcap, backend=backend
    )
    want = naive.head(h.cpu(), weight.cpu(), bias.cpu(), targets.cpu(), OFFSETS, unit_weights(OFFSETS), scale, softcap)
    assert got.shape == (len(OFFSETS) - 1, 17, h.shape[1]) and got.dtype == torch.float32
    assert_rel(got, naive.head_tied_rows(want["weight_grads"], ids))
    assert (got[ids < 0] == 0).all()


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_row_weights_and_auto_method(backend):
    """Arbitrary per-row weights scale G row by row; ``auto`` picks by the cost model (ghost for short
    samples of a wide head, direct for long samples of a narrow one)."""
    device = device_for(backend)
    h, weight, bias, targets = head_inputs(torch.float32, device)
    w = torch.rand(OFFSETS[-1], generator=torch.Generator().manual_seed(5)).to(device)
    got = vk.fused_head(h, weight, targets, OFFSETS, bias=bias, row_weights=w, grad_h=True, weight_norm="auto")
    want = naive.head(h.cpu(), weight.cpu(), bias.cpu(), targets.cpu(), OFFSETS, w.cpu())
    assert got.weight_method == "ghost"  # T_b <= 13 rows, V = 301
    assert_rel(got.weight_sq, want["weight_sq"])
    assert_rel(got.grad_h, want["grad_h"])
    assert_rel(got.nll, want["nll"])
    narrow = vk.fused_head(h[:, :2].contiguous(), weight[:3, :2].contiguous(), targets % 3, OFFSETS, weight_norm="auto")
    assert narrow.weight_method == "direct"  # d = 2, V = 3: G^T H is tiny


def test_two_pass_keeps_a_long_sample_whole(monkeypatch):
    """Guards the keep budget: a sample too long for one-pass blocks keeps every logits chunk of its first
    pass (no chunk recomputed, one product GEMM per chunk) when ``keep_budget`` allows, recomputes past it,
    and both give the naive numbers."""
    monkeypatch.setenv("VIGOR_TORCH_CHUNK_ELEMS", "600")
    monkeypatch.setenv("VIGOR_HEAD_BLOCK_ELEMS", "1")
    monkeypatch.setattr(torch_head, "MIN_BLOCK_ROWS", 256)  # one block of all the samples, in two passes
    h, weight, bias, targets = head_inputs(torch.float32, "cpu")
    want = naive.head(h, weight, bias, targets, OFFSETS, unit_weights(OFFSETS))
    calls = []
    real = torch_head.HeadSpec.products
    monkeypatch.setattr(torch_head.HeadSpec, "products", lambda self, *a: calls.append(a) or real(self, *a))
    counts = {}
    for name, keep in (("whole", 1 << 27), ("none", 1)):
        monkeypatch.setenv("VIGOR_HEAD_KEEP_ELEMS", str(keep))
        calls.clear()
        got = vk.fused_head(h, weight, targets, OFFSETS, bias=bias, grad_h=True, weight_norm="ghost", backend="torch")
        counts[name] = len(calls)
        assert_rel(got.weight_sq, want["weight_sq"])
        assert_rel(got.grad_h, want["grad_h"])
    chunks = -(-weight.shape[0] // (600 // OFFSETS[-1]))
    assert counts == {"whole": chunks, "none": 2 * chunks}


def test_bad_inputs_are_named():
    """Each malformed input gets a one-line VigorInputError naming it, before any work."""
    h, weight, bias, targets = head_inputs(torch.float32, "cpu")
    cases = [
        (dict(offsets=[0, 5, 29]), "offsets must be"),
        (dict(offsets=[0, 6, 5, 30]), "non-decreasing"),
        (dict(targets=targets + 1000), "targets must be token ids"),
        (dict(weight=weight.double()), "share one float dtype"),
        (dict(weight=weight[:, :5]), "width must equal"),
        (dict(bias=bias[:7]), "bias must be"),
        (dict(softcap=0.0), "softcap must be"),
        (dict(scale=float("nan")), "scale must be"),
        (dict(weight_norm="fast"), "weight_norm must be"),
        (dict(row_weights=torch.ones(3)), "row_weights must be"),
    ]
    base = dict(h=h, weight=weight, targets=targets, offsets=OFFSETS, bias=bias)
    for change, message in cases:
        kwargs = {**base, **change}
        with pytest.raises(vk.VigorInputError, match=message):
            vk.fused_head(kwargs.pop("h"), kwargs.pop("weight"), kwargs.pop("targets"), kwargs.pop("offsets"), **kwargs)


def test_backend_without_head_kernels():
    """A backend named explicitly that has no head kernel says so; ``auto`` falls back to torch."""
    h, weight, _, targets = head_inputs(torch.float32, "cpu")
    lacking = [
        n for n, s in vk.available_backends().items() if s.available and not hasattr(vk.dispatch._load(n), "head_pass")
    ]
    for name in lacking:
        if vk.dispatch._load(name).cannot_serve(h.device, h.dtype) is None:
            with pytest.raises(vk.BackendError, match="no fused LM-head kernel"):
                vk.fused_head(h, weight, targets, OFFSETS, backend=name)
    auto = vk.fused_head(h, weight, targets, OFFSETS, backend="auto")
    torch_ = vk.fused_head(h, weight, targets, OFFSETS, backend="torch")
    torch.testing.assert_close(auto.nll, torch_.nll)
