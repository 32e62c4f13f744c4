"""vigor.fused_head at model level: the fused LM head against autograd on the same tiny models.

For each family (tied and untied heads, a head with a bias, Gemma2 soft-capping, Cohere and Granite logit
scaling) the fused path must give the model's own per-sample NLL, the same gradients for every backbone
parameter, and, for the head's parameters alone, the per-sample squared norms and tied-embedding rows of
per-completion autograd. Also: what it refuses, bf16 ranking, self-certainty without logits, and no
tensor of more than ``N x V / 8`` elements at a 32k vocabulary.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vigor
from vigor.batch import completion_nll, model_logits, prepare_batch
from vigor.fused_head import FusedHead, why_not_fused
from vigor.model_state import preserved
from vigor.rewards import self_certainty, self_certainty_scores
from vigor.tiny import FAMILIES, group_batch, random_model, tiny_config, tiny_model

RTOL = 1e-4


def extra_config(kind: str):
    """Tiny configs of the families whose logits are transformed after the head, and a biased head."""
    import transformers as tf

    small = dict(
        vocab_size=64, hidden_size=32, intermediate_size=50, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    if kind == "gemma2-softcap":
        return tf.Gemma2Config(**small, head_dim=8, final_logit_softcapping=1.5, attn_logit_softcapping=None)
    if kind == "cohere":
        return tf.CohereConfig(**small, logit_scale=0.5)
    if kind == "granite":
        return tf.GraniteConfig(**small, logits_scaling=4.0)
    raise ValueError(kind)


def build(kind: str, dtype=torch.float32) -> nn.Module:
    if kind in FAMILIES:
        model = tiny_model(kind, dtype=dtype)
    elif kind == "llama-bias":
        model = tiny_model("llama", dtype=dtype)
        head = model.lm_head
        head.bias = nn.Parameter(torch.randn(head.out_features, dtype=dtype) * 0.5)
    else:
        model = random_model(extra_config(kind), dtype=dtype)
    # larger head weights than the init, so that the head's norms are not all alike
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


KINDS = [*FAMILIES, "llama-bias", "gemma2-softcap", "cohere", "granite"]


def is_tied(model: nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def untied_twin(model: nn.Module) -> nn.Module:
    """The same function with the head's weight a separate parameter: its autograd gradient is the head's
    own use only."""
    twin = copy.deepcopy(model)
    head = twin.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    twin.config.tie_word_embeddings = False
    return twin


def autograd_head_grads(model: nn.Module, batch) -> list[torch.Tensor]:
    """Per-completion ``dL_b / dW_head`` (and bias) by autograd on the untied twin, float64."""
    twin = untied_twin(model)
    head = twin.get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    out = []
    for b in range(batch.size):
        row = batch.row(b)
        if int(row.token_counts[0]) == 0:
            out.append([torch.zeros_like(p, dtype=torch.float64) for p in params])
            continue
        with torch.enable_grad():
            loss = completion_nll(model_logits(twin, row), row)[0]
            out.append([g.double() for g in torch.autograd.grad(loss, params)])
    return out


def fused_head_pass(model: nn.Module, batch, *, tied: bool, method: str = "auto"):
    """The fused head's NLL and, after a backward, its per-sample head quantities (parameters frozen,
    as the engine runs it)."""
    head = FusedHead.detect(model)
    assert head is not None, why_not_fused(model)
    with preserved(model), torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        tied_ids = head.embedding_ids(batch) if tied else None
        losses, result = head.completion_nll(
            model, batch, want_weight=True, want_bias=True, tied_ids=tied_ids, method=method
        )
        losses.sum().backward()
    return losses.detach(), result


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def batch_for(model: nn.Module, seed: int = 0, **kw):
    ids, attn, loss = group_batch(model.config.vocab_size, seed=seed, empty_completion=True, **kw)
    return prepare_batch(model, ids, attn, loss)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_head_norms_match_autograd(kind, method):
    """Per-sample head weight (and bias) squared norms and tied rows equal per-completion autograd of the
    head's own use, fp32 within 1e-4; the NLL is the model's own."""
    model = build(kind)
    batch = batch_for(model)
    losses, result = fused_head_pass(model, batch, tied=True, method=method)
    torch.testing.assert_close(losses, completion_nll(model_logits(model, batch), batch), rtol=1e-5, atol=1e-6)
    grads = autograd_head_grads(model, batch)
    want_w = torch.stack([g[0].square().sum() for g in grads])
    assert result.weight_method == method
    assert rel_err(result.sq_norms["weight"], want_w) <= RTOL
    assert float(result.sq_norms["weight"][-1]) == 0.0  # the empty completion
    if model.get_output_embeddings().bias is not None:
        assert rel_err(result.sq_norms["bias"], torch.stack([g[1].square().sum() for g in grads])) <= RTOL
    else:
        assert "bias" not in result.sq_norms
    ids = FusedHead.detect(model).embedding_ids(batch)
    want_rows = torch.zeros(*ids.shape, model.config.hidden_size, dtype=torch.float64)
    for b in range(batch.size):
        live = ids[b] >= 0
        want_rows[b, live] = grads[b][0][ids[b, live]]
    assert rel_err(result.tied_rows, want_rows) <= RTOL


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-untied", "gpt2", "llama-bias", "gemma2-softcap"])
def test_backbone_and_parameter_gradients_match(kind):
    """dL/dh continues the backward exactly: every parameter's summed gradient (head included, tied or
    not, through the backward's second pass) equals autograd through the model's own logits."""
    model = build(kind)
    batch = batch_for(model, seed=1)
    weights = torch.linspace(0.5, 2.0, batch.size)  # a non-uniform upstream gradient per sample
    params = [p for p in model.parameters()]
    with torch.enable_grad():
        want = torch.autograd.grad((completion_nll(model_logits(model, batch), batch) * weights).sum(), params)
        losses, _ = FusedHead.detect(model).completion_nll(model, batch)
        got = torch.autograd.grad((losses * weights).sum(), params)
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        assert rel_err(g, w) <= RTOL, name


def test_theta_without_head_lora():
    """With peft LoRA (theta = adapters, head frozen) only dL/dh is needed: the adapters' gradients match
    autograd, and a LoRA-wrapped head is refused by name."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = batch_for(model)
    head = FusedHead.detect(model)
    assert head is not None, why_not_fused(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        want = torch.autograd.grad(completion_nll(model_logits(model, batch), batch).sum(), params)
        losses, result = head.completion_nll(model, batch)
        got = torch.autograd.grad(losses.sum(), params)
    assert not result.ready  # nothing asked of the head
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= RTOL
    wrapped = peft.get_peft_model(build("qwen2-untied"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    assert FusedHead.detect(wrapped) is None
    assert "not an nn.Linear" in why_not_fused(wrapped)


def test_unknown_heads_are_refused():
    """A custom head module, and a logit transform the module would apply but the model does not (or the
    reverse), are refused with the reason; never a silently different NLL."""
    custom = build("qwen2-untied")
    custom.lm_head = nn.Sequential(custom.lm_head)
    assert FusedHead.detect(custom) is None and "not an nn.Linear" in why_not_fused(custom)
    lying = build("qwen2")
    lying.config.final_logit_softcapping = 2.0  # Qwen2 ignores it: fusing with it would be wrong
    assert FusedHead.detect(lying) is None and "differs from the model's logits" in why_not_fused(lying)
    hooked = build("qwen2")
    hooked.lm_head.register_forward_hook(lambda m, a, out: out * 2)
    assert FusedHead.detect(hooked) is None and "hooks" in why_not_fused(hooked)
    fine = build("qwen2")
    assert FusedHead.detect(fine) is not None and why_not_fused(fine) is None


def test_detect_checks_once_per_head():
    """The numerical check runs the model the first time only, and again when the head's dtype changes."""
    model = build("qwen2")
    runs = []
    model.register_forward_pre_hook(lambda *a: runs.append(1))
    assert FusedHead.detect(model) is not None and len(runs) == 1
    assert FusedHead.detect(model) is not None and len(runs) == 1
    model.to(torch.float64)
    assert FusedHead.detect(model) is not None and len(runs) == 2


def test_bf16_ranking():
    """bf16 model: the fused head's per-sample weight norms within 2e-2 of the fp32 oracle's, and the same
    ranking inside each group."""
    model32 = build("qwen2-untied")
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    ids, attn, loss = group_batch(64, groups=2, group_size=4, completion_lengths=(4, 20), seed=4)
    want = vigor.oracle_grad_norms(model32, ids, attn, loss, params=["lm_head.weight"], per_param=True)[1]
    want = want["lm_head.weight"]
    _, result = fused_head_pass(model16, prepare_batch(model16, ids, attn, loss), tied=False)
    got = result.sq_norms["weight"]
    assert rel_err(got, want) <= 2e-2
    assert torch.equal(got.reshape(2, 4).argsort(1), want.reshape(2, 4).argsort(1))


@pytest.mark.parametrize("kind", ["qwen2", "gemma2-softcap", "cohere"])
def test_self_certainty_without_logits(kind, monkeypatch):
    """SC_b from hidden states equals the logits formula; self_certainty_scores takes the fused path when
    the head is fusable (the logits path is then never called) and the logits path when it is not."""
    model = build(kind)
    batch = batch_for(model)
    with torch.no_grad():
        b_idx, rows, _ = vigor.batch.scored_logits(model_logits(model, batch), batch)
        per_token = self_certainty(rows)
    want = torch.zeros(batch.size).index_add(0, b_idx, per_token) / batch.token_counts.clamp_min(1)
    got = FusedHead.detect(model).self_certainty(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls = []
    monkeypatch.setattr(vigor.rewards, "model_logits", lambda *a: (calls.append(1), model_logits(*a))[1])
    scores, valid = self_certainty_scores(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert valid.tolist() == (batch.token_counts > 0).tolist() and not calls
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda *a: None)  # makes it unfusable
    try:
        scores, _ = self_certainty_scores(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    finally:
        handle.remove()
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert calls


class _LargestAllocation(TorchDispatchMode):
    """Records the element count of every new tensor any op returns (forward and backward); views of an
    input (a transposed weight, a slice) are not allocations and are not counted."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            fresh = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen
            if fresh and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def test_no_tensor_of_logits_size():
    """At V = 32768 nothing the fused path allocates (backbone, head, backward, norms, tied rows) exceeds
    ``N x V / 8`` elements, N the scored tokens; the materialized path does (so the check can fail)."""
    vocab = 32768
    model = random_model(tiny_config("qwen2", vocab=vocab, hidden=16, layers=1, heads=2))
    ids, attn, loss = group_batch(vocab, groups=2, group_size=4, completion_lengths=(6, 20), seed=2)
    batch = prepare_batch(model, ids, attn, loss)
    bound = int(batch.token_counts.sum()) * vocab // 8
    with _LargestAllocation() as fused:
        _, result = fused_head_pass(model, batch, tied=True)
    print(f"largest fused allocation: {fused.largest} elements ({fused.op}); N V / 8 = {bound}")
    assert result.sq_norms["weight"].shape == (batch.size,)
    assert fused.largest <= bound, f"{fused.op} returned {fused.largest} elements > N V / 8 = {bound}"
    with _LargestAllocation() as materialized, torch.no_grad():
        completion_nll(model_logits(model, batch), batch)
    assert materialized.largest > bound


@pytest.mark.parametrize("family", ["qwen2", "qwen2-untied"])
def test_engine_allocates_no_logits_sized_tensor(family):
    """per_sample_grad_norms with the fused head at V = 32768 (detection, backbone forward, hooks, fused head,
    backward, every rule's norms, the tied cross term) allocates no tensor of more than ``N x V / 8`` elements,
    tied or not; the same call with ``head="materialized"`` does (so the check can fail), and both agree.
    The self-check is off here: it runs the oracle on one row, through the logits by design."""
    vocab = 32768
    model = random_model(tiny_config(family, vocab=vocab, hidden=16, layers=1, heads=2))
    ids, attn, loss = group_batch(vocab, groups=2, group_size=4, completion_lengths=(6, 20), seed=2)
    bound = int(loss[:, 1:].sum()) * vocab // 8
    with _LargestAllocation() as fused:
        norms = vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="off", head="fused")
    print(f"largest engine allocation: {fused.largest} elements ({fused.op}); N V / 8 = {bound}")
    assert vigor.head_scoring.LAST_HEAD.fused
    assert fused.largest <= bound, f"{fused.op} returned {fused.largest} elements > N V / 8 = {bound}"
    with _LargestAllocation() as materialized:
        want = vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="off", head="materialized")
    assert not vigor.head_scoring.LAST_HEAD.fused
    assert materialized.largest > bound
    assert rel_err(norms, want) <= RTOL


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-untied", "llama-bias", "gemma2-softcap", "cohere", "granite"])
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_engine_fused_head_matches_oracle(kind, method):
    """The engine with the fused head: every parameter's per-sample squared norm (the head's weight and bias,
    a tied weight's cross term included) within fp32 1e-4 of the per-completion oracle, with the head's norm
    method forced both ways."""
    model = build(kind)
    ids, attn, loss = group_batch(model.config.vocab_size, seed=3, empty_completion=True)
    norms, got = vigor.per_sample_grad_norms(
        model, ids, attn, loss, per_param=True, head="fused", linear_method=method, self_check="off"
    )
    assert vigor.head_scoring.LAST_HEAD.fused
    want_norms, want = vigor.oracle_grad_norms(model, ids, attn, loss, per_param=True)
    assert set(got) == set(want)
    total = max(float(v.max()) for v in want.values())
    for name, w in want.items():
        scale = max(float(w.abs().max()), 1e-10 * total)
        assert float((got[name].double() - w.double()).abs().max()) / scale <= RTOL, name
    assert rel_err(norms, want_norms) <= RTOL and float(norms[-1]) == 0.0


def test_engine_lora_and_head_only():
    """theta without the head (LoRA adapters: only dL/dh is needed) and theta = the head alone (the fused op's
    hidden rows are a leaf): both fused and equal to the oracle."""
    peft = pytest.importorskip("peft")
    ids, attn, loss = group_batch(64, seed=5)
    lora = peft.get_peft_model(build("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for model, params in ((lora, None), (build("llama-bias"), ["lm_head.weight", "lm_head.bias"])):
        got = vigor.per_sample_grad_norms(model, ids, attn, loss, params=params, head="fused", self_check="off")
        assert vigor.head_scoring.LAST_HEAD.fused
        assert rel_err(got, vigor.oracle_grad_norms(model, ids, attn, loss, params=params)) <= RTOL


def test_engine_head_choice():
    """``head="auto"`` fuses a detected head and falls back to the logits for one it cannot fuse (saying
    why), exactly either way; ``head="fused"`` refuses that head by name; a bad value is a clear error; the
    logits path is kept under the autograd fallback; the self-check passes on the fused path."""
    model = build("qwen2")
    ids, attn, loss = group_batch(64, seed=6)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="always")
    assert vigor.head_scoring.LAST_HEAD.fused and vigor.engine.LAST_SELF_CHECK.max_rel_err <= 1e-3
    assert rel_err(got, want) <= RTOL
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: None)  # unfusable, same function
    try:
        got = vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="off")
        choice = vigor.head_scoring.LAST_HEAD
        assert not choice.fused and "hooks" in choice.reason
        assert rel_err(got, want) <= RTOL
        with pytest.raises(vigor.UnsupportedModuleError, match=r"cannot be fused.*hooks"):
            vigor.per_sample_grad_norms(model, ids, attn, loss, head="fused")
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="head must be one of"):
        vigor.per_sample_grad_norms(model, ids, attn, loss, head="chunked")
    top = model.register_forward_pre_hook(lambda m, a: None)  # the fused path would skip the model's forward
    try:
        vigor.per_sample_grad_norms(model, ids, attn, loss, self_check="off")
        assert "forward hooks" in vigor.head_scoring.LAST_HEAD.reason
    finally:
        top.remove()
    ruleless = copy.deepcopy(model)  # a parameter no rule covers: scored by the autograd fallback
    ruleless.model.rotary_emb.extra = nn.Parameter(torch.zeros(3))
    params = ["model.norm.weight", "model.rotary_emb.extra"]
    got = vigor.per_sample_grad_norms(ruleless, ids, attn, loss, params=params, fallback=True, self_check="off")
    assert not vigor.head_scoring.LAST_HEAD.fused and "fallback" in vigor.head_scoring.LAST_HEAD.reason
    assert rel_err(got, vigor.oracle_grad_norms(model, ids, attn, loss, params=["model.norm.weight"])) <= RTOL
    with pytest.raises(vigor.UnsupportedModuleError, match="fallback"):
        vigor.per_sample_grad_norms(ruleless, ids, attn, loss, params=params, head="fused", fallback=True)


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-untied"])
def test_engine_bf16_ranking(kind):
    """A bf16 model scored by the engine with the fused head: norms within 2e-2 of the fp32 oracle's and the
    same ranking inside each group, tied and untied."""
    model32 = build(kind)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    ids, attn, loss = group_batch(64, groups=2, group_size=4, completion_lengths=(4, 20), seed=4)
    want = vigor.oracle_grad_norms(model32, ids, attn, loss)
    got = vigor.per_sample_grad_norms(model16, ids, attn, loss, head="fused", self_check="off")
    assert vigor.head_scoring.LAST_HEAD.fused
    assert rel_err(got, want) <= 2e-2
    assert torch.equal(got.reshape(2, 4).argsort(1), want.reshape(2, 4).argsort(1))


def test_auto_keeps_a_bf16_head_on_the_logits_path():
    """Guards the default for low-precision heads: ``auto`` scores a bf16 head through the model's own
    logits (which the self-check reproduces), saying why; ``head="fused"`` still fuses it."""
    model16 = copy.deepcopy(build("qwen2")).to(torch.bfloat16)
    ids, attn, loss = group_batch(64, groups=1, group_size=4, completion_lengths=(4, 12), seed=5)
    vigor.per_sample_grad_norms(model16, ids, attn, loss, self_check="always")
    assert not vigor.head_scoring.LAST_HEAD.fused
    assert "bfloat16" in vigor.head_scoring.LAST_HEAD.reason
    vigor.per_sample_grad_norms(model16, ids, attn, loss, head="fused", self_check="off")
    assert vigor.head_scoring.LAST_HEAD.fused
