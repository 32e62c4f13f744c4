"""The triton backend's kernels against the torch backend, on small awkward shapes chosen around the
interpreter's 16-wide blocks (T = 1, T = 16 / 17 / 33, d = 3 or d spanning several feature chunks, a
sample that is all padding, NaN in padding, strided and broadcast views), plus the things
tests/test_ops.py cannot see: the ghost kernel's tile-pair numbering, its workspace size, the direct
kernel's split over rows, and how the backend declines what it cannot run.

Runs on the CPU under TRITON_INTERPRET=1 (as `make test` does) and on a CUDA GPU; skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import naive
import pytest
import torch
from conftest import device_for

import vigor_kernels as vk

ROOT = Path(__file__).resolve().parent.parent
status = vk.available_backends()["triton"]
pytestmark = pytest.mark.skipif(not status.available, reason=str(status))
if status.available:
    from vigor_kernels.triton_backend import _runtime, linear_direct, linear_ghost
    from vigor_kernels.triton_backend import embedding as triton_embedding

DEVICE = device_for("triton")
RTOL = 1e-4


def rand(*shape, dtype=torch.float32, spans=None):
    """Random values rounded to dtype, NaN outside ``spans`` (rows [s, e) of each sample)."""
    t = torch.randn(*shape).to(dtype)
    if spans is not None:
        for b, (s, e) in enumerate(spans):
            t[b, :s] = float("nan")
            t[b, e:] = float("nan")
    return t.to(DEVICE)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    got, want = got.cpu().double(), want.cpu().double()
    assert torch.isfinite(got).all(), got
    scale = float(want.abs().max().clamp_min(1e-30))
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale * 1e-3)


# spans around the 16-row tiles: empty, T = 1, exactly one tile, one row over, starts off the grid
RAGGED = [(0, 0), (5, 6), (0, 16), (3, 20), (7, 40), (0, 47)]


class TestLinearGhost:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("dims", [(3, 3), (17, 40), (33, 5)], ids=str)
    def test_matches_torch_backend(self, dtype, dims):
        d_in, d_out = dims
        x = rand(len(RAGGED), 47, d_in, dtype=dtype, spans=RAGGED)
        g = rand(len(RAGGED), 47, d_out, dtype=dtype, spans=RAGGED)
        ranges = torch.tensor(RAGGED)
        got = vk.linear_weight_sq_norms(x, g, ranges, method="ghost", backend="triton")
        close(got, vk.linear_weight_sq_norms(x, g, ranges, method="ghost", backend="torch"))
        assert got[0].item() == 0.0

    def test_tile_pair_numbering_covers_each_pair_once(self):
        """The kernel's inverse of ``p = j (j + 1) / 2 + i`` at every p up to 2^20 and around 2^31."""
        import triton
        import triton.language as tl

        @triton.jit
        def decode(out_i, out_j, first, BLOCK: tl.constexpr):
            p = first + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            i, j = linear_ghost._tile_pair(p)
            tl.store(out_i + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), i)
            tl.store(out_j + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), j)

        for first, count in ((0, 1 << 20), ((1 << 31) - (1 << 16), 1 << 16)):
            out_i = torch.empty(count, dtype=torch.int64, device=DEVICE)
            out_j = torch.empty_like(out_i)
            decode[(count // 4096,)](out_i, out_j, first, BLOCK=4096)
            p = torch.arange(first, first + count, dtype=torch.int64, device=DEVICE)
            assert ((out_i >= 0) & (out_i <= out_j)).all()
            assert torch.equal(out_j * (out_j + 1) // 2 + out_i, p)

    def test_workspace_is_one_float_per_tile_pair(self, monkeypatch):
        """No [B, T, T] buffer: the only allocation is [B, pairs of the longest sample]."""
        spans = [(0, 200), (50, 60), (0, 0)]
        x, g = rand(3, 200, 3, spans=spans), rand(3, 200, 4, spans=spans)
        vk.linear_weight_sq_norms(x, g, torch.tensor(spans), method="ghost", backend="triton")  # tune on a GPU first
        sizes = []
        real_empty = torch.empty

        def spy(*shape, **kw):
            out = real_empty(*shape, **kw)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(torch, "empty", spy)
        got = vk.linear_weight_sq_norms(x, g, torch.tensor(spans), method="ghost", backend="triton")
        monkeypatch.undo()
        block = linear_ghost.choose_block_t([200, 10, 0], x.dtype, x.device)
        pairs = linear_ghost.n_pairs(-(-200 // block))
        assert max(sizes) == 3 * pairs == linear_ghost.workspace_numel([200, 10, 0], block)
        assert max(sizes) < 200 * 200
        close(got, naive.linear(x.cpu(), g.cpu(), spans))

    def test_block_choice_on_gpu_prefers_full_waves(self, monkeypatch):
        monkeypatch.setattr(_runtime, "INTERPRETING", False)
        monkeypatch.setattr(_runtime, "sm_count", lambda device: 132)
        cuda = torch.device("cuda")
        assert linear_ghost.choose_block_t([4096] * 16, torch.bfloat16, cuda) == 128
        assert linear_ghost.choose_block_t([256] * 2, torch.bfloat16, cuda) == 64
        assert linear_ghost.choose_block_t([4096] * 16, torch.float32, cuda) == 64


class TestLinearDirect:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("chunks", [1, 2, 3])
    def test_row_chunks_match_torch_backend(self, dtype, chunks):
        d_in, d_out = 19, 35  # 2 x 3 weight tiles, neither a multiple of 16
        x = rand(len(RAGGED), 47, d_in, dtype=dtype, spans=RAGGED)
        g = rand(len(RAGGED), 47, d_out, dtype=dtype, spans=RAGGED)
        ranges = vk.as_row_ranges(torch.tensor(RAGGED), len(RAGGED), 47, DEVICE)
        got = linear_direct.linear_direct(x, g, ranges, chunks=chunks)
        close(got, vk.linear_weight_sq_norms(x, g, ranges, method="direct", backend="torch"))
        assert got[0].item() == 0.0

    def test_split_is_deterministic_and_agrees_with_unsplit(self):
        x, g = rand(2, 90, 20), rand(2, 90, 9)
        ranges = vk.as_row_ranges(None, 2, 90, DEVICE)
        first = linear_direct.linear_direct(x, g, ranges, chunks=4)
        assert torch.equal(first, linear_direct.linear_direct(x, g, ranges, chunks=4))
        close(first, linear_direct.linear_direct(x, g, ranges, chunks=1))
        close(first, naive.linear(x.cpu(), g.cpu(), [(0, 90)] * 2))

    def test_chunk_heuristic(self, monkeypatch):
        monkeypatch.setattr(_runtime, "INTERPRETING", False)
        monkeypatch.setattr(_runtime, "sm_count", lambda device: 132)
        monkeypatch.setattr(linear_direct, "MIN_CHUNK_ROWS", 256)
        cuda = torch.device("cuda")
        # Qwen2.5-7B k/v projection (3584 -> 512): 112 tiles of 128 x 128; one long sample needs a split
        assert linear_direct.choose_chunks(1, 112, 4096, 128, 128, cuda) == 3
        # a full batch already fills the GPU, short samples are not worth splitting
        assert linear_direct.choose_chunks(16, 112, 4096, 128, 128, cuda) == 1
        assert linear_direct.choose_chunks(1, 112, 300, 128, 128, cuda) == 1
        # the workspace cap bounds the split
        assert linear_direct.choose_chunks(1, 2, 1 << 20, 128, 128, cuda) == 132
        assert linear_direct.choose_chunks(1, 2, 1 << 20, 4096, 4096, cuda) == 2


class TestReductions:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_bias_and_norm_weight_over_several_feature_chunks(self, dtype):
        g = rand(len(RAGGED), 47, 37, dtype=dtype, spans=RAGGED)
        xhat = rand(len(RAGGED), 47, 37, dtype=dtype, spans=RAGGED)
        ranges = torch.tensor(RAGGED)
        close(vk.bias_sq_norms(g, ranges, backend="triton"), vk.bias_sq_norms(g, ranges, backend="torch"))
        close(
            vk.norm_weight_sq_norms(g, xhat, ranges, backend="triton"),
            vk.norm_weight_sq_norms(g, xhat, ranges, backend="torch"),
        )

    def test_strided_and_broadcast_inputs(self):
        g = rand(3, 40, 50)[:, :, ::2]  # feature stride 2
        xhat = rand(1, 40, 25).expand(3, 40, 25)  # batch stride 0
        ranges = torch.tensor([(0, 40), (9, 33), (20, 20)])
        close(
            vk.norm_weight_sq_norms(g, xhat, ranges, backend="triton"),
            naive.norm_weight(g.cpu(), xhat.cpu(), ranges.tolist()),
        )


class TestEmbedding:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_long_segments_and_wide_features(self, dtype):
        """Two token ids only, so segments run past the 16-row blocks; d = 40 spans three chunks."""
        ids = torch.randint(0, 2, (len(RAGGED), 47), device=DEVICE)
        g = rand(len(RAGGED), 47, 40, dtype=dtype, spans=RAGGED)
        ranges = torch.tensor(RAGGED)
        got = vk.embedding_sq_norms(ids, g, ranges, backend="triton")
        close(got, vk.embedding_sq_norms(ids, g, ranges, backend="torch"))
        assert got[0].item() == 0.0

    def test_large_ids_padding_and_strided_gradient(self):
        vocab = 151_936
        ids = torch.randint(vocab - 5, vocab, (3, 30), device=DEVICE)
        ids[1, :] = ids[1, 0]  # one segment holding the whole sample
        g = rand(3, 30, 26)[:, :, 1::2]
        ranges = torch.tensor([(0, 30), (2, 29), (4, 4)])
        pad = int(ids[0, 3])
        got = vk.embedding_sq_norms(ids, g, ranges, padding_idx=pad, backend="triton")
        close(got, vk.embedding_sq_norms(ids, g, ranges, padding_idx=pad, backend="torch"))
        assert got[2].item() == 0.0

    def test_deterministic(self):
        ids = torch.randint(0, 5, (4, 64), device=DEVICE)
        g = rand(4, 64, 24)
        first = triton_embedding.embedding(ids, g, vk.as_row_ranges(None, 4, 64, DEVICE))
        assert torch.equal(first, triton_embedding.embedding(ids, g, vk.as_row_ranges(None, 4, 64, DEVICE)))
        close(first, naive.embedding(ids.cpu(), g.cpu(), [(0, 64)] * 4, 5))


class TestTiedHeadRows:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    def test_matches_torch_backend(self, dtype):
        vocab = 45
        ids = torch.randint(0, vocab, (len(RAGGED), 47), device=DEVICE)
        h = rand(len(RAGGED), 47, 20, dtype=dtype, spans=RAGGED)
        g_head = rand(len(RAGGED), 47, vocab, dtype=dtype, spans=RAGGED)
        ranges = torch.tensor(RAGGED)
        got = vk.tied_head_rows(ids, h, g_head, ranges, padding_idx=3, backend="triton")
        want = vk.tied_head_rows(ids, h, g_head, ranges, padding_idx=3, backend="torch")
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=RTOL, atol=RTOL * float(want.abs().max()))
        outside = ~vk.as_row_ranges(ranges, len(RAGGED), 47, DEVICE).row_mask(47) | (ids == 3)
        assert (got[outside] == 0).all()

    def test_strided_logit_gradient(self):
        """g_head as a column slice of a wider tensor (e.g. logits over a padded vocab)."""
        ids = torch.randint(0, 30, (2, 33), device=DEVICE)
        h = rand(2, 33, 17)
        g_head = rand(2, 33, 64)[:, :, :30]
        ranges = torch.tensor([(1, 33), (0, 18)])
        got = vk.tied_head_rows(ids, h, g_head, ranges, backend="triton")
        want = vk.tied_head_rows(ids, h, g_head, ranges, backend="torch")
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=RTOL, atol=RTOL * float(want.abs().max()))


class TestServing:
    def test_bf16_under_the_interpreter_is_the_exact_fp32_product(self):
        """bf16 is upcast before tl.dot under the interpreter: bitwise the fp32 result on the same values."""
        if not _runtime.INTERPRETING:
            pytest.skip("on a GPU bf16 runs natively on tensor cores")
        x, g = rand(2, 40, 20, dtype=torch.bfloat16), rand(2, 40, 9, dtype=torch.bfloat16)
        for method in ("ghost", "direct"):
            low = vk.linear_weight_sq_norms(x, g, method=method, backend="triton")
            high = vk.linear_weight_sq_norms(x.float(), g.float(), method=method, backend="triton")
            assert torch.equal(low, high), method

    def test_declines_unsupported_devices_and_dtypes(self):
        backend = vk.dispatch._load("triton")
        assert "float64" in backend.cannot_serve(DEVICE, torch.float64)
        assert "meta" in backend.cannot_serve(torch.device("meta"), torch.float32)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert backend.cannot_serve(DEVICE, dtype) is None

    def test_never_chosen_by_auto_on_the_cpu(self):
        for dtype in (torch.float32, torch.bfloat16):
            assert vk.select_backend(None, torch.device("cpu"), dtype).name != "triton"

    def test_cpu_without_the_interpreter_says_why(self):
        """A fresh process without TRITON_INTERPRET: forcing triton on CPU tensors names the variable."""
        code = (
            "import torch, vigor_kernels as vk\n"
            "try:\n"
            "    vk.bias_sq_norms(torch.zeros(1, 2, 3), backend='triton')\n"
            "except vk.BackendError as exc:\n"
            "    print(exc)\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env["CUDA_VISIBLE_DEVICES"] = ""
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert "TRITON_INTERPRET=1" in out.stdout, (out.stdout, out.stderr)

    def test_auto_uses_the_calibrated_factor(self, monkeypatch):
        backend = vk.dispatch._load("triton")
        calls = []
        monkeypatch.setattr(backend, "linear_ghost", lambda x, g, r: calls.append("ghost") or torch.zeros(1))
        monkeypatch.setattr(backend, "linear_direct", lambda x, g, r: calls.append("direct") or torch.zeros(1))
        x, g = torch.zeros(1, 32, 8, device=DEVICE), torch.zeros(1, 32, 8, device=DEVICE)
        vk.linear_weight_sq_norms(x, g, method="auto", backend="triton")  # crossover T = 8: direct
        monkeypatch.setattr(type(backend), "ghost_cost_factor", 0.1)  # crossover T = 80: ghost
        vk.linear_weight_sq_norms(x, g, method="auto", backend="triton")
        assert calls == ["direct", "ghost"]
