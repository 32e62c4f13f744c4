"""The tied embedding/LM-head cross term, whichever side's gradient arrives first.

With a weight shared by the input embedding and the LM head, ``||grad||^2`` has the cross term
``2 <G_head^T H, S_emb>``; ``TiedPair`` adds it on the side whose gradient arrives second. The models in
the other tests always deliver the head's gradient first, so the head-side branch (the embedding first)
runs only here. Written against the current ``vigor.rules.TiedPair`` API: if the pairing logic moves,
adapt the two calls below, not the assertions.
"""

from __future__ import annotations

import naive
import pytest
import torch
from conftest import backends_under_test, device_for
from torch import nn

import vigor_kernels as vk
from vigor.rules import RowPlan, RuleContext, TiedPair

VOCAB, D = 11, 6
SPANS = [(1, 7), (0, 4), (3, 3)]  # ragged, one sample without a valid row


def context(batch: int, length: int, backend: str, device: torch.device) -> RuleContext:
    ranges = vk.as_row_ranges(torch.tensor(SPANS), batch, length, device)
    return RuleContext(batch, length, ranges, backend, "auto", {})


def pair_and_inputs(device: torch.device, padding_idx: int | None):
    embedding = nn.Embedding(VOCAB, D, padding_idx=padding_idx).to(device)
    head = nn.Linear(D, VOCAB, bias=False).to(device)
    head.weight = embedding.weight
    batch, length = len(SPANS), 7
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    ids[0, 2] = ids[1, 0] = 2  # the padding token appears inside valid rows
    g_emb = torch.randn(batch, length, D, device=device)
    h = torch.randn(batch, length, D, device=device)
    g_head = torch.randn(batch, length, VOCAB, device=device)
    return TiedPair(embedding, head, ids=ids, ids_plan=RowPlan(0, 1, 1)), ids, g_emb, h, g_head


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("first", ["head", "embedding"])
def test_cross_term_in_either_order_matches_the_naive_formula(backend, padding_idx, first):
    """Guards both branches of TiedPair (the second side adds ``2 <G^T H, S>``, with its factor 2, the
    first adds 0 and leaves no state behind) against the naive float64 cross term, whichever side runs
    first. A head-side branch without its factor 2, or one that forgets the embedding's gradient, fails."""
    device = device_for(backend)
    pair, ids, g_emb, h, g_head = pair_and_inputs(device, padding_idx)
    ctx = context(len(SPANS), ids.shape[1], backend, device)
    if first == "head":
        early = pair.head_side(h, g_head, ctx)
        late = pair.embedding_side(g_emb, ctx)
    else:
        early = pair.embedding_side(g_emb, ctx)
        late = pair.head_side(h, g_head, ctx)
    want = naive.tied_cross(ids.cpu(), g_emb.cpu(), h.cpu(), g_head.cpu(), SPANS, padding_idx)
    assert early.dtype == late.dtype == torch.float32
    assert torch.equal(early.cpu(), torch.zeros(len(SPANS)))
    assert want[:2].abs().min() > 1e-3  # a real, non-vanishing cross term to compare with
    torch.testing.assert_close(late.cpu().double(), want, rtol=1e-4, atol=1e-6)
    assert late[2].item() == 0.0
    assert pair.head_rows is None and pair.embedding_grad is None  # nothing left over for the next pass
