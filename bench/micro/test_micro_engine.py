"""pytest-benchmark timings of the whole engine against the official per-completion loop on a small
Qwen2.5-0.5B-shaped model (2 layers, vocab 4096), one ragged group of 8 (benchmarks, not pass/fail)."""

from __future__ import annotations

import pytest
import torch

import vigor
from bench.methods.official import official_loop
from bench.presets import PRESETS, ModelSpec, build_model, grpo_batch


@pytest.fixture(scope="module")
def workload():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = ModelSpec.of(PRESETS["qwen2.5-0.5b"], layers=2, vocab=4096)
    model = build_model(spec, dtype=torch.float32, device=device)
    raw = grpo_batch(spec.vocab, groups=1, group_size=8, prompt_len=16, t_max=64, device=device)
    return model, raw


def test_engine(benchmark, backend, workload):
    name, device = backend
    model, raw = workload
    if next(model.parameters()).device != device:
        pytest.skip(f"the workload lives on {next(model.parameters()).device}, backend '{name}' on {device}")
    fn = lambda: vigor.per_sample_grad_norms(model, raw.input_ids, raw.attention_mask, raw.loss_mask, backend=name)
    assert benchmark.pedantic(fn, rounds=3, warmup_rounds=1).shape == (8,)


def test_official_loop(benchmark, workload):
    model, raw = workload
    batch = vigor.prepare_batch(model, raw.input_ids, raw.attention_mask, raw.loss_mask)
    assert benchmark.pedantic(lambda: official_loop(model, batch)[0], rounds=3, warmup_rounds=1).shape == (8,)
