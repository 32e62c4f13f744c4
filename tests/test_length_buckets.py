"""Very uneven completions scored in a few passes of similar length (vigor.length_buckets).

The partition is checked on its own (every row once, contiguous in width order, each split paying for
its pass), and the engine's split passes against one unsplit pass and the per-sample autograd oracle.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from vigor import oracle_grad_norms, per_sample_grad_norms
from vigor.length_buckets import MIN_PASS_POSITIONS, PASS_COST, length_buckets
from vigor.tiny import group_batch, tiny_model


def area(widths, chunks):
    return sum(len(c) * max(widths[i] for i in c) for c in chunks)


@pytest.mark.parametrize("seed", range(20))
def test_buckets_partition_rows_by_width_and_pay_for_their_passes(seed):
    """Guards the partition: each row in exactly one chunk, chunks of contiguous widths (no row of a
    narrower chunk wider than one of the next), at most 4 passes, and every pass beyond the first saving
    more positions than it is charged (a split that does not pay would only add a pass's fixed cost)."""
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    widths = [int(rng.lognormvariate(6, 0.8)) + 1 for _ in range(n)]
    chunks = length_buckets(widths)
    assert sorted(i for c in chunks for i in c) == list(range(n))
    assert 1 <= len(chunks) <= 4
    for a, b in itertools.pairwise(chunks):
        assert max(widths[i] for i in a) <= min(widths[i] for i in b)
    unsplit = n * max(widths)
    if len(chunks) > 1:
        charge = max(PASS_COST * unsplit, MIN_PASS_POSITIONS)
        assert unsplit - area(widths, chunks) > (len(chunks) - 1) * charge


def test_buckets_split_only_uneven_batches():
    """Guards the choice: rows of nearly one width, or a batch too small to pay for a pass, stay one pass
    in their order; a few long completions among short ones get their own pass."""
    assert length_buckets([17, 20, 24, 22] * 32) == [list(range(128))]
    assert length_buckets([90, 30, 50]) == [[0, 1, 2]]
    assert length_buckets([2000, 40, 60, 1900, 50]) == [[1, 4, 2], [3, 0]]
    assert length_buckets([100] * 7 + [2000]) == [list(range(7)), [7]]


def uneven_batch(vocab: int):
    """Prompts of 3-8 tokens (left-padded) and completions of 1-4 tokens, then three rows made long."""
    ids, attn, loss = group_batch(vocab, 4, 4, completion_lengths=(1, 4), seed=3)
    width = ids.shape[1]
    extra = 40
    ids = torch.cat(
        [ids, torch.randint(0, vocab, (ids.shape[0], extra), generator=torch.Generator().manual_seed(0))], 1
    )
    attn = torch.cat([attn, torch.zeros(attn.shape[0], extra, dtype=attn.dtype)], 1)
    loss = torch.cat([loss, torch.zeros(loss.shape[0], extra, dtype=loss.dtype)], 1)
    for row, length in ((1, 40), (4, 33), (6, 36)):
        start = int(attn[row].nonzero().max()) + 1
        attn[row, start : start + length] = 1
        loss[row, start : start + length] = 1
    loss[7] = 0  # a row with nothing scored: norm 0, in no pass
    assert ids.shape[1] == width + extra
    return ids, attn, loss


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_split_passes_give_the_unsplit_norms(family):
    """Guards the engine's split: on a batch whose long rows get their own pass (two model forwards,
    counted), every norm equals the unsplit pass's (rel 1e-5) and the oracle's (rel 1e-4); a row scored
    in the wrong pass, a cut that drops a scored column or shifts positions would be off by O(1)."""
    model = tiny_model(family)
    ids, attn, loss = uneven_batch(model.config.vocab_size)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        split = per_sample_grad_norms(model, ids, attn, loss, self_check="off")
        passes = len(calls)
        whole = per_sample_grad_norms(model, ids, attn, loss, self_check="off", split_by_length=False)
    finally:
        handle.remove()
    assert passes == 2 and len(calls) == 3
    oracle = oracle_grad_norms(model, ids, attn, loss)
    assert split[7] == 0 and oracle[7] == 0
    valid = loss.any(1)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=0)
    rel = ((split - oracle).abs() / oracle.clamp_min(1e-30))[valid]
    assert float(rel.max()) < 1e-4
