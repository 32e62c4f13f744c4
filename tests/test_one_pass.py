"""One forward for the VIGOR reward and the policy update (vigor.one_pass, vigor.trainer.one_pass).

The engine-level tests compare what the shared pass hands the update (book-kept ``.grad`` or a backward on the
retained graph) with plain autograd of ``sum_b c_b L_b`` on a separate forward; the trainer-level tests compare
a one-pass training step with the two-pass one on the same seed (weights after the step and every metric).
"""

from __future__ import annotations

import json

import pytest
import torch

from vigor import per_sample_grad_norms
from vigor.batch import completion_nll, prepare_batch
from vigor.one_pass import score_for_update
from vigor.tiny import group_batch, moe_config, random_model, tiny_model
from vigor.trainer import Trainer
from vigor.trainer.config import ConfigError, config_from_dict
from vigor.trainer.one_pass import active_dropout, bookkept_coefficients, same_in_train_and_eval

COEF = torch.tensor([0.7, -1.3, 0.0, 2.1, -0.4, 0.9])


def reference_grads(model, ids, attn, loss, coef, params=None):
    """``grad sum_b coef[b] L_b`` by plain autograd on its own forward (eval mode, as the engine scores)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    batch = prepare_batch(model, ids, attn, loss)
    losses = completion_nll(model(input_ids=ids, attention_mask=attn).logits, batch)
    (coef * losses).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_match(model, want, rel=1e-5):
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n, g in want.items():
        err = float((got[n] - g).norm() / g.norm().clamp_min(1e-30))
        assert err < rel, f"{n}: relative error {err:.2e}"


def model_for(case: str):
    if case == "llama-padding-idx":
        model = tiny_model("llama")
        model.model.embed_tokens.padding_idx = 5  # F.embedding's backward skips this row
        return model
    if case == "qwen2-lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        return get_peft_model(tiny_model("qwen2-untied"), lora)
    return tiny_model(case)


def batch_with_an_invalid_row(vocab=64):
    ids, attn, loss = group_batch(vocab, 2, 3, seed=1)
    ids[:, 2] = 5  # a column of the padding id in every row (llama-padding-idx)
    loss[2] = 0  # a completion with no loss token: zero gradient, scored 0
    return ids, attn, loss


# qwen2: tied head, q/k/v biases; llama: untied; gpt2: Conv1D, LayerNorm biases, position table, tied;
# gemma: scaled embedding and (1 + w) norms; a padding_idx table; LoRA adapters only
CASES = ["qwen2", "llama", "gpt2", "gemma", "llama-padding-idx", "qwen2-lora"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bookkeep", [True, False], ids=["bookkept", "graph"])
def test_shared_pass_gives_the_autograd_update_and_the_engine_norms(case, bookkeep):
    """Guards both one-pass forms: the gradient they hand the update equals autograd's for ``sum_b c_b L_b``
    (fp32, rel 1e-5 per parameter; a row scaled by the wrong sample's c_b, a transposed Conv1D gradient, a
    missed tie, bias or padding row would be off by O(1)), and the norms equal ``per_sample_grad_norms``."""
    model = model_for(case)
    ids, attn, loss = batch_with_an_invalid_row()
    if case == "gpt2":
        model.eval()  # the one-pass scores in eval mode; the gradient is compared in eval mode too
    want = reference_grads(model, ids, attn, loss, COEF)
    norms = per_sample_grad_norms(model, ids, attn, loss)
    shared = score_for_update(model, ids, attn, loss, bookkeep=bookkeep)
    assert shared.mode == ("bookkept" if bookkeep else "graph")
    torch.testing.assert_close(shared.norms, norms, rtol=1e-6, atol=0)
    assert float(shared.norms[2]) == 0.0
    if bookkeep:
        assert shared.kept_bytes() > 0
        shared.write_grads(COEF)
    else:
        (COEF * completion_nll(shared.logits, shared.batch)).sum().backward()
    assert_grads_match(model, want)


def test_bookkeeping_adds_to_existing_gradients():
    """Guards accumulation across micro-batches: ``write_grads`` adds to ``.grad`` as autograd does."""
    model = tiny_model("qwen2")
    ids, attn, loss = batch_with_an_invalid_row()
    want = reference_grads(model, ids, attn, loss, COEF)
    halves = [slice(0, 3), slice(3, 6)]
    for rows in halves:
        score_for_update(model, ids[rows], attn[rows], loss[rows]).write_grads(COEF[rows])
    assert_grads_match(model, want)


def test_bookkeeping_is_not_chosen_where_it_would_miss_gradients():
    """Guards the choice of form: an update parameter outside theta, or an experts module (no book-kept rule),
    must give the graph form, whose backward covers everything."""
    model = tiny_model("llama")
    ids, attn, loss = batch_with_an_invalid_row()
    subset = [n for n, _ in model.named_parameters() if "q_proj" in n]
    assert score_for_update(model, ids, attn, loss, params=subset).mode == "graph"
    moe = random_model(moe_config("qwen3-moe"))
    assert score_for_update(moe, ids, attn, loss).mode == "graph"


def test_write_grads_refuses_misuse():
    """Guards against a silently doubled or mis-shaped update."""
    model = tiny_model("qwen2")
    ids, attn, loss = batch_with_an_invalid_row()
    shared = score_for_update(model, ids, attn, loss)
    with pytest.raises(ValueError, match="coef must have shape"):
        shared.write_grads(COEF[:3])
    shared.write_grads(COEF)
    with pytest.raises(RuntimeError, match="twice"):
        shared.write_grads(COEF)
    graph = score_for_update(model, ids, attn, loss, bookkeep=False)
    with pytest.raises(RuntimeError, match="bookkept"):
        graph.write_grads(COEF)


def test_coefficients_by_loss_type():
    """Guards the derivation in docs/one-pass.md#book-keeping against a hand computation."""
    adv = torch.tensor([1.0, -2.0, 0.5])
    counts = torch.tensor([4, 1, 0])
    torch.testing.assert_close(bookkept_coefficients(adv, counts, "grpo", 3.0), adv / 3)
    torch.testing.assert_close(bookkept_coefficients(adv, counts, "token", 5.0), torch.tensor([0.8, -0.4, 0.0]))


def test_train_eval_difference_is_detected():
    """Guards the exactness condition: a model that behaves differently in train mode (here a hook, which no
    module or config scan can see) must not share its forward."""
    model = tiny_model("qwen2")
    ids, attn, _ = batch_with_an_invalid_row()
    assert active_dropout(model) == [] and same_in_train_and_eval(model, ids, attn)
    model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: o * 1.5 if m.training else o)
    assert not same_in_train_and_eval(model, ids, attn)
    assert model.training is False  # the check leaves the modes as they were
    assert active_dropout(tiny_model("gpt2"))  # GPT-2's configs drop activations by default


BASE = {
    "run": {"steps": 1, "progress": False, "seed": 3},
    "plots": {"enabled": False},
    "model": {"name": "tiny-qwen2", "hidden": 32, "layers": 2, "heads": 4},
    "data": {"num_train": 8, "num_test": 2, "max_ops": 1},
    "sampling": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 6},
    # eps well above rounding: AdamW's first step divides each gradient entry by its own size, so with the
    # default 1e-8 an entry whose exact gradient is ~0 (a key bias's, a fresh LoRA B's) moves by +-lr
    # whatever its rounding, and weights could not be compared at all
    "optim": {"lr": 1e-3, "eps": 1e-5},
}


def run(tmp_path, name, one_pass, **sections):
    values = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        values.setdefault(key, {}).update(value)
    values.setdefault("grpo", {})["one_pass"] = one_pass
    values["run"]["dir"] = str(tmp_path / name)
    trainer = Trainer(config_from_dict(values))
    trainer.applied = []  # the gradient of every optimizer step, as the optimizer saw it

    def record(optimizer, args, kwargs):
        trainer.applied.append([p.grad.clone() for p in trainer.params])

    trainer.optimizer.register_step_pre_hook(record)
    return trainer, trainer.train()


TRAINER_CASES = {
    "tied-grpo": ({}, "bookkeep"),
    "untied-token-micro-iter3": (
        {
            "model": {"name": "tiny-qwen2-untied"},
            "grpo": {"loss_type": "token", "num_iterations": 3},
            "optim": {"micro_batch_size": 3},
        },
        "bookkeep",
    ),
    "lora-kl": ({"lora": {"enabled": True, "r": 4}, "grpo": {"kl_coef": 0.05}}, "graph"),
    "full-kl-iter3": ({"grpo": {"kl_coef": 0.05, "num_iterations": 3}}, "graph"),
    "temperature": ({"sampling": {"temperature": 0.7}, "optim": {"micro_batch_size": 5}}, "graph"),
    "lora-bookkept": ({"lora": {"enabled": True, "r": 4}}, "bookkeep"),
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_one_pass_step_equals_the_two_pass_step(tmp_path, case):
    """Guards the trainer's one-pass step: same seed, same completions; every optimizer step sees the
    two-pass run's gradient (rel 1e-5 per tensor); after the step the trainable weights equal the two-pass
    run's (fp32, rel 1e-6 over all of them, 1e-5 per tensor: a zero-initialized bias or LoRA B is its first
    update, which carries the gradient's rounding), and so does every logged metric but the timings and the
    self-check's rounding error; ``auto`` picks the form the case allows (book-keeping only at temperature 1
    without a KL term)."""
    sections, mode = TRAINER_CASES[case]
    two, two_records = run(tmp_path, "two", "off", **sections)
    one, one_records = run(tmp_path, "one", "auto", **sections)
    assert one.one_pass.mode == mode and two.one_pass.mode == "off"
    names = [n for n, p in one.model.named_parameters() if p.requires_grad]
    assert len(one.applied) == len(two.applied) == one.cfg.grpo.num_iterations
    for step_one, step_two in zip(one.applied, two.applied, strict=True):
        for name, g, h in zip(names, step_one, step_two, strict=True):
            err = float((g - h).norm() / h.norm().clamp_min(1e-30))
            assert err < 1e-5 or float(h.norm()) < 1e-9, f"gradient of {name}: {err:.2e}"
    with torch.no_grad():
        for name, p, q in zip(names, one.params, two.params, strict=True):
            err = float((p - q).norm() / q.norm())
            assert err < 1e-5, f"{name}: {err:.2e}"
        whole = [torch.cat([p.flatten() for p in t.params]) for t in (one, two)]
        assert float((whole[0] - whole[1]).norm() / whole[1].norm()) < 1e-6
    (a,), (b,) = one_records, two_records
    assert a["one_pass"] == (2 if mode == "bookkeep" else 1) and b["one_pass"] == 0
    # the self-check's error is rounding noise, and the two-pass reward scores the head fused (no logits)
    skip = ("time/", "one_pass", "self_check/")
    keys = {k for k in a if not k.startswith(skip)}
    assert keys == {k for k in b if not k.startswith(skip)}
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


def test_inexact_explicit_modes_are_refused(tmp_path):
    """Guards against a user forcing a form that would change the numbers: book-keeping with a KL term,
    one pass with dropout active; ``auto`` falls back and says why."""
    with pytest.raises(ConfigError, match=r"bookkeep would not be exact.*kl_coef"):
        run(tmp_path, "kl", "bookkeep", grpo={"kl_coef": 0.1})
    with pytest.raises(ConfigError, match="graph would not be exact: dropout"):
        run(tmp_path, "drop", "graph", model={"name": "tiny-gpt2"})
    trainer, records = run(tmp_path, "auto", "auto", model={"name": "tiny-gpt2"})
    assert trainer.one_pass.mode == "off" and "dropout" in trainer.one_pass.reason
    assert records[0]["one_pass"] == 0


def test_bookkeeping_over_its_memory_budget_reuses_the_graph(tmp_path, capsys):
    """Guards the per-step memory choice: with ``grpo.bookkeep_max_mib`` below what book-keeping would hold,
    each step reuses the scoring graph (metric ``one_pass`` 1, said once), and its gradients still equal the
    two-pass run's; a budget above the need keeps book-keeping."""
    tight = {"grpo": {"bookkeep_max_mib": 1e-3}, "run": {"steps": 2}}
    one, records = run(tmp_path, "tight", "bookkeep", **tight)
    two, _ = run(tmp_path, "two", "off", run={"steps": 2})
    assert one.one_pass.mode == "bookkeep" and [r["one_pass"] for r in records] == [1, 1]
    assert all("one_pass/kept_mib" not in r for r in records)
    said = capsys.readouterr().out + capsys.readouterr().err
    assert said.count("reuses the scoring graph instead of book-keeping") == 1 and "grpo.bookkeep_max_mib" in said
    for step_one, step_two in zip(one.applied, two.applied, strict=True):
        for g, h in zip(step_one, step_two, strict=True):
            assert float((g - h).norm()) <= 1e-5 * float(h.norm()) + 1e-12
    _, roomy = run(tmp_path, "roomy", "bookkeep", grpo={"bookkeep_max_mib": 1024})
    assert roomy[0]["one_pass"] == 2 and roomy[0]["one_pass/kept_mib"] > 0


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama"])
def test_kept_memory_estimate_bounds_what_is_kept(family):
    """The estimate made before the pass is at least what the pass keeps (inputs shared by q/k/v counted
    once by ``kept_bytes``), and within 1.5x of it; ``max_kept_bytes`` below it picks the graph, and says why."""
    from vigor.one_pass import estimate_kept_bytes

    model = tiny_model(family)
    batch = group_batch(model.config.vocab_size)
    need = estimate_kept_bytes(model, *batch)
    kept = score_for_update(model, *batch, max_kept_bytes=need)
    assert kept.mode == "bookkept" and not kept.why_graph
    assert need / 1.5 <= kept.kept_bytes() <= need
    over = score_for_update(model, *batch, max_kept_bytes=need - 1)
    assert over.mode == "graph" and "MiB allowed" in over.why_graph
    torch.testing.assert_close(over.norms, kept.norms, rtol=1e-6, atol=0)


def _graph_tensors() -> int:
    """Live tensors that carry an autograd graph (each holds its whole graph's saved activations)."""
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)


@pytest.mark.parametrize("way", ["bookkept", "graph", "graph, not released", "norms only"])
def test_a_pass_leaves_no_graph_behind(way):
    """Guards against a leak that grew a training run by a graph per step: the engine's gradient hooks live
    on the graph and point back at the pass, which (through the shared update) held the logits and so the
    graph, a cycle through autograd's C++ nodes that Python's collector cannot break. After the update
    (or the norms alone) no tensor with a graph may survive the call, even when a caller drops a graph-mode
    score without ``release()``."""
    model = tiny_model("qwen2")
    ids, attn, loss = batch_with_an_invalid_row()
    before = _graph_tensors()
    for _ in range(2):
        if way == "norms only":
            per_sample_grad_norms(model, ids, attn, loss)
            continue
        shared = score_for_update(model, ids, attn, loss, bookkeep=way == "bookkept")
        if way == "bookkept":
            shared.write_grads(COEF)
        else:
            (COEF * completion_nll(shared.logits, shared.batch)).sum().backward()
            if way == "graph":
                shared.release()
        del shared
        model.zero_grad(set_to_none=True)
    assert _graph_tensors() == before
