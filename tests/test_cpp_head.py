"""The cpp backend's fused-head elementwise kernels (csrc/cpu/head.cpp through vigor_kernels/cpp_head.py)
called directly on logits chunks, against the torch reference :class:`torch_head.Elementwise` and float64
exp / tanh: transforms, bias dtypes, ragged chunk widths, targets inside and outside the chunk, a row
stride wider than the chunk, extreme logits, empty chunks, every ISA copy, thread counts, and the refusals
of vigor_kernels.compiled.marshal_logits_chunk. (tests/test_head_ops.py runs the whole op on cpp.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vigor_kernels as vk
from vigor_kernels import compiled
from vigor_kernels.torch_backend import head as torch_head

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(compiled.loaded() is None, reason=f"no compiled extension: {compiled.import_failure()}")

if compiled.loaded() is not None:
    from vigor_kernels.cpp_head import CppElementwise

TRANSFORMS = {"plain": (1.0, None), "scaled": (0.37, None), "softcap": (1.0, 2.5), "both": (3.0, 4.0)}
BIAS_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]
FP32_ULP = 2.0**-23


def chunk(n: int, c: int, seed: int, spread: float = 5.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * spread


def extreme_chunk() -> torch.Tensor:
    """Rows with huge and tiny logits: +-1e4, -1e30, the most negative float, -inf (never a whole row)."""
    z = chunk(6, 203, seed=7)
    z[0, ::3] = 1e4
    z[1] = -1e30
    z[1, 17] = 0.5
    z[2, :100] = torch.finfo(torch.float32).min
    z[3, ::2] = -torch.inf
    z[4] *= 40.0
    z[5, 5] = 88.0
    return z


def targets_for(n: int, v0: int, c: int) -> torch.Tensor:
    """Targets in the chunk (first, last, middle columns) and outside it (before v0, past its end)."""
    pool = [v0, v0 + c - 1, v0 + c // 2, v0 - 1, v0 + c, v0 + 3 * c + 11]
    return torch.tensor([pool[t % len(pool)] for t in range(n)], dtype=torch.int64)


def bias_for(c: int, dtype: torch.dtype | None) -> torch.Tensor | None:
    if dtype is None:
        return None
    return (torch.randn(c, generator=torch.Generator().manual_seed(11)) * 0.3).to(dtype)


def assert_stats_close(got, want, zscale: float) -> None:
    """Per-row (max, sum of exps, target logit, sum of z): the exps and tanh differ from torch's by an ulp
    or two, so each value within a few fp32 ulps of its magnitude (the sum of z: of the sum of |z|)."""
    m, s, zt, zsum = got
    wm, ws, wzt, wzsum = want
    assert m.dtype == torch.float32 and s.dtype == torch.float64 and zt.dtype == torch.float32
    assert torch.isfinite(s).all() and torch.isfinite(m).all()
    torch.testing.assert_close(m, wm, rtol=4 * FP32_ULP, atol=4 * FP32_ULP * zscale)
    torch.testing.assert_close(s, ws, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(zt, wzt, rtol=4 * FP32_ULP, atol=4 * FP32_ULP * zscale)
    if wzsum is None:
        assert zsum is None
    else:
        assert zsum.dtype == torch.float64
        torch.testing.assert_close(zsum, wzsum, rtol=0.0, atol=float(4 * FP32_ULP * zscale * 203 * 4))


def run_both(z, bias, scale, softcap, targets, v0, want_sum=True):
    """finish_stats then to_grad (kept chunk) and to_grad on the raw chunk, by torch and by cpp."""
    out = {}
    for name, ew in (("torch", torch_head.Elementwise()), ("cpp", CppElementwise())):
        zz = z.clone()
        stats = ew.finish_stats(zz, bias, scale, softcap, targets, v0, want_sum)
        out[name] = {"stats": stats, "finished": zz.clone()}
    ref = out["torch"]["stats"]
    lse = (ref[0].double() + ref[1].log()).float()
    w = torch.rand(z.shape[0], generator=torch.Generator().manual_seed(3)) + 0.1
    for name, ew in (("torch", torch_head.Elementwise()), ("cpp", CppElementwise())):
        g = out["torch"]["finished"].clone()
        ew.to_grad(g, lse, w, targets, v0, scale, softcap)
        raw = z.clone()
        ew.to_grad(raw, lse, w, targets, v0, scale, softcap, bias, raw=True)
        out[name].update(grad=g, raw_grad=raw)
    return out, float(w.max()) * abs(scale)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, wmax: float) -> None:
    """G within a few ulps of w * scale (its entries are w scale (p - [v = y]) slope, |p| <= 1)."""
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=4e-6 * wmax)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("bias_dtype", BIAS_DTYPES, ids=str)
def test_kernels_match_torch_reference(transform, bias_dtype):
    """A chunk of 203 columns (not a multiple of any vector width) starting at v0 = 400, targets inside and
    outside it: the finished logits, per-row stats, G of the kept chunk and G of the raw chunk."""
    scale, softcap = TRANSFORMS[transform]
    z, v0 = chunk(37, 203, seed=1), 400
    bias, targets = bias_for(203, bias_dtype), targets_for(37, v0, 203)
    out, wmax = run_both(z, bias, scale, softcap, targets, v0)
    zscale = float(out["torch"]["finished"].abs().max())
    torch.testing.assert_close(
        out["cpp"]["finished"], out["torch"]["finished"], rtol=4 * FP32_ULP, atol=4 * FP32_ULP * zscale
    )
    assert_stats_close(out["cpp"]["stats"], out["torch"]["stats"], zscale)
    assert (out["cpp"]["stats"][2][3::6] == 0).all()  # targets before the chunk
    assert_grad_close(out["cpp"]["grad"], out["torch"]["grad"], wmax)
    assert_grad_close(out["cpp"]["raw_grad"], out["torch"]["raw_grad"], wmax)
    assert not torch.equal(out["cpp"]["grad"], out["cpp"]["finished"])  # it did write


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_extreme_logits_stay_finite(transform):
    """Logits of +-1e4, -1e30, the most negative float and -inf: no NaN or inf anywhere, same values as the
    torch reference (exp of anything below -104 is 0, tanh of anything large is +-1)."""
    scale, softcap = TRANSFORMS[transform]
    z = extreme_chunk()
    targets = targets_for(z.shape[0], 0, z.shape[1])
    out, wmax = run_both(z, None, scale, softcap, targets, 0)
    finished, want = out["cpp"]["finished"], out["torch"]["finished"]
    assert torch.equal(torch.isinf(finished), torch.isinf(want))  # only scaled -inf / -max stay -inf
    both = torch.isfinite(want)
    zscale = float(want[both].abs().max())
    torch.testing.assert_close(finished[both], want[both], rtol=4 * FP32_ULP, atol=4 * FP32_ULP * zscale)
    assert_stats_close(out["cpp"]["stats"], out["torch"]["stats"], zscale)
    assert_grad_close(out["cpp"]["grad"], out["torch"]["grad"], wmax)
    assert_grad_close(out["cpp"]["raw_grad"], out["torch"]["raw_grad"], wmax)


def test_exp_and_tanh_accuracy():
    """The kernels' exp (to_grad with lse 0, w 1, no target) within 1.5 ulp of float64 exp from -110 to
    88.7 (0 below -104, subnormals right), their tanh (finish with softcap 1) within 2 ulp, both finite at
    +-inf."""
    x = torch.cat([torch.linspace(-110.0, 88.7, 400_001), torch.randn(20_000) * 1e-3, torch.tensor([-torch.inf])])
    z = x[None].clone()
    CppElementwise().to_grad(z, torch.zeros(1), torch.ones(1), torch.tensor([-1]), 0, 1.0, None)
    assert ulps(z[0], x.double().exp()) <= 1.5
    assert float(z[0, -1]) == 0.0 and float(z[0, 0]) == 0.0
    x = torch.cat([torch.linspace(-12.0, 12.0, 400_001), torch.randn(20_000) * 1e-4, torch.tensor([torch.inf])])
    z = x[None].clone()
    CppElementwise().finish_stats(z, None, 1.0, 1.0, torch.tensor([-1]), 0, False)
    assert ulps(z[0], x.double().tanh()) <= 2.0


def ulps(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest error of fp32 values against float64 ones, in fp32 ulps of the exact value (subnormal
    spacing below the normal range)."""
    ref = exact.float().abs()
    spacing = (torch.nextafter(ref, torch.tensor(torch.inf)) - ref).double().clamp_min(2.0**-149)
    return float(((got.double() - exact).abs() / spacing).max())


def test_strided_rows_are_written_in_place():
    """A column slice of a wider buffer (row stride 3c): same results as the dense chunk, the columns
    around it untouched."""
    buf = chunk(9, 3 * 70, seed=4)
    before = buf.clone()
    z = buf[:, 70:140]
    dense = z.clone()
    targets, bias = targets_for(9, 70, 70), bias_for(70, torch.float32)
    ew = CppElementwise()
    got = ew.finish_stats(z, bias, 3.0, 4.0, targets, 70, True)
    want = ew.finish_stats(dense, bias, 3.0, 4.0, targets, 70, True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(z, dense)
    lse, w = (want[0].double() + want[1].log()).float(), torch.ones(9)
    ew.to_grad(z, lse, w, targets, 70, 3.0, 4.0)
    ew.to_grad(dense, lse, w, targets, 70, 3.0, 4.0)
    assert torch.equal(z, dense)
    assert torch.equal(buf[:, :70], before[:, :70]) and torch.equal(buf[:, 140:], before[:, 140:])


def test_empty_chunks():
    """No rows: empty outputs. No columns: the identity of the chunk combination (max -inf, sums 0)."""
    ew = CppElementwise()
    m, s, zt, zsum = ew.finish_stats(torch.zeros(0, 5), None, 1.0, None, torch.zeros(0, dtype=torch.int64), 0, True)
    assert m.shape == s.shape == zt.shape == zsum.shape == (0,)
    m, s, zt, zsum = ew.finish_stats(torch.zeros(3, 0), None, 1.0, None, torch.zeros(3, dtype=torch.int64), 0, True)
    assert (m == -torch.inf).all() and (s == 0).all() and (zt == 0).all() and (zsum == 0).all()
    ew.to_grad(torch.zeros(3, 0), torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.int64), 0, 1.0, None)


def test_results_do_not_depend_on_threads():
    """Rows are split over the OpenMP threads, each computed by one thread: bitwise the same results with
    one thread and two (a chunk large enough to run in parallel)."""
    ext = compiled.loaded()
    before = ext.get_num_threads()
    z, targets = chunk(64, 4099, seed=5), targets_for(64, 0, 4099)
    results = []
    try:
        for threads in (1, 2):
            ext.set_num_threads(threads)
            zz = z.clone()
            stats = CppElementwise().finish_stats(zz, None, 1.0, 30.0, targets, 0, True)
            lse = (stats[0].double() + stats[1].log()).float()
            CppElementwise().to_grad(zz, lse, torch.ones(64), targets, 0, 1.0, 30.0)
            results.append((*stats, zz))
    finally:
        ext.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_bad_chunks_are_refused():
    """compiled.marshal_logits_chunk refuses what the C++ side cannot take, with a one-line error naming it,
    before anything is written."""
    z, t = chunk(4, 32, seed=6), torch.arange(4)
    ew = CppElementwise()
    cases = [
        (lambda: ew.finish_stats(z.double(), None, 1.0, None, t, 0, False), "2-D float32"),
        (lambda: ew.finish_stats(z.clone().requires_grad_(), None, 1.0, None, t, 0, False), "requires grad"),
        (lambda: ew.finish_stats(z[None], None, 1.0, None, t, 0, False), "2-D float32"),
        (lambda: ew.finish_stats(z.T, None, 1.0, None, torch.arange(32), 0, False), "unit column stride"),
        (lambda: ew.finish_stats(z[:, ::2], None, 1.0, None, t, 0, False), "unit column stride"),
        (lambda: ew.finish_stats(z.as_strided((4, 32), (8, 1)), None, 1.0, None, t, 0, False), "must not overlap"),
        (lambda: ew.finish_stats(z, torch.zeros(32, dtype=torch.float64), 1.0, None, t, 0, False), "bias dtype"),
        (lambda: ew.finish_stats(z, torch.zeros(31), 1.0, None, t, 0, False), "bias chunk must be"),
        (lambda: ew.finish_stats(z, None, 1.0, None, t.float(), 0, False), "targets must be integer"),
        (lambda: ew.finish_stats(z, None, 1.0, None, t[:3], 0, False), r"targets must be a \[4\]"),
        (lambda: ew.finish_stats(z, None, 0.0, None, t, 0, False), "scale must be"),
        (lambda: ew.finish_stats(z, None, 1.0, -1.0, t, 0, False), "softcap must be"),
        (lambda: ew.to_grad(z, torch.zeros(3), torch.ones(4), t, 0, 1.0, None), r"lse must be a \[4\]"),
        (lambda: ew.to_grad(z, torch.zeros(4), torch.ones(4, dtype=torch.int64), t, 0, 1.0, None), "must be float"),
    ]
    before = z.clone()
    for call, message in cases:
        with pytest.raises(vk.VigorInputError, match=message):
            call()
    assert torch.equal(z, before)


ISA_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from vigor_kernels import _C
    from vigor_kernels.cpp_head import CppElementwise
    from vigor_kernels.torch_backend.head import Elementwise
    torch.manual_seed(0)
    z, bias = torch.randn(9, 203) * 5, torch.randn(203).bfloat16()
    t, w = torch.tensor([0, 202, 7, -1, 500, 3, 100, 201, 9]), torch.rand(9)
    out = {"isa": _C.build_info()["cpu_isa"]}
    for name, ew in (("torch", Elementwise()), ("cpp", CppElementwise())):
        zz = z.clone()
        m, s, zt, zsum = ew.finish_stats(zz, bias, 3.0, 4.0, t, 0, True)
        lse = (m.double() + s.log()).float()
        raw = z.clone()
        ew.to_grad(raw, lse, w, t, 0, 3.0, 4.0, bias, raw=True)
        out[name] = [m.tolist(), s.tolist(), zt.tolist(), zsum.tolist(), zz.flatten().tolist(), raw.flatten().tolist()]
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
def test_every_isa_copy_matches(isa):
    """$VIGOR_CPU_ISA forces each compiled copy this CPU runs: every one matches the torch reference."""
    levels = compiled.loaded().build_info()["cpu_isa_levels"].split(",")
    if isa not in levels:
        pytest.skip(f"{isa} not compiled in or not supported here ({levels})")
    env = {**os.environ, "VIGOR_CPU_ISA": isa, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["isa"] == isa
    got, want = ([torch.tensor(v, dtype=torch.float64) for v in out[k]] for k in ("cpp", "torch"))
    names = ("max", "sum_exp", "target", "sum_z", "finished", "raw_grad")
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5 * float(b.abs().max()), msg=f"{isa} {name}")


@pytest.mark.parametrize("kind", ["qwen2", "gemma2-softcap"])
def test_engine_fused_head_runs_on_cpp_kernels(kind, monkeypatch):
    """The engine with ``backend="cpp"`` and the fused head scores the head with the cpp kernels (counted),
    not torch's elementwise fallback, and matches the per-completion oracle (fp32 1e-4): tied weight
    (qwen2) and final-logit soft-capping (gemma2)."""
    from test_fused_head import RTOL, build, rel_err

    import vigor
    from vigor.tiny import group_batch
    from vigor_kernels import cpp_head

    calls = []
    real = cpp_head.CppElementwise.finish_stats
    monkeypatch.setattr(cpp_head.CppElementwise, "finish_stats", lambda self, *a: (calls.append(1), real(self, *a))[1])
    model = build(kind)
    ids, attn, loss = group_batch(model.config.vocab_size, seed=3)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, head="fused", backend="cpp", self_check="off")
    assert vigor.head_scoring.LAST_HEAD.fused and calls
    assert rel_err(got, vigor.oracle_grad_norms(model, ids, attn, loss)) <= RTOL
