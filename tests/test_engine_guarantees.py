"""The engine's guarantees beyond the model corpus: the self-check, rows that carry gradient where
padding was expected, and the layout rules that attribute rows to samples (docs/engine.md)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import vigor
import vigor.oracle
import vigor_kernels as vk
from vigor.layout import MIXED, Axis, Layout, layout_of, propagate, set_layout
from vigor.rules import LinearRule, register_rule, unregister_rule
from vigor.tiny import group_batch, tiny_model


class _HalfLinearRule(LinearRule):
    """A deliberately wrong rule: a quarter of the true squared norm."""

    def sq_norms(self, module, kept, grad, ctx):
        return {k: v / 4 for k, v in super().sq_norms(module, kept, grad, ctx).items()}


def test_self_check_catches_a_broken_rule():
    """A rule that is wrong (here by a constant factor) must raise SelfCheckError naming the parameters,
    not return numbers."""
    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64)
    broken = _HalfLinearRule()
    register_rule(broken)
    try:
        with pytest.raises(vigor.SelfCheckError, match=r"_proj\.(weight|bias): engine"):
            vigor.per_sample_grad_norms(model, ids, attn, loss)
        # off: the wrong numbers come back, which is exactly what the default check prevents
        wrong = vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="off")
    finally:
        unregister_rule(broken)
    right = vigor.oracle_grad_norms(model, ids, attn, loss)
    assert not torch.allclose(wrong, right, rtol=1e-2)


@pytest.mark.parametrize(("mode", "calls"), [("first", 1), ("always", 2), ("off", 0)])
def test_self_check_modes(monkeypatch, mode, calls):
    """first: once per (model, theta, dtype, backend); always: every call; off: never."""
    seen = []
    real = vigor.oracle.oracle_grad_norms

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vigor.oracle, "oracle_grad_norms", counting)
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64)
    for _ in range(2):
        vigor.per_sample_grad_norms(model, ids, attn, loss, self_check=mode)
    assert len(seen) == calls
    assert vigor.engine.LAST_SELF_CHECK is None or vigor.engine.LAST_SELF_CHECK.max_rel_err < 1e-3


def test_self_check_environment_variable(monkeypatch):
    monkeypatch.setenv("VIGOR_SELF_CHECK", "sometimes")
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64)
    with pytest.raises(ValueError, match="VIGOR_SELF_CHECK"):
        vigor.per_sample_grad_norms(model, ids, attn, loss)


def test_self_check_is_recorded_per_theta(monkeypatch):
    """A new theta on the same model is checked again (its rules are different)."""
    seen = []
    real = vigor.oracle.oracle_grad_norms
    monkeypatch.setattr(vigor.oracle, "oracle_grad_norms", lambda *a, **k: seen.append(1) or real(*a, **k))
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64)
    vigor.per_sample_grad_norms(model, ids, attn, loss)
    vigor.per_sample_grad_norms(model, ids, attn, loss, params=["lm_head.weight"])
    vigor.per_sample_grad_norms(model, ids, attn, loss, params=["lm_head.weight"])
    assert len(seen) == 2


class _Causal(nn.Module):
    """embedding -> a linear layer -> a running sum over positions (no attention mask: left padding
    feeds every later token) -> head. Minimal config so vigor accepts it as a causal LM."""

    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.config = tf.PretrainedConfig()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def get_input_embeddings(self):
        return self.emb

    def can_generate(self):
        return True

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.head(torch.cumsum(self.mix(self.emb(input_ids)), 1))


def test_left_padding_that_carries_gradient_is_scored_exactly():
    """Rows before the first attended token are skipped only if the backward shows no gradient there;
    here padding feeds later tokens, so skipping them would be wrong (the engine must rescore)."""
    torch.manual_seed(0)
    model = _Causal().eval()
    ids, attn, loss = group_batch(32, groups=2, group_size=3, prompt_lengths=(1, 6))
    assert (attn[:, 0] == 0).any(), "the batch must have left padding"
    got = vigor.per_sample_grad_norms(model, ids, attn, loss)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_non_finite_norms_are_an_error():
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="off")


# ---- layout rules ---------------------------------------------------------------------------------------


def _labelled(shape, batch=None, token=None):
    t = torch.randn(shape)
    set_layout(t, Layout(batch or Axis(0), token))
    return t


def test_merging_samples_with_heads_and_back():
    """[B, L, H*D] -> [B*H, L, D] (Bloom) -> [B, H, L, D]: the sample axis survives both reshapes."""
    heads = _labelled((3, 5, 2, 4)).transpose(1, 2)
    set_layout(heads, Layout(Axis(0)))
    merged = heads.reshape(6, 5, 4)
    lay = propagate(torch.Tensor.reshape, (heads, 6, 5, 4), {}, merged)
    assert lay.batch == Axis(0, inner=2)
    set_layout(merged, lay)
    back = merged.view(3, 2, 5, 4)
    assert propagate(torch.Tensor.view, (merged, 3, 2, 5, 4), {}, back).batch == Axis(0)


def test_flattened_tokens_keep_their_samples():
    x = _labelled((3, 5, 8))
    flat = x.reshape(15, 8)
    assert propagate(torch.Tensor.reshape, (x, 15, 8), {}, flat).batch == Axis(0, inner=5)


def test_sequence_first_layout_when_batch_equals_length():
    """B == L: a transpose moves the sample axis; nothing is guessed from sizes."""
    x = _labelled((4, 4, 8), token=Axis(1))
    t = x.transpose(0, 1)
    lay = propagate(torch.Tensor.transpose, (x, 0, 1), {}, t)
    assert lay.batch == Axis(1) and lay.token == Axis(0)


def test_contracting_the_sample_axis_mixes_samples():
    x = _labelled((4, 3, 8)).requires_grad_(True)
    w = torch.randn(5, 4)
    out = torch.einsum("bld,kb->kld", x, w)
    assert propagate(torch.einsum, ("bld,kb->kld", x, w), {}, out).batch is MIXED
    total = x.sum(0)
    assert propagate(torch.Tensor.sum, (x, 0), {}, total).batch is MIXED
    per_row = x.sum(-1)
    assert propagate(torch.Tensor.sum, (x, -1), {}, per_row).batch == Axis(0)


def test_gathered_rows_are_not_attributed():
    """Rows picked by a tensor index along the sample axis (MoE dispatch) carry no sample attribution."""
    x = _labelled((12, 8), batch=Axis(0, inner=3)).requires_grad_(True)
    idx = torch.randperm(12)
    assert propagate(torch.Tensor.__getitem__, (x, idx), {}, x[idx]).batch is MIXED
    assert layout_of(torch.zeros(3)).batch is None


def test_backend_env_is_used(monkeypatch):
    """VIGOR_BACKEND reaches the ops: the torch backend's functions are the ones called."""
    calls = []
    torch_backend = vk.dispatch.select_backend("torch", torch.device("cpu"), torch.float32)
    real = torch_backend.linear_ghost

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "linear_ghost", spy)
    monkeypatch.setenv("VIGOR_BACKEND", "torch")
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64)
    vigor.per_sample_grad_norms(model, ids, attn, loss, linear_method="ghost", self_check="off")
    assert calls
