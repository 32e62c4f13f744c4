"""The trainer's real update (``Trainer._update``) against references built by hand: gradient accumulation
over micro-batches gives the full-batch step, and the applied gradient is the clipped one.

These call the trainer's own code path; tests/test_trainer_units.py checks the loss by hand, and the end-to-end
tests in tests/test_trainer.py cannot tell a right update from a wrong one of the same shape.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vigor.trainer import Trainer
from vigor.trainer.config import config_from_dict
from vigor.trainer.grpo import completion_logprobs, grpo_loss
from vigor.trainer.sampling import Rollouts

PROMPT, COMPLETION, ROWS = 3, 5, 8
BASE = {
    "run": {"steps": 1, "progress": False, "seed": 3},
    "plots": {"enabled": False},
    "model": {"name": "tiny-qwen2", "hidden": 32, "layers": 2, "heads": 4},
    "data": {"num_train": 8, "num_test": 2, "max_ops": 1},
    "sampling": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": COMPLETION},
    "optim": {"lr": 1e-2},
}


def trainer(tmp_path, name: str, loss_type: str = "grpo", **optim) -> Trainer:
    values = json.loads(json.dumps(BASE))
    values["optim"].update(optim)
    values["grpo"] = {"loss_type": loss_type}
    values["run"]["dir"] = str(tmp_path / name)
    return Trainer(config_from_dict(values))


def rollouts(vocab: int) -> Rollouts:
    """A ragged batch of 8 completions: lengths 5, 1, 0 (no loss token), 4, 3, 5, 2, 5."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (ROWS, PROMPT + COMPLETION), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 0] = 0  # a left-padded prompt
    loss = torch.zeros(ROWS, PROMPT + COMPLETION, dtype=torch.bool)
    lengths = [5, 1, 0, 4, 3, 5, 2, 5]
    for b, n in enumerate(lengths):
        loss[b, PROMPT : PROMPT + n] = True
        attention[b, PROMPT + n :] = 0 if n < COMPLETION else 1
    return Rollouts(
        ids, attention, loss, PROMPT, torch.zeros(ROWS, dtype=torch.bool), torch.tensor(lengths), [""] * ROWS, 4
    )


def advantages() -> torch.Tensor:
    return torch.randn(ROWS, generator=torch.Generator().manual_seed(8))


def reference_gradients(model, ro: Rollouts, adv: torch.Tensor, t: Trainer) -> list[torch.Tensor]:
    """The full-batch GRPO gradient, by hand: one forward over every row, one backward."""
    model = copy.deepcopy(model).train()
    mask = ro.completion_mask
    denominator = float(ROWS if t.cfg.grpo.loss_type == "grpo" else mask.sum())
    logp = completion_logprobs(model, ro.input_ids, ro.attention_mask, PROMPT, t.cfg.sampling.temperature).logp
    grpo_loss(logp, logp.detach(), None, adv, mask, t.cfg.grpo, denominator).loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("loss_type", ["grpo", "token"])
def test_micro_batches_give_the_full_batch_step(tmp_path, loss_type):
    """Guards the gradient accumulation of ``Trainer._update``: micro-batches of 3 (3 + 3 + 2 rows) must
    give the same gradient norm, loss, applied gradient and updated weights as one pass over the batch, and
    that gradient is the hand-computed full-batch one (dividing each micro-batch's loss by its own size, or
    by the number of micro-batches, changes the norm; AdamW's first step alone would hide it)."""
    whole = trainer(tmp_path, "whole", loss_type, max_grad_norm=None)
    micro = trainer(tmp_path, "micro", loss_type, max_grad_norm=None, micro_batch_size=3)
    for p, q in zip(whole.model.parameters(), micro.model.parameters(), strict=True):
        assert torch.equal(p, q)
    ro, adv = rollouts(whole.model.config.vocab_size), advantages()
    grads = reference_gradients(whole.model, ro, adv, whole)
    want = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    seen = []
    forward = micro.model.forward
    micro.model.forward = lambda *a, **kw: seen.append(kw["input_ids"].shape[0]) or forward(*a, **kw)
    got_whole, got_micro = whole._update(ro, adv), micro._update(ro, adv)
    assert seen == [3, 3, 2]  # really micro-batched
    assert got_whole["grad_norm"] == pytest.approx(float(want), rel=1e-5)
    assert got_micro["grad_norm"] == pytest.approx(float(want), rel=1e-5)
    assert got_micro["loss"] == pytest.approx(got_whole["loss"], rel=1e-5, abs=1e-7)
    # the gradient each optimizer applied: AdamW's first moment after one step is (1 - beta1) * g
    beta1 = whole.cfg.optim.beta1
    for t in (whole, micro):
        for (name, p), g in zip(t.model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(t.optimizer.state[p]["exp_avg"], (1 - beta1) * g, rtol=1e-4, atol=1e-8, msg=name)
    # the weights themselves, where the gradient is not numerically zero (k_proj's bias, zero in exact
    # arithmetic, gets rounding noise that AdamW's first step turns into a full +-lr move of either sign)
    for (name, p), q, g in zip(whole.model.named_parameters(), micro.model.parameters(), grads, strict=True):
        live = g.abs() > 1e-4
        torch.testing.assert_close(q[live], p[live], rtol=1e-5, atol=1e-6, msg=name)


def test_applied_gradient_is_the_clipped_one(tmp_path):
    """Guards gradient clipping in ``Trainer._update``: with ``max_grad_norm`` far below the gradient's
    norm, AdamW's first moments must hold ``(1 - beta1) * g * max / ||g||`` and its second moments
    ``(1 - beta2) * (g * max / ||g||)^2``, g the hand-computed full-batch gradient; the logged norm is the
    norm before clipping. (AdamW's first step is nearly scale-free, so the weights alone cannot tell.)"""
    limit = 1e-3
    t = trainer(tmp_path, "clip", max_grad_norm=limit, micro_batch_size=3)
    ro, adv = rollouts(t.model.config.vocab_size), advantages()
    grads = reference_gradients(t.model, ro, adv, t)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert norm > 100 * limit
    record = t._update(ro, adv)
    assert record["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    beta1, beta2 = t.cfg.optim.beta1, t.cfg.optim.beta2
    scale = limit / (float(norm) + 1e-6)  # torch's clip_grad_norm_ factor
    for p, g in zip(t.params, grads, strict=True):
        state = t.optimizer.state[p]
        torch.testing.assert_close(state["exp_avg"], (1 - beta1) * g * scale, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(state["exp_avg_sq"], (1 - beta2) * (g * scale) ** 2, rtol=1e-4, atol=1e-14)
