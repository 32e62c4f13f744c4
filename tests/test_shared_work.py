"""Work shared between layers within one scoring pass: an input's Gram formed once for the layers reading it
(vigor_kernels.input_grams), the norm's ``xhat`` read off the forward (vigor.rules), the row ranges' derived
values computed once (vigor_kernels.ranges). Each must be reused only where it is the same data."""

from __future__ import annotations

import pytest
import torch

import vigor_kernels as vk
from vigor import oracle_grad_norms, per_sample_grad_norms, rules
from vigor.tiny import group_batch, tiny_model
from vigor_kernels import cpp_backend, input_grams

CPP = vk.available_backends()["cpp"]
needs_cpp = pytest.mark.skipif(not CPP.available, reason=f"cpp backend unavailable: {CPP.reason}")


def _counting_grams(monkeypatch) -> list[torch.Tensor]:
    formed = []
    real = cpp_backend._gram
    monkeypatch.setattr(cpp_backend, "_gram", lambda rows: formed.append(rows) or real(rows))
    return formed


def _ghost(x, g, ranges):
    return vk.linear_weight_sq_norms(x, g, ranges, method="ghost", backend="cpp")


@needs_cpp
def test_an_input_gram_is_shared_only_for_the_same_unchanged_rows(monkeypatch):
    formed = _counting_grams(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(3, 9, 16)
    g1, g2 = torch.randn(3, 9, 8), torch.randn(3, 9, 5)
    ranges = vk.as_row_ranges(torch.tensor([[0, 9], [2, 7], [1, 4]]), 3, 9, torch.device("cpu"))
    alone = [_ghost(x, g1, ranges), _ghost(x, g2, ranges)]
    assert len(formed) == 4  # outside the context nothing is kept
    formed.clear()
    with vk.shared_input_grams():
        shared = [_ghost(x.detach(), g1, ranges), _ghost(x.detach(), g2, ranges)]
        assert len(formed) == 3  # one X X^T for both layers (other tensor objects, same memory)
        torch.testing.assert_close(torch.stack(shared), torch.stack(alone), rtol=0, atol=0)
        x.mul_(2)  # changed in place: its version moved on, the kept Gram is not used
        changed = _ghost(x, g1, ranges)
        assert len(formed) == 5
        torch.testing.assert_close(changed, 4 * alone[0], rtol=1e-6, atol=0)
        y = x.clone()  # equal values, other memory: formed anew
        _ghost(y, g1, ranges)
        assert len(formed) == 7
        narrower = vk.as_row_ranges(torch.tensor([[0, 5], [2, 5], [1, 4]]), 3, 9, torch.device("cpu"))
        _ghost(y, g1, narrower)  # another row window
        assert len(formed) == 9
    _ghost(y, g1, ranges)
    assert len(formed) == 11  # the context closed: nothing kept


@needs_cpp
def test_a_pass_forms_one_gram_per_distinct_input(monkeypatch):
    """qwen2: per block, q/k/v share one input and gate/up another: 7 linear layers, 4 input Grams."""
    formed = _counting_grams(monkeypatch)
    model = tiny_model("qwen2", layers=2)
    batch = group_batch(model.config.vocab_size)
    norms = per_sample_grad_norms(model, *batch, backend="cpp", self_check="off")
    assert len(formed) == model.config.num_hidden_layers * (7 + 4)  # the tied head takes the fused head's path
    torch.testing.assert_close(norms, oracle_grad_norms(model, *batch), rtol=1e-4, atol=0)


def test_input_grams_are_off_on_other_threads():
    import threading

    seen = []
    with vk.shared_input_grams():
        t = threading.Thread(target=lambda: seen.append(getattr(input_grams._state, "entry", "off")))
        t.start()
        t.join()
    assert seen == ["off"]


def _xhat_reads(monkeypatch) -> list[bool]:
    read = []
    real = rules._weight_times_operand
    monkeypatch.setattr(rules, "_weight_times_operand", lambda call: read.append((r := real(call)) is not None) or r)
    return read


@pytest.mark.parametrize(("family", "read_off"), [("llama", True), ("qwen3", True), ("gemma", False), ("gpt2", False)])
def test_norm_xhat_is_read_off_only_for_weight_times_xhat(monkeypatch, family, read_off):
    """Llama/Qwen RMSNorm return ``weight * xhat``: xhat is the product's other operand. Gemma's
    ``(1 + w) * xhat`` and LayerNorm's fused op keep the two functional calls; both give the oracle's norms."""
    read = _xhat_reads(monkeypatch)
    model = tiny_model(family)
    batch = group_batch(model.config.vocab_size)
    norms = per_sample_grad_norms(model, *batch, self_check="off")
    assert read and set(read) == {read_off}
    torch.testing.assert_close(norms, oracle_grad_norms(model, *batch), rtol=1e-4, atol=0)


class _ScaledTwice(torch.nn.Module):
    """``w * xhat`` made first, then the weight added to it in place: the product is the returned tensor,
    but the slope is ``xhat + 1``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = self.weight * xhat
        return y.add_(self.weight)


class _ScaledThenDoubled(_ScaledTwice):
    """``(w * xhat) * 2``: one use of the weight, but the product is not what it returns (slope ``2 xhat``)."""

    def forward(self, x):
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * xhat) * 2


@pytest.mark.parametrize("norm", [_ScaledTwice, _ScaledThenDoubled])
def test_norm_not_returning_weight_times_xhat_is_not_read_off(monkeypatch, norm):
    read = _xhat_reads(monkeypatch)
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.post_attention_layernorm = type("LlamaRMSNorm", (norm,), {})(model.config.hidden_size)
        with torch.no_grad():
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    batch = group_batch(model.config.vocab_size)
    norms = per_sample_grad_norms(model, *batch, self_check="off")
    assert read.count(False) == model.config.num_hidden_layers
    torch.testing.assert_close(norms, oracle_grad_norms(model, *batch), rtol=1e-4, atol=0)


def test_ranges_validate_once_and_keep_refusing():
    ranges = vk.as_row_ranges(torch.tensor([[0, 4], [1, 3]]), 2, 5, torch.device("cpu"))
    assert vk.as_row_ranges(ranges, 2, 5, torch.device("cpu")) is ranges  # the same object, with its caches
    assert ranges.window() == (0, 4) and ranges.lengths() == [4, 2]
    with pytest.raises(vk.VigorInputError, match=r"ranges\[0\] = \[0, 4\) is not inside \[0, 3\]"):
        vk.as_row_ranges(ranges, 2, 3, torch.device("cpu"))
    bad = vk.RowRanges(torch.tensor([[0, 4], [3, 1]]), ((0, 4), (3, 1)))
    with pytest.raises(vk.VigorInputError, match=r"ranges\[1\] = \[3, 1\)"):
        vk.as_row_ranges(bad, 2, 5, torch.device("cpu"))
