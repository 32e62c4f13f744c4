"""The one packing function and its three callers' layouts, worked out by hand. The caller pins were
written against the three separate packers before they were merged (the sampler's ``assemble``, ``vigor
score``'s ``pack_pairs`` and the TRL bridge's ``trl_batch``), so a change to any caller's layout fails
here: TRL's layout in particular must stay TRL's (pad counts as an end, truncated rows lose attention)."""

from __future__ import annotations

import pytest
import torch

from vigor.integrations.trl import trl_batch
from vigor.packing import pack_completions
from vigor.tiny import char_tokenizer
from vigor.trainer.sampling import assemble


def test_pack_pads_prompts_left_and_completions_right():
    """`vigor score`'s layout: every completion token carries loss, no truncation rule."""
    b = pack_completions([[3, 4], [5]], [[6], [7, 8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[3, 4, 6, 0, 0], [0, 5, 7, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert b.loss_mask.int().tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert b.prompt_width == 2 and b.truncated.tolist() == [False, False] and b.lengths.tolist() == [1, 3]
    assert b.attention_mask.dtype == torch.int64 and b.loss_mask.dtype == torch.bool


def test_pack_refuses_what_it_cannot_lay_out():
    with pytest.raises(ValueError, match="no tokens"):
        pack_completions([[]], [[1]], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pack_completions([[1], [2]], [[1]], pad_id=0)
    with pytest.raises(ValueError, match="empty"):
        pack_completions([], [], pad_id=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        pack_completions([[1]], [[1]], pad_id=0, pad_to_multiple_of=0)


def test_pack_all_empty_completions_keeps_the_prompts():
    """No completion token at all: the batch is the prompts alone, nothing carries loss (the engine and the
    rewards score such rows as invalid)."""
    b = pack_completions([[5], [6, 7]], [[], []], pad_id=0)
    assert b.input_ids.tolist() == [[0, 5], [6, 7]] and b.attention_mask.tolist() == [[0, 1], [1, 1]]
    assert not b.loss_mask.any() and b.lengths.tolist() == [0, 0]


def test_trl_layout_by_hand():
    """TRL's rule: finished when the last token is an EOS id or the pad id; a truncated completion loses its
    loss and its attention; an empty one counts as truncated; pad_to_multiple_of rounds both widths."""
    b = trl_batch(
        [[5], [6, 7], [8]], [[9, 0], [], [9, 3]], pad_token_id=0, eos_token_ids=[1], mask_truncated_completions=True
    )
    assert b.input_ids.tolist() == [[0, 5, 9, 0], [6, 7, 0, 0], [0, 8, 9, 3]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 0]]
    assert b.loss_mask.int().tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert b.prompt_width == 2 and b.truncated.tolist() == [False, True, True]
    r = trl_batch([[5, 6], [7]], [[8, 1], [9, 9, 9]], pad_token_id=0, eos_token_ids=[1], pad_to_multiple_of=4)
    assert r.input_ids.tolist() == [[0, 0, 5, 6, 8, 1, 0, 0], [0, 0, 0, 7, 9, 9, 9, 0]]
    assert r.loss_mask.int().tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]]  # not masked
    assert r.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0]]


def test_sampler_layout_with_several_eos_ids_and_a_pad_inside():
    """The sampler's rule: a completion ends at its first EOS (any of several ids); a pad token generated
    before it is an ordinary token; a masked truncated completion keeps its attention (only the loss goes).
    Inputs as ``generate`` gives them: prompts padded to the longest, pad after a finished row's EOS."""
    tok = char_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    ro = assemble(
        torch.tensor([[a, a]]).repeat(3, 1), torch.ones(3, 2, dtype=torch.long),
        torch.tensor([[b, pad, eos], [b, b, b], [a, pad, pad]]), [eos, a], tok, 3, True,
    )  # fmt: skip
    assert ro.input_ids.tolist() == [[a, a, b, pad, eos], [a, a, b, b, b], [a, a, a, pad, pad]]
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert ro.loss_mask.int().tolist() == [[0, 0, 1, 1, 1], [0] * 5, [0, 0, 1, 0, 0]]
    assert ro.truncated.tolist() == [False, True, False] and ro.lengths.tolist() == [3, 3, 1]
    assert ro.attention_mask.dtype == torch.int64 and ro.loss_mask.dtype == torch.bool
    assert ro.texts == ["b", "bbb", "a"]
