"""Mixture-of-experts layers (vigor.moe_rules) against the autograd oracle on tiny random models.

Ragged GRPO batches (left-padded prompts, right-padded completions of different lengths), fp32 within
1e-4 per parameter, for every MoE family of the pinned transformers, top-k 1 and 2, both experts
implementations, and routings forced to the corner cases (one expert takes every token; an expert a
sample never reaches).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backends_under_test, device_for

import vigor
from vigor.errors import UnsupportedModuleError
from vigor.tiny import MOE_FAMILIES, group_batch, moe_config, random_model

FP32_RTOL = 1e-4
BF16_RTOL = 2e-2  # the engine's stated bf16 tolerance (tests/test_engine.py)


def _theta(model) -> list[str]:
    # GPT-OSS's attention sinks have no rule yet (refused by name: test_gpt_oss_sinks_refused_by_name)
    return [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".sinks")]


def _model(
    family: str, *, top_k: int = 2, experts: int = 4, impl: str | None = None, seed: int = 0, dtype=torch.float32, **kw
):
    config = moe_config(family, experts=experts, top_k=top_k, **kw)
    if impl is not None:
        config._experts_implementation = impl
    model = random_model(config, seed=seed, dtype=dtype)
    with torch.no_grad():  # GPT-OSS biases and routers start at zero: make every parameter matter
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "router.bias", "router.weight", "gate.weight")):
                p.normal_(std=0.3)
    return model


def assert_exact_per_param(model, ids, attn, loss, params=None, rtol=FP32_RTOL):
    """Every parameter's per-sample squared norm, not only the total: a rule that misattributes an
    expert's rows shows up in that expert's parameters even when the total hides it."""
    params = params if params is not None else _theta(model)
    got, got_sq = vigor.per_sample_grad_norms(model, ids, attn, loss, params=params, per_param=True)
    want, want_sq = vigor.oracle_grad_norms(model, ids, attn, loss, params=params, per_param=True)
    valid = loss.sum(1) > 0
    assert (want[valid] > 0).all()
    # a parameter whose gradient is zero in exact arithmetic (Mixtral's router at top-1: its routing
    # weight is p / p = 1) holds rounding noise only: compared against the total's fp32 rounding level
    floor = 1e-6 * float(want.square().max())
    for name, w in want_sq.items():
        scale = max(float(w.abs().max()), floor)
        err = float((got_sq[name] - w).abs().max()) / scale
        assert err <= rtol, (name, got_sq[name], w)
    assert float(((got - want).abs() / want.clamp_min(1e-12))[valid].max()) <= rtol
    return got_sq, want_sq


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_exact_fp32(family, top_k):
    """Routers, fused experts (with GPT-OSS's biases, Qwen2-MoE's shared expert and its gate) and the
    rest of the model, exact on a ragged batch with an empty completion."""
    model = _model(family, top_k=top_k)
    ids, attn, loss = group_batch(64, groups=2, group_size=3, seed=3, empty_completion=True)
    got_sq, _ = assert_exact_per_param(model, ids, attn, loss)
    experts = [n for n in got_sq if n.endswith("down_proj") and ".experts." in n]
    assert experts, "the experts must be in theta"


def test_single_scored_row_exact():
    """A batch with one scored completion (the others empty) is scored as a batch of 1: the MoE block's
    ``[1, L, d] -> [L, d]`` merges the sample and token axes, which must not be taken for mixing."""
    model = _model("qwen2-moe", top_k=1)
    ids, attn, loss = group_batch(64, groups=1, group_size=2, seed=15)
    loss[1] = 0
    assert_exact_per_param(model, ids, attn, loss)


def test_eager_experts_implementation_exact():
    """The eager experts loop (gather, per-expert linear, index_add_) is covered like grouped_mm."""
    model = _model("qwen3-moe", impl="eager")
    ids, attn, loss = group_batch(64, groups=2, group_size=3, seed=4)
    assert_exact_per_param(model, ids, attn, loss)


def _force_routing(model, choose):
    """Replace each router's chosen experts with ``choose(indices)`` (a user forward hook, as a model
    could do); the weights still come from the router, so the router keeps its gradient."""

    def hook(module, args, output):
        logits, scores, indices = output
        return logits, scores, choose(indices)

    return [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith(("mlp.gate", "mlp.router"))]


@pytest.mark.parametrize("family", ["qwen3-moe", "gpt-oss"])
def test_one_expert_receives_every_token(family):
    """Expert 0 gets all B * L rows (so its rows are as many as a dense layer's), the others none."""
    model = _model(family, top_k=1)
    handles = _force_routing(model, torch.zeros_like)
    ids, attn, loss = group_batch(64, groups=2, group_size=3, seed=5)
    try:
        assert_exact_per_param(model, ids, attn, loss)
    finally:
        for h in handles:
            h.remove()


def _batched_reference(model, ids, attn, loss, params):
    """Per-sample squared norms by one ``autograd.grad`` per sample through the batched forward (the
    oracle runs each row alone, which a routing that depends on the row's place in the batch defeats)."""
    from vigor.batch import completion_nll, model_logits, prepare_batch

    rows, scored = prepare_batch(model, ids, attn, loss).scored_rows()
    assert rows == list(range(ids.shape[0]))
    named = dict(model.named_parameters())
    losses = completion_nll(model_logits(model, scored), scored)
    out = {}
    for n in params:
        out[n] = torch.zeros(len(rows))
    for b in range(len(rows)):
        grads = torch.autograd.grad(losses[b], [named[n] for n in params], retain_graph=True, allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            out[n][b] = 0.0 if g is None else float(g.double().square().sum())
    return out


def test_expert_without_tokens_of_a_sample_contributes_zero():
    """Sample 0's tokens all go to expert 0, the other samples' to experts 1-3, which get larger
    weights: a row of another sample attributed to sample 0, or sample 0 charged for experts it never
    reached, changes sample 0's norm of the fused expert parameters."""
    model = _model("mixtral", top_k=1)
    ids, attn, loss = group_batch(64, groups=2, group_size=2, seed=6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p[1:] *= 3
    seen = {}

    def choose(indices):
        forced = torch.arange(indices.shape[0]).remainder(3).add(1)[:, None].expand_as(indices).clone()
        forced[: seen["length"]] = 0  # rows of the first sample of this forward ([B * L, d], sample-major)
        return forced

    handles = _force_routing(model, choose)
    handles.append(model.model.embed_tokens.register_forward_pre_hook(lambda m, a: seen.update(length=a[0].shape[1])))
    params = _theta(model)
    try:
        _, got_sq = vigor.per_sample_grad_norms(model, ids, attn, loss, params=params, per_param=True)
        want_sq = _batched_reference(model, ids, attn, loss, params)
    finally:
        for h in handles:
            h.remove()
    # With top-1 routing the renormalized routing weight is 1 whatever the router's logits, so the router's
    # true gradient is 0 and both sides hold rounding noise (~1e-17): compared against a floor of 1e-10 of
    # the largest squared norm, as tests/corpus_reference.py does.
    floor = 1e-10 * max(float(v.max()) for v in want_sq.values())
    for name in params:
        scale = max(float(want_sq[name].max()), floor)
        assert float((got_sq[name] - want_sq[name]).abs().max()) <= FP32_RTOL * scale, name
    assert float(want_sq["model.layers.0.mlp.experts.down_proj"][0]) > 0, "sample 0 must still reach expert 0"


def test_bf16_same_ranking_within_groups():
    """bf16: within the stated tolerance of the bf16 oracle and the same order inside each group."""
    model = _model("qwen3-moe", hidden=64, dtype=torch.bfloat16)
    group_size = 5
    ids, attn, loss = group_batch(64, groups=2, group_size=group_size, completion_lengths=(2, 20), seed=8)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, params=_theta(model))
    want = vigor.oracle_grad_norms(model, ids, attn, loss, params=_theta(model))
    assert float(((got - want).abs() / want).max()) <= BF16_RTOL, (got, want)
    for g in range(2):
        sl = slice(g * group_size, (g + 1) * group_size)
        assert torch.equal(torch.argsort(got[sl]), torch.argsort(want[sl])), (got[sl], want[sl])


@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_ghost_and_direct_agree(method):
    """Both kernels on the grouped (expert, sample) rows give the exact norms."""
    model = _model("qwen2-moe")
    ids, attn, loss = group_batch(64, groups=1, group_size=3, seed=9)
    params = [n for n in _theta(model) if ".experts." in n]
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, params=params, linear_method=method)
    want = vigor.oracle_grad_norms(model, ids, attn, loss, params=params)
    assert float(((got - want).abs() / want).max()) <= FP32_RTOL


@pytest.mark.parametrize("backend", backends_under_test())
def test_every_backend_exact(backend):
    """The grouped (expert, sample) rows go through the same vigor_kernels ops on every backend
    (triton on the CPU runs in its interpreter: TRITON_INTERPRET=1)."""
    device = device_for(backend)
    model = _model("gpt-oss", top_k=2).to(device)
    ids, attn, loss = (t.to(device) for t in group_batch(64, groups=1, group_size=3, seed=14))
    params = _theta(model)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, params=params, backend=backend)
    want = vigor.oracle_grad_norms(model, ids, attn, loss, params=params)
    assert float(((got - want).abs() / want).max()) <= FP32_RTOL


def test_gpt_oss_sinks_refused_by_name():
    """GPT-OSS's attention sinks have no rule: refused naming them, exact with fallback=True."""
    model = _model("gpt-oss", layers=1)
    ids, attn, loss = group_batch(64, groups=1, group_size=2, seed=10)
    with pytest.raises(UnsupportedModuleError, match="sinks"):
        vigor.per_sample_grad_norms(model, ids, attn, loss)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, fallback=True)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    assert float(((got - want).abs() / want).max()) <= FP32_RTOL


def test_router_alone_is_refused_not_wrong():
    """Only a router in theta: nothing before it is scored, so its logits carry no gradient to observe;
    the engine refuses by name (and the fallback is exact)."""
    model = _model("qwen3-moe", layers=1)
    ids, attn, loss = group_batch(64, groups=1, group_size=2, seed=11)
    params = ["model.layers.0.mlp.gate.weight"]
    with pytest.raises(UnsupportedModuleError, match=r"mlp\.gate"):
        vigor.per_sample_grad_norms(model, ids, attn, loss, params=params)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, params=params, fallback=True)
    want = vigor.oracle_grad_norms(model, ids, attn, loss, params=params)
    assert float(((got - want).abs() / want).max()) <= FP32_RTOL


def test_changed_expert_gate_refused():
    """An experts module whose gating was replaced on the instance computes something the rule does not
    model: refused by name, never scored with the class's gate."""
    model = _model("mixtral", layers=1)
    for m in model.modules():
        if hasattr(m, "is_transposed"):
            m._apply_gate = lambda u: torch.tanh(u[..., : u.shape[-1] // 2]) * u[..., u.shape[-1] // 2 :]
    ids, attn, loss = group_batch(64, groups=1, group_size=2, seed=12)
    with pytest.raises(UnsupportedModuleError, match="_apply_gate"):
        vigor.per_sample_grad_norms(model, ids, attn, loss)


def test_lora_on_fused_experts_refused_not_wrong():
    """peft LoRA on fused expert parameters (target_parameters) folds the adapters into the experts'
    weight outside any module with a rule: refused (today naming the first layer its mixed rows reach),
    never scored; fallback=True is exact."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(_model("qwen3-moe", layers=1), config).eval()
    ids, attn, loss = group_batch(64, groups=1, group_size=2, seed=13)
    with pytest.raises(UnsupportedModuleError):
        vigor.per_sample_grad_norms(model, ids, attn, loss)
    got = vigor.per_sample_grad_norms(model, ids, attn, loss, fallback=True)
    want = vigor.oracle_grad_norms(model, ids, attn, loss)
    assert float(((got - want).abs() / want).max()) <= FP32_RTOL


def test_expert_chunks_bound_the_padding():
    """Skewed routing: the padded rows of every chunk stay within twice the routed rows (or one expert's
    own), and the chunks cover every expert once, in order, with each group's true row count."""
    from vigor.moe_rules import _Routed

    counts = [[7, 6], [1, 0], [0, 1], [2, 2], [0, 0]]  # expert 0 takes most rows
    routed = sum(map(sum, counts))
    token = torch.zeros(routed, dtype=torch.int64)
    fake = _Routed(token, token, token, torch.zeros(routed, 1), counts, batch=2)
    chunks = fake.chunks()
    # budget 2 * 19 rows: experts 0-1 padded to 7 rows per group (28 rows), a third would need 42
    assert [c.experts for c in chunks] == [(0, 2), (2, 5)]
    for c in chunks:
        lo, hi = c.experts
        assert (hi - lo) * 2 * c.width <= max(2 * routed, 2 * c.width)
        assert c.ranges.lengths() == [n for row in counts[lo:hi] for n in row]
