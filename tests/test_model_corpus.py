"""The engine on the model corpus (tests/model_corpus.py): every family either exact against an
independent per-sample reference or refused with its documented reason; a number that disagrees with
the reference (``wrong``) fails, and so does a crash."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from corpus_reference import judge, reference_sq_norms
from model_corpus import BY_NAME, CORPUS, LAYOUTS, corpus_batch, corpus_model, pad_id, run_entry

import vigor

DOCS = Path(__file__).resolve().parents[1] / "docs" / "model-families.md"
REGENERATE = "python -m tests.model_corpus --markdown --out docs/model-families.md"

EXACT = [e.name for e in CORPUS if e.status == "exact"]
REFUSED = [e.name for e in CORPUS if e.status == "refused"]


def test_corpus_size_and_entries():
    """The catalogue is what the docs promise: at least 28 families, each with a known status and, when
    refused, a reason and a pattern its refusal must match."""
    assert len(CORPUS) >= 28 and len(BY_NAME) == len(CORPUS)
    for entry in CORPUS:
        assert entry.status in ("exact", "refused"), entry
        assert entry.status == "exact" or (entry.reason and entry.match), entry


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_layouts(layout):
    """Guards the corpus batch itself: TRL's layout must really pad on both sides, the other only on the
    right, and one completion must be empty, or the corpus would not test what it claims."""
    ids, attn, loss = corpus_batch(100, layout, pad=7)
    assert ids.shape[0] == 6 and (loss.sum(1) == 0).sum() == 1
    assert (ids[attn == 0] == 7).all() and not loss[:, 0].any() and not (loss.bool() & (attn == 0)).any()
    assert (attn[:, -1] == 0).any(), "ragged completions must leave right padding"
    assert (attn[:, 0] == 0).any() == (layout == "left")
    for b in range(ids.shape[0]):  # attended tokens are contiguous, completion after prompt
        cols = attn[b].nonzero().flatten()
        assert (cols.diff() == 1).all()
        scored = loss[b].nonzero().flatten()
        assert scored.numel() == 0 or scored.max() == cols.max()


@pytest.mark.parametrize("name", ["qwen2-tied", "gpt2", "llama-lora", "opt"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_oracle(name, layout):
    """The reference is written independently of vigor.oracle_grad_norms; on ordinary models (tied head,
    Conv1D, LoRA adapters as theta, OPT's mask-derived positions) both must compute the same loss
    contract, per parameter."""
    model = corpus_model(name)
    ids, attn, loss = corpus_batch(model.config.vocab_size, layout, pad=pad_id(model))
    want = reference_sq_norms(model, ids, attn, loss)
    norms, oracle = vigor.oracle_grad_norms(model, ids, attn, loss, per_param=True)
    assert set(oracle) == set(want)
    for n, v in oracle.items():
        torch.testing.assert_close(v.double(), want[n], rtol=1e-5, atol=1e-12 * float(want[n].max()))
    assert (norms[loss.sum(1) == 0] == 0).all() and (norms[loss.sum(1) > 0] > 0).all()


def test_judge_flags_a_wrong_engine(monkeypatch):
    """The verdict must call a number that disagrees with the reference `wrong`, even when the total norm
    hides it: scaling one small parameter's squared norm by 1.5 is caught per parameter."""
    model = corpus_model("llama")
    ids, attn, loss = corpus_batch(model.config.vocab_size, "left")
    real = vigor.per_sample_grad_norms
    victim = "model.layers.0.input_layernorm.weight"

    def skewed(*args, **kw):
        norms, per_param = real(*args, **kw)
        per_param = dict(per_param, **{victim: per_param[victim] * 1.5})
        return norms, per_param

    assert judge(model, ids, attn, loss).status == "exact"
    monkeypatch.setattr(vigor, "per_sample_grad_norms", skewed)
    outcome = judge(model, ids, attn, loss)
    assert outcome.status == "wrong" and outcome.worst_param == victim, outcome


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", EXACT)
def test_family_is_exact(name, layout):
    """The engine's norms and per-parameter squared norms within fp32 1e-4 of the reference, with the LM head
    fused (no [B, L, V] logits): every exact family's head is fusable, so the default must have fused it."""
    outcome = run_entry(BY_NAME[name], layout)
    assert outcome.status == "exact", f"{name} ({layout} padding): expected exact, got {outcome.describe()}"
    choice = vigor.head_scoring.LAST_HEAD
    assert choice.fused, f"{name}: the LM head was not fused ({choice.reason})"


@pytest.mark.parametrize("name", ["qwen2-tied", "llama", "gpt2", "gemma2", "cohere", "llama-lora"])
def test_family_is_exact_with_materialized_head(name):
    """The logits path (head="materialized", kept for unfusable heads and comparisons) stays exact, tied and
    untied, with soft-capping, logit scaling and LoRA."""
    outcome = run_entry(BY_NAME[name], "left", head="materialized")
    assert outcome.status == "exact", f"{name}, materialized head: {outcome.describe()}"
    assert not vigor.head_scoring.LAST_HEAD.fused


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", REFUSED)
def test_family_is_refused_with_reason(name, layout):
    """A refused family raises UnsupportedModuleError naming the culprit; returning numbers instead is
    `wrong` if they disagree with the reference, and a stale corpus entry if they agree."""
    entry = BY_NAME[name]
    outcome = run_entry(entry, layout)
    if outcome.status == "exact":
        pytest.fail(f"{name} is now exact: set its corpus status to 'exact' and regenerate ({REGENERATE})")
    assert outcome.status == "refused", f"{name} ({layout} padding): expected refused, got {outcome.describe()}"
    assert re.search(entry.match, outcome.message, re.IGNORECASE), (
        f"{name}: the refusal does not name the documented reason /{entry.match}/: {outcome.message}"
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", REFUSED)
def test_refused_family_is_exact_with_fallback(name, layout):
    """fallback=True is documented as exact on whatever the rules refuse."""
    outcome = run_entry(BY_NAME[name], layout, fallback=True)
    assert outcome.status == "exact", f"{name} ({layout} padding, fallback=True): {outcome.describe()}"


def test_docs_table_lists_the_corpus():
    """docs/model-families.md is generated from the corpus; a family added or renamed without
    regenerating it fails here (the numbers themselves are refreshed by the generator)."""
    rows = [line.split("|")[1:3] for line in DOCS.read_text().splitlines() if line.startswith("| ")]
    listed = {name.strip(): status.strip() for name, status in rows[1:]}  # rows[0] is the header
    assert list(listed) == [e.name for e in CORPUS], f"stale docs table: run {REGENERATE}"
    assert set(listed.values()) <= {"exact", "refused", "wrong", "crash"}
