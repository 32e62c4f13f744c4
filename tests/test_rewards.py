"""Reward shaping on cases worked out by hand (docs/reward.md)."""

from __future__ import annotations

import math

import pytest
import torch

import vigor
from vigor import rewards as R
from vigor.tiny import group_batch, tiny_model
from vigor.trainer import rewards as TR

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
    got = TR.combine_rewards({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 0.0])}, {"a": 2.0, "b": 0.5})
    assert got.tolist() == [7.0, 4.0]
    with pytest.raises(KeyError, match="'c'"):
        TR.combine_rewards({"a": torch.tensor([1.0])}, {"c": 1.0})


def test_random_rewards_are_in_range_and_seeded():
    a = TR.random_rewards(100, generator=torch.Generator().manual_seed(3))
    b = TR.random_rewards(100, generator=torch.Generator().manual_seed(3))
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


def test_math_answer_rewards_check_the_final_number():
    texts = ["12 + 2 = 14. The answer is 14.", "14.0", "so 2 * 7 = 14", "15", "", "14 or maybe 15", "no number"]
    assert TR.math_answer_rewards(texts, ["14"] * len(texts)).tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert TR.math_answer_rewards(["it is 0.5"], ["1/2"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        TR.math_answer_rewards(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="reference answer 'abc' does not parse"):
        TR.math_answer_rewards(["1"], ["abc"])


def length_reward(prompts, completions, answer):
    """An external reward function in the TRL convention (used by name below)."""
    assert len(prompts) == len(completions) == len(answer)
    return [float(len(c)) for c in completions]


def test_external_rewards_check_what_the_function_returns():
    got = TR.external_rewards(length_reward, ["p", "p"], ["ab", ""], answer=["1", "1"])
    assert got.tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        TR.external_rewards(lambda p, c: [1.0], ["p", "p"], ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        TR.external_rewards(lambda p, c: [1.0, float("nan")], ["p", "p"], ["a", "b"])
    with pytest.raises(ValueError, match="one float per completion"):
        TR.external_rewards(lambda p, c: ["x", "y"], ["p", "p"], ["a", "b"])


def test_reward_set_mixes_vigor_math_and_a_function_by_weight():
    from vigor.tiny import char_tokenizer
    from vigor.trainer.config import ConfigError, RewardSettings
    from vigor.trainer.data import PromptSet
    from vigor.trainer.sampling import assemble
    from vigor.trainer.scoring import RewardSet
    from vigor_kernels.errors import BackendError

    tok = char_tokenizer()
    model = tiny_model("qwen2", vocab=len(tok))
    group = 3
    prompts = PromptSet(["2+2=", "3+3="], ["4", "6"], {"answer": ["4", "6"]})
    enc = tok(prompts.texts, return_tensors="pt")
    texts = ["4", "5", "44", "6", "", "so 6"]  # the empty one has only its EOS token; the last one is truncated
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    ids[-1] = ids[-1][:-1]
    width = max(map(len, ids))
    completions = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in ids])
    ro = assemble(
        enc["input_ids"].repeat_interleave(group, 0), enc["attention_mask"].repeat_interleave(group, 0),
        completions, [tok.eos_token_id], tok, group, mask_truncated=True,
    )  # fmt: skip
    weights = {"vigor": 1.0, "math": 2.0, "test_rewards:length_reward": 0.5, "random": 0.0}
    rs = RewardSet(RewardSettings(weights=weights), group, seed=0, has_answers=True)
    out = rs(model, ro, prompts, step=1)
    assert set(out.components) == {"vigor", "math", "test_rewards:length_reward"}  # weight 0: not computed
    assert out.accuracy.tolist() == [1, 0, 0, 1, 0, 1]  # "44" is not 4; "so 6" is 6
    assert out.components["test_rewards:length_reward"].tolist() == [1, 1, 2, 1, 0, 4]
    assert out.vigor.valid.tolist() == [True] * 5 + [False]  # the truncated completion carries no loss...
    assert out.components["vigor"][5] == -1.0  # ...and ranks last in its group
    want = out.components["vigor"] + 2.0 * out.accuracy + 0.5 * out.components["test_rewards:length_reward"]
    torch.testing.assert_close(out.total, want)
    torch.testing.assert_close(out.advantages, R.group_advantages(want, group))
    # rewards.backend reaches the engine: the torch backend gives the same norms; an unknown one is refused there
    by_torch = RewardSet(RewardSettings(weights={"vigor": 1.0}, backend="torch"), group, seed=0, has_answers=True)
    torch.testing.assert_close(by_torch(model, ro, prompts, step=1).vigor.norms, out.vigor.norms, rtol=1e-4, atol=0)
    unknown = RewardSet(RewardSettings(weights={"vigor": 1.0}, backend="no-such"), group, seed=0, has_answers=True)
    with pytest.raises(BackendError, match="unknown backend 'no-such'"):
        unknown(model, ro, prompts, step=1)
    with pytest.raises(ConfigError, match="cannot import reward function 'no_such_module:f'"):
        RewardSet(RewardSettings(weights={"no_such_module:f": 1.0}), group, seed=0, has_answers=True)
    with pytest.raises(ConfigError, match="math needs reference answers"):
        RewardSet(RewardSettings(weights={"math": 1.0}), group, seed=0, has_answers=False)


def test_vigor_rewards_score_only_the_valid_rows_and_columns():
    """Invalid completions are left out of the engine's pass and trailing padding is cut: the norms of the
    valid completions are those of the whole batch, the invalid ones get 0 and rank last."""
    model = tiny_model("qwen2")
    ids, attn, loss = group_batch(64, groups=2, group_size=3, seed=23, completion_lengths=(2, 5))
    longest = int(attn.sum(1).argmax())
    loss[longest] = 0  # masked (e.g. truncated): invalid, and the only row reaching the last columns
    attn[longest, -1] = 1
    full = vigor.per_sample_grad_norms(model, ids, attn, loss)
    scores = R.vigor_rewards(model, ids, attn, loss, 3)
    valid = loss.any(1)
    assert scores.valid.tolist() == valid.tolist() and not valid[longest]
    torch.testing.assert_close(scores.norms[valid], full[valid], rtol=1e-5, atol=0)
    assert scores.norms[longest] == 0 and scores.rewards[longest] == -1.0
    none = R.vigor_rewards(model, ids, attn, torch.zeros_like(loss), 3)
    assert none.norms.abs().sum() == 0 and none.rewards.abs().sum() == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_zscore_shaping_treats_a_non_finite_norm_as_invalid(bad):
    """Guards rank=False: one NaN or inf norm used to turn its whole group NaN. It must rank last, as rank
    shaping does, and leave the other completions' z-scores those of the finite ones alone."""
    norms = torch.tensor([1.0, 2.0, bad, 3.0, 1.0, 2.0, 4.0, 8.0])
    counts = torch.tensor([4, 4, 4, 4, 1, 1, 1, 1])
    got = R.shape_vigor(norms, counts, 4, rank=False).rewards
    assert torch.isfinite(got).all()
    alone = R.shape_vigor(norms[[0, 1, 3]], counts[[0, 1, 3]], 3, rank=False).rewards
    torch.testing.assert_close(got[[0, 1, 3]], alone)
    assert got[2] == got[:4].min() and got[2] < got[[0, 1, 3]].min()
    torch.testing.assert_close(got[4:], R.shape_vigor(norms[4:], counts[4:], 4, rank=False).rewards)
    ranked = R.shape_vigor(norms, counts, 4, rank=True).rewards
    assert ranked[2] == -1.0  # what rank shaping already did
