"""The engine against the oracle (and the oracle against the official computation) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vigor
import vigor.rules
from vigor.tiny import FAMILIES, group_batch, tiny_model

FP32_RTOL = 1e-4
BF16_RTOL = 2e-2  # stated bf16 tolerance: batched vs single-row bf16 GEMMs round differently


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), got
    return float(((got - want).abs() / want.abs().clamp_min(1e-12)).max())


def assert_matches_oracle(model, ids, attn, loss, rtol=FP32_RTOL, **kw):
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, **kw)
    want = vigor.oracle_grad_norms(model, ids, attn, loss, params=kw.get("params"))
    assert got.dtype == torch.float32 and got.shape == (ids.shape[0],)
    valid = loss.sum(1) > 0
    assert (want[valid] > 0).all(), "a valid completion must have a non-zero gradient"
    assert (got[~valid] == 0).all() and (want[~valid] == 0).all()
    assert rel_err(got[valid], want[valid]) <= rtol, (got, want)
    return got, want


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_oracle_fp32(family):
    model = tiny_model(family)
    ids, attn, loss = group_batch(model.config.vocab_size, groups=2, group_size=3, seed=1, empty_completion=True)
    assert_matches_oracle(model, ids, attn, loss)


def test_default_sdpa_attention_and_ragged_batch():
    from transformers import AutoModelForCausalLM

    from vigor.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2"))  # default attention implementation
    ids, attn, loss = group_batch(64, groups=3, group_size=2, prompt_lengths=(1, 9), completion_lengths=(1, 15), seed=4)
    assert (attn[:, 0] == 0).any() and (attn[:, -1] == 0).any(), "batch must be left- and right-padded"
    assert_matches_oracle(model, ids, attn, loss)


def test_left_padding_is_skipped_without_a_second_pass():
    """Guards the row ranges against the safety net hiding their bugs: in an attention model left padding
    carries no gradient, so the skipped rows check clean and the batch is scored in one forward. Ranges
    that also skipped a real row (the prompt's first token) would still give the right norms, but only
    through the second pass over all rows that the check triggers, at twice the cost."""
    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64, groups=3, group_size=2, prompt_lengths=(1, 9), completion_lengths=(1, 4), seed=4)
    assert (attn[:, 0] == 0).any(), "batch must be left-padded"
    passes = []
    handle = model.register_forward_pre_hook(lambda m, a: passes.append(1))
    try:
        got = vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="off")
    finally:
        handle.remove()
    assert len(passes) == 1
    torch.testing.assert_close(got, vigor.oracle_grad_norms(model, ids, attn, loss), rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_forced_linear_method(method):
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64, seed=2)
    assert_matches_oracle(model, ids, attn, loss, linear_method=method)


def test_tied_cross_term_is_included():
    """Dropping the cross term of the tied embedding/head weight must be caught by the oracle comparison."""
    model = tiny_model("qwen2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, attn, loss = group_batch(64, seed=3)
    _, per_param = vigor.per_sample_grad_norms(model, ids, attn, loss, per_param=True)
    _, want = vigor.oracle_grad_norms(model, ids, attn, loss, per_param=True)
    name = "model.embed_tokens.weight"
    assert rel_err(per_param[name], want[name]) <= FP32_RTOL
    untied = tiny_model("qwen2-untied")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    # untied, the head and the embedding are two parameters, each without a cross term
    _, per_param = vigor.per_sample_grad_norms(untied, ids, attn, loss, per_param=True)
    _, want = vigor.oracle_grad_norms(untied, ids, attn, loss, per_param=True)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert rel_err(per_param[name], want[name]) <= FP32_RTOL, name


def test_per_param_squared_norms_add_up():
    model = tiny_model("gpt2")
    ids, attn, loss = group_batch(64, seed=5)
    norms, per_param = vigor.per_sample_grad_norms(model, ids, attn, loss, per_param=True)
    _, want = vigor.oracle_grad_norms(model, ids, attn, loss, per_param=True)
    assert set(per_param) == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(sum(per_param.values()).sqrt(), norms)
    for name, sq in per_param.items():
        scale = want[name].abs().max().clamp_min(1e-20)
        assert float((sq - want[name]).abs().max() / scale) <= 1e-4, name


def test_parameter_subset_by_name_and_by_object():
    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64, seed=6)
    names = [n for n, _ in model.named_parameters() if ".layers.1." in n or n.startswith("model.norm")]
    by_name, _ = assert_matches_oracle(model, ids, attn, loss, params=names)
    objects = [p for n, p in model.named_parameters() if n in names]
    by_object = vigor.per_sample_grad_norms(model, ids, attn, loss, params=objects)
    torch.testing.assert_close(by_name, by_object)
    full = vigor.per_sample_grad_norms(model, ids, attn, loss)
    assert (by_name < full).all()


def test_lora_adapters_only_with_dropout_in_train_mode():
    peft = pytest.importorskip("peft")
    base = tiny_model("qwen2")
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.2, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)  # B starts at zero in peft; make the adapters matter
    model.train()
    ids, attn, loss = group_batch(64, seed=7, empty_completion=True)
    got, _ = assert_matches_oracle(model, ids, attn, loss)
    assert model.training, "the model's mode must be restored"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert (got[:-1] > 0).all()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_bf16_within_tolerance_and_same_ranking(family):
    model = tiny_model(family, dtype=torch.bfloat16, hidden=64)
    group_size = 6
    ids, attn, loss = group_batch(64, groups=2, group_size=group_size, completion_lengths=(2, 24), seed=8)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    assert rel_err(got, want) <= BF16_RTOL
    separated = 0
    for g in range(2):
        sl = slice(g * group_size, (g + 1) * group_size)
        e, o = got[sl], want[sl]
        for i in range(group_size):
            for j in range(group_size):
                if o[i] > o[j] * (1 + 2 * BF16_RTOL):  # pairs the tolerance cannot blur
                    separated += 1
                    assert e[i] > e[j], (g, i, j, e, o)
        assert torch.equal(torch.argsort(e), torch.argsort(o)), (e, o)
    assert separated >= 20, "the groups must be spread enough for the ranking check to mean something"


def test_oracle_is_the_official_computation():
    """The oracle's loss is HF's own labels loss of the row, and its norm the official sqrt(sum g^2)."""
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64, group_size=2, seed=9)
    labels = torch.where(loss.bool(), ids, -100)
    official = []
    params = [p for p in model.parameters() if p.requires_grad]
    for b in range(ids.shape[0]):
        out = model(input_ids=ids[b : b + 1], attention_mask=attn[b : b + 1], labels=labels[b : b + 1])
        grads = torch.autograd.grad(out.loss, params)
        official.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float())
    torch.testing.assert_close(
        vigor.oracle_grad_norms(model, ids, attn, loss), torch.stack(official), rtol=1e-5, atol=0
    )


def test_completion_nll_matches_transformers_loss():
    model = tiny_model("qwen3")
    ids, attn, loss = group_batch(64, seed=10)
    batch = vigor.prepare_batch(model, ids, attn, loss)
    with torch.no_grad():
        ours = vigor.completion_nll(model(input_ids=ids, attention_mask=attn).logits, batch)
        for b in range(ids.shape[0]):
            labels = torch.where(loss[b : b + 1].bool(), ids[b : b + 1], -100)
            hf = model(input_ids=ids[b : b + 1], attention_mask=attn[b : b + 1], labels=labels).loss
            torch.testing.assert_close(ours[b], hf.float(), rtol=1e-5, atol=1e-6)


class LearnedScale(nn.Module):
    """A trainable module no rule knows."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return self.inner(x) * self.scale


def with_unknown_module():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.down_proj = LearnedScale(mlp.down_proj, model.config.hidden_size)
    return model


def test_unsupported_module_is_named():
    model = with_unknown_module()
    ids, attn, loss = group_batch(64, seed=11)
    with pytest.raises(vigor.UnsupportedModuleError, match=r"model\.layers\.0\.mlp\.down_proj.*LearnedScale.*scale"):
        vigor.per_sample_grad_norms(model, ids, attn, loss)


def test_fallback_covers_unknown_module_exactly():
    model = with_unknown_module()
    ids, attn, loss = group_batch(64, seed=11, empty_completion=True)
    _, per_param = vigor.per_sample_grad_norms(model, ids, attn, loss, fallback=True, per_param=True)
    _, want = vigor.oracle_grad_norms(model, ids, attn, loss, per_param=True)
    name = "model.layers.0.mlp.down_proj.scale"
    assert (want[name][:-1] > 0).all()
    assert rel_err(per_param[name][:-1], want[name][:-1]) <= FP32_RTOL
    assert_matches_oracle(model, ids, attn, loss, fallback=True)


class TestModelIsLeftAsFound:
    def snapshot(self, model):
        return (
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()],
            [(n, len(m._forward_hooks), len(m._backward_hooks)) for n, m in model.named_modules()],
            {n: p.detach().clone() for n, p in model.named_parameters()},
        )

    def mixed_state_model(self):
        model = tiny_model("qwen2")
        model.train()
        model.model.layers[0].eval()
        model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
        return model

    def assert_same(self, before, after):
        assert before[0] == after[0]
        assert before[1] == after[1]
        assert before[2] == after[2]
        for n, v in before[3].items():
            assert torch.equal(v, after[3][n]), n

    def test_after_success(self):
        model = self.mixed_state_model()
        before = self.snapshot(model)
        ids, attn, loss = group_batch(64, seed=12)
        vigor.per_sample_grad_norms(model, ids, attn, loss)
        self.assert_same(before, self.snapshot(model))
        assert all(p.grad is None for p in model.parameters())

    def test_after_exception_mid_backward(self, monkeypatch):
        model = self.mixed_state_model()
        before = self.snapshot(model)
        ids, attn, loss = group_batch(64, seed=12)
        calls = []

        def exploding(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom in the middle of the backward")
            return real(*args, **kwargs)

        real = vigor.rules.vk.linear_weight_sq_norms
        monkeypatch.setattr(vigor.rules.vk, "linear_weight_sq_norms", exploding)
        with pytest.raises(RuntimeError, match="boom"):
            vigor.per_sample_grad_norms(model, ids, attn, loss)
        assert len(calls) == 3
        self.assert_same(before, self.snapshot(model))
        monkeypatch.undo()
        assert_matches_oracle(model, ids, attn, loss)  # and it still works afterwards

    def test_oracle_leaves_no_grad(self):
        model = self.mixed_state_model()
        before = self.snapshot(model)
        ids, attn, loss = group_batch(64, seed=12)
        vigor.oracle_grad_norms(model, ids, attn, loss)
        self.assert_same(before, self.snapshot(model))


def test_works_under_no_grad_and_refuses_inference_mode():
    """Guards scoring inside a caller's no_grad block (TRL scores rewards under no_grad): the same norms as
    the oracle, not zeros or a silent skip of the backward."""
    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64, seed=13)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    with torch.no_grad():
        got = vigor.per_sample_grad_norms(model, ids, attn, loss)
    assert rel_err(got, want) <= FP32_RTOL
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        vigor.per_sample_grad_norms(model, ids, attn, loss)


def test_all_rows_without_loss_tokens_give_zeros():
    model = tiny_model("qwen2")
    ids, attn, _ = group_batch(64, seed=14)
    norms = vigor.per_sample_grad_norms(model, ids, attn, torch.zeros_like(ids))
    assert torch.equal(norms, torch.zeros(ids.shape[0]))


def test_reused_module_is_refused():
    model = tiny_model("llama")
    layers = model.model.layers
    layers[1].mlp.up_proj = layers[0].mlp.up_proj  # one module used in two places
    ids, attn, loss = group_batch(64, seed=15)
    with pytest.raises(vigor.UnsupportedModuleError, match="ran twice"):
        vigor.per_sample_grad_norms(model, ids, attn, loss)


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def batch():
    return group_batch(64, seed=16)


class TestBadInput:
    def test_mismatched_mask_shape(self, model, batch):
        ids, attn, loss = batch
        with pytest.raises(vigor.BatchError, match=r"loss_mask has shape .* but input_ids has shape"):
            vigor.per_sample_grad_norms(model, ids, attn, loss[:, :-1])

    def test_non_binary_mask(self, model, batch):
        ids, attn, loss = batch
        with pytest.raises(vigor.BatchError, match=r"attention_mask must hold only 0 and 1, found \[2\]"):
            vigor.per_sample_grad_norms(model, ids, attn * 2, loss)

    def test_float_mask(self, model, batch):
        ids, attn, loss = batch
        with pytest.raises(vigor.BatchError, match="loss_mask must be a bool or integer"):
            vigor.per_sample_grad_norms(model, ids, attn, loss.float())

    def test_float_ids(self, model, batch):
        ids, attn, loss = batch
        with pytest.raises(vigor.BatchError, match="input_ids must be an integer tensor"):
            vigor.per_sample_grad_norms(model, ids.float(), attn, loss)

    def test_ids_outside_vocab(self, model, batch):
        ids, attn, loss = batch
        with pytest.raises(vigor.BatchError, match=r"token ids in \[0, 64\)"):
            vigor.per_sample_grad_norms(model, ids + 64, attn, loss)

    def test_one_dimensional_ids(self, model, batch):
        ids, attn, loss = batch
        with pytest.raises(vigor.BatchError, match="2-D"):
            vigor.per_sample_grad_norms(model, ids[0], attn[0], loss[0])

    def test_loss_on_first_token(self, model, batch):
        ids, attn, loss = batch
        bad = loss.clone()
        bad[1, 0] = 1
        attn = attn.clone()
        attn[1, 0] = 1
        with pytest.raises(vigor.BatchError, match=r"loss_mask\[:, 0\] must be 0 \(rows \[1\]\)"):
            vigor.per_sample_grad_norms(model, ids, attn, bad)

    def test_loss_on_masked_token(self, model, batch):
        ids, attn, loss = batch
        bad = attn.clone()
        bad[2, loss[2].nonzero()[0, 0]] = 0
        with pytest.raises(vigor.BatchError, match=r"attention_mask masks out \(rows \[2\]\)"):
            vigor.per_sample_grad_norms(model, ids, bad, loss)

    def test_device_mismatch(self, model, batch):
        ids, attn, loss = batch
        with pytest.raises(vigor.BatchError, match="is on meta"):
            vigor.per_sample_grad_norms(model, ids, attn, loss.to("meta"))

    def test_unknown_param_name(self, model, batch):
        with pytest.raises(vigor.BatchError, match="no parameter named 'nope'"):
            vigor.per_sample_grad_norms(model, *batch, params=["nope"])

    def test_foreign_parameter(self, model, batch):
        with pytest.raises(vigor.BatchError, match="does not belong to the model"):
            vigor.per_sample_grad_norms(model, *batch, params=[nn.Parameter(torch.zeros(3))])

    def test_bad_linear_method(self, model, batch):
        with pytest.raises(ValueError, match="linear_method"):
            vigor.per_sample_grad_norms(model, *batch, linear_method="fastest")

    def test_unknown_backend(self, model, batch):
        with pytest.raises(vigor.rules.vk.BackendError, match="unknown backend 'nope'"):
            vigor.per_sample_grad_norms(model, *batch, backend="nope")

    def test_masked_lm_is_not_a_causal_lm(self, batch):
        from transformers import BertConfig, BertForMaskedLM

        bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
        with pytest.raises(vigor.NotACausalLMError, match="BertForMaskedLM is not a causal LM"):
            vigor.per_sample_grad_norms(bert, *batch)

    def test_backbone_without_head(self, model, batch):
        with pytest.raises(vigor.NotACausalLMError, match="Qwen2Model is not a causal LM"):
            vigor.per_sample_grad_norms(model.model, *batch)

    def test_custom_module_without_logits(self, model, batch):
        class HiddenStatesOnly(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def get_input_embeddings(self):
                return self.inner.get_input_embeddings()

            def forward(self, **kwargs):
                return self.inner.model(**kwargs)

        with pytest.raises(vigor.NotACausalLMError, match="without `logits`"):
            vigor.per_sample_grad_norms(HiddenStatesOnly(model), *batch)

    def test_not_a_module(self, batch):
        with pytest.raises(vigor.NotACausalLMError, match=r"torch\.nn\.Module"):
            vigor.per_sample_grad_norms("qwen", *batch)


def test_backend_env_variable_is_honoured(monkeypatch):
    """Guards $VIGOR_BACKEND: an unknown name is refused, and "torch" makes every op run on the torch
    backend (recorded at selection), with norms that match the oracle."""
    import vigor_kernels.ops._common as common

    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64, seed=17)
    monkeypatch.setenv("VIGOR_BACKEND", "nope")
    with pytest.raises(vigor.rules.vk.BackendError, match=r"\$VIGOR_BACKEND"):
        vigor.per_sample_grad_norms(model, ids, attn, loss)
    monkeypatch.setenv("VIGOR_BACKEND", "torch")
    chosen = []
    select = common.select_backend
    monkeypatch.setattr(common, "select_backend", lambda *a: chosen.append(select(*a).name) or select(*a))
    assert_matches_oracle(model, ids, attn, loss)
    assert chosen and set(chosen) == {"torch"}


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gpt2"])
def test_gradient_checkpointing_input_hooks(family):
    """transformers' gradient checkpointing installs enable_input_require_grads hooks that make the
    embedding output a leaf the engine did not create; every path to the loss must still be scored."""
    model = tiny_model(family)
    model.gradient_checkpointing_enable()
    model.train()
    ids, attn, loss = group_batch(64, seed=18)
    assert_matches_oracle(model, ids, attn, loss)
    assert model.training


def test_lora_with_input_require_grads_hook():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    model.enable_input_require_grads()  # a frozen embedding whose output requires grad: not our leaf
    ids, attn, loss = group_batch(64, seed=19)
    assert_matches_oracle(model, ids, attn, loss)


def test_autocast_is_switched_off_for_scoring():
    """Guards scoring inside a caller's bf16 autocast: bit for bit the fp32 result, which matches the
    oracle (a bf16 forward would be ~1e-2 off)."""
    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64, seed=20)
    want = vigor.per_sample_grad_norms(model, ids, attn, loss)
    assert rel_err(want, vigor.oracle_grad_norms(model, ids, attn, loss)) <= FP32_RTOL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vigor.per_sample_grad_norms(model, ids, attn, loss)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_invalid_rows_and_trailing_padding_are_not_run(monkeypatch):
    """Only samples with loss tokens enter the forward, cut after the last scored column."""
    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64, groups=1, group_size=4, seed=21)
    loss = loss.clone()
    loss[1] = 0  # an invalid completion
    wide = torch.cat([ids, torch.zeros(4, 5, dtype=ids.dtype)], 1)
    pad = torch.zeros(4, 5, dtype=attn.dtype)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    got = vigor.per_sample_grad_norms(
        model, wide, torch.cat([attn, pad], 1), torch.cat([loss, pad], 1), self_check="off"
    )
    last_loss = int(loss.nonzero()[:, 1].max())
    assert seen == [torch.Size([3, last_loss + 1])]
    assert got[1] == 0
    torch.testing.assert_close(got, vigor.oracle_grad_norms(model, ids, attn, loss), rtol=1e-4, atol=0)
