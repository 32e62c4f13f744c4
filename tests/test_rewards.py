"""Reward shaping on cases worked out by hand (SPEC sections 1 and 2)."""

from __future__ import annotations

import math

import pytest
import torch

import vigor
from vigor import rewards as R
from vigor.testing import group_batch, tiny_model

T, F = True, False


def shaped(values, valid, group_size):
    return R.rank_shape(torch.tensor(values), torch.tensor(valid), group_size).tolist()


def test_rank_shape_ties_keep_their_order():
    # ascending: -3 (0) -> rank 0, -2 (2) -> 1, -1 (1) -> 2, -1 (3) -> 3; k -> 2k/3 - 1
    assert shaped([-3.0, -1.0, -2.0, -1.0], [T, T, T, T], 4) == pytest.approx([-1, 1 / 3, -1 / 3, 1])


def test_rank_shape_group_of_one_is_zero():
    assert shaped([-5.0, -1.0], [T, T], 1) == [0.0, 0.0]


def test_rank_shape_one_invalid_ranks_last():
    # the invalid completion's raw reward (0.0) would be the best; it must rank below every valid one
    assert shaped([-1.0, 0.0, -2.0, -0.5], [T, F, T, T], 4) == pytest.approx([1 / 3, -1, -1 / 3, 1])


def test_rank_shape_invalid_ones_keep_their_order():
    assert shaped([0.0, 0.0, -1.0, -2.0], [F, F, T, T], 4) == pytest.approx([-1, -1 / 3, 1, 1 / 3])


def test_rank_shape_all_invalid_group_is_flat_and_others_unaffected():
    got = shaped([0.0, 0.0, 0.0, -2.0, -1.0, -3.0], [F, F, F, T, T, T], 3)
    assert got == pytest.approx([0, 0, 0, 0, 1, -1])


def test_rank_shape_non_finite_counts_as_invalid():
    assert shaped([float("nan"), -1.0, -2.0], [T, T, T], 3) == pytest.approx([-1, 1, 0])


def test_group_advantage_matches_hand_computation():
    s = torch.tensor([-1, 1 / 3, -1 / 3, 1, 0.5, 0.5, 0.5, 0.5])
    std = math.sqrt((1 + 1 / 9 + 1 / 9 + 1) / 3)  # unbiased
    want = [v / (std + 1e-4) for v in [-1, 1 / 3, -1 / 3, 1]] + [0.0] * 4
    assert R.group_advantages(s, 4).tolist() == pytest.approx(want, rel=1e-6)
    assert R.group_advantages(torch.tensor([3.0, -2.0]), 1).tolist() == [0.0, 0.0]


def test_raw_reward_length_correction():
    norms, counts = torch.tensor([2.0, 3.0]), torch.tensor([4, 9])
    assert R.vigor_raw_rewards(norms, counts).tolist() == [-4.0, -9.0]
    assert R.vigor_raw_rewards(norms, counts, sqrt_length=False).tolist() == [-2.0, -3.0]


def test_zscore_shape_by_hand():
    got = R.zscore_shape(torch.tensor([1.0, 2.0, 3.0, 9.0]), torch.tensor([T, T, T, F]), 4).tolist()
    z = 1 / (1 + 1e-4)  # unbiased std of (1, 2, 3) is 1
    assert got == pytest.approx([-z, 0.0, z, -z - 1.0], rel=1e-6)
    assert R.zscore_shape(torch.tensor([1.0, 2.0]), torch.tensor([F, F]), 2).tolist() == [0.0, 0.0]


def test_self_certainty_by_hand():
    uniform = torch.zeros(1, 5)
    assert R.self_certainty(uniform).item() == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    want = -math.log(2) - 0.5 * (math.log(0.25) + math.log(0.75))
    assert R.self_certainty(p).item() == pytest.approx(want, rel=1e-6)


def test_combine_rewards_by_weight():
    got = R.combine_rewards({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 0.0])}, {"a": 2.0, "b": 0.5})
    assert got.tolist() == [7.0, 4.0]
    with pytest.raises(KeyError, match="'c'"):
        R.combine_rewards({"a": torch.tensor([1.0])}, {"c": 1.0})


def test_random_rewards_are_in_range_and_seeded():
    a = R.random_rewards(100, generator=torch.Generator().manual_seed(3))
    b = R.random_rewards(100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1 and a.std() > 0.3


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="whole number of groups of 4"):
        R.rank_shape(torch.zeros(6), torch.ones(6, dtype=torch.bool), 4)


def test_vigor_rewards_rank_the_oracle_raw_rewards():
    model = tiny_model("qwen2")
    group = 4
    ids, attn, loss = group_batch(64, groups=2, group_size=group, seed=21, empty_completion=True)
    scores = R.vigor_rewards(model, ids, attn, loss, group)
    oracle = vigor.oracle_grad_norms(model, ids, attn, loss)
    counts = loss.sum(1)
    raw = -counts.float().sqrt() * oracle
    assert not scores.valid[-1] and scores.valid[:-1].all()
    torch.testing.assert_close(scores.raw[:-1], raw[:-1], rtol=1e-4, atol=0)
    assert scores.raw[-1] == 0.0 and scores.rewards[-1] == -1.0  # empty completion ranks last
    for g in range(2):
        sl = slice(g * group, (g + 1) * group)
        keyed = torch.where(scores.valid[sl], raw[sl], -torch.inf)
        want = 2.0 * torch.argsort(torch.argsort(keyed, stable=True)).float() / (group - 1) - 1
        assert torch.equal(scores.rewards[sl], want)
    assert torch.isfinite(scores.rewards).all()


def test_self_certainty_scores_average_over_completion_tokens():
    model = tiny_model("llama")
    ids, attn, loss = group_batch(64, groups=1, group_size=3, seed=22, empty_completion=True)
    sc, valid = R.self_certainty_scores(model, ids, attn, loss)
    assert valid.tolist() == [True, True, False] and sc[-1] == 0.0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    for b in range(2):
        positions = loss[b, 1:].nonzero().flatten()  # logits at t predict token t + 1
        want = R.self_certainty(logits[b, positions]).mean()
        assert sc[b].item() == pytest.approx(want.item(), rel=1e-5)
