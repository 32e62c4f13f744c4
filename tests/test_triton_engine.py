"""The engine with ``backend="triton"`` against the autograd oracle, on tiny random models of every
family the engine supports (tied and untied heads, Conv1D with biases and LayerNorm, Gemma's scaled
embedding and ``1 + w`` norms), so every triton op is exercised the way a model uses it.

On the CPU under TRITON_INTERPRET=1 (as `make test` runs), on a CUDA GPU otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import device_for

import vigor
import vigor_kernels as vk
from vigor.tiny import FAMILIES, group_batch, tiny_model

status = vk.available_backends()["triton"]
pytestmark = pytest.mark.skipif(not status.available, reason=str(status))
DEVICE = device_for("triton")


def small_batch(vocab: int, seed: int, empty_completion: bool = False):
    """Two groups of two, short: the interpreter runs every kernel program in Python."""
    return group_batch(vocab, groups=2, group_size=2, prompt_lengths=(2, 6), completion_lengths=(1, 10), seed=seed,
                       empty_completion=empty_completion, device=DEVICE)  # fmt: skip


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), got
    return float(((got - want).abs() / want.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_on_triton_matches_oracle(family):
    model = tiny_model(family).to(DEVICE)
    ids, attn, loss = small_batch(model.config.vocab_size, seed=3, empty_completion=True)
    got, per_param = vigor.per_sample_grad_norms(model, ids, attn, loss, backend="triton", per_param=True)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    valid = loss.sum(1) > 0
    assert got[-1].item() == 0.0 and not valid[-1]
    assert rel_err(got[valid].cpu(), want[valid].cpu()) <= 1e-4, (got, want)
    assert per_param, "the engine reported no per-parameter norms"


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_forced_linear_method_and_env_variable(method, monkeypatch):
    monkeypatch.setenv("VIGOR_BACKEND", "triton")
    model = tiny_model("llama").to(DEVICE)
    ids, attn, loss = small_batch(64, seed=5)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, linear_method=method)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    assert rel_err(got.cpu(), want.cpu()) <= 1e-4


def test_bf16_model(monkeypatch):
    model = tiny_model("qwen2", dtype=torch.bfloat16).to(DEVICE)
    ids, attn, loss = small_batch(64, seed=6)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, backend="triton")
    reference = vigor.per_sample_grad_norms(model, ids, attn, loss, backend="torch")
    # same bf16 activations and gradients in both: only the fp32 accumulation order differs
    assert rel_err(got.cpu(), reference.cpu()) <= 1e-3
    assert rel_err(got.cpu(), vigor.oracle_grad_norms(model, ids, attn, loss).cpu()) <= 2e-2


def test_engine_check_script_on_a_tiny_model(tmp_path):
    """bench/gpu/triton_engine_check.py (the GPU suite's engine step) runs the same code on a tiny model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.gpu import triton_engine_check

    argv = ["--model", "tiny", "--device", DEVICE.type, "--group-size", "3", "--prompt", "6", "--completion", "9"]
    assert triton_engine_check.main([*argv, "--out", str(tmp_path)]) == 0
    assert "PASSED" in (tmp_path / "engine.md").read_text()
