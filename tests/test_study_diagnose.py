"""The signal diagnostic: within-group AUROC and its interval, and sampling + scoring groups from a model."""

from __future__ import annotations

import numpy as np
import pytest

from vigor.study.diagnose import (
    SCORES,
    DiagnosticItem,
    auroc_within_groups,
    diagnostic_report,
    format_report,
    group_aurocs,
    sample_and_score,
)


def mixed_labels(groups: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.random((groups, size)) < 0.5
    labels[:, 0], labels[:, 1] = True, False  # every group mixed
    return labels


def test_separable_score_has_auroc_one():
    """A score that is higher on every correct completion than on every wrong one of its group gets 1,
    whatever the scale across groups (guards the within-group comparison and its direction)."""
    correct = mixed_labels(40, 8, seed=0)
    offsets = np.arange(40)[:, None] * 10.0  # groups on different scales: only within-group order counts
    scores = correct.astype(float) + offsets + np.random.default_rng(1).random((40, 8)) * 0.5
    summary = auroc_within_groups(scores, correct)
    assert summary.mean == 1.0 and summary.low == 1.0 and summary.high == 1.0 and summary.groups == 40
    flipped = auroc_within_groups(-scores, correct)
    assert flipped.mean == 0.0


def test_random_score_is_near_half_and_interval_covers_it():
    """A score independent of correctness averages 0.5, and its 95% bootstrap interval covers 0.5 in about
    95% of independent draws (checked on 20 fixed draws: at least 16 must cover; P(fewer) < 0.3% nominally)."""
    covered, means = 0, []
    for seed in range(20):
        correct = mixed_labels(100, 8, seed=seed)
        scores = np.random.default_rng(100 + seed).random((100, 8))
        summary = auroc_within_groups(scores, correct, resamples=500, seed=seed)
        covered += summary.low < 0.5 < summary.high
        means.append(summary.mean)
        assert summary.high - summary.low < 0.2
    assert abs(np.mean(means) - 0.5) < 0.02
    assert covered >= 16


def test_ties_count_half_and_unmixed_groups_are_left_out():
    """Ties (e.g. two invalid completions at -inf) count one half; all-right or all-wrong groups carry no
    ranking signal and are excluded rather than counted as 0.5."""
    scores = np.array([[1.0, 1.0], [-np.inf, -np.inf], [3.0, 1.0], [0.0, 1.0]])
    correct = np.array([[True, False], [True, False], [True, True], [False, False]])
    assert group_aurocs(scores, correct).tolist() == [0.5, 0.5]
    assert auroc_within_groups(scores[2:], correct[2:]).groups == 0
    with pytest.raises(ValueError, match="NaN"):
        group_aurocs(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(ValueError, match="groups, group_size"):
        group_aurocs(np.zeros(4), np.zeros(4, dtype=bool))


def test_sample_and_score_on_a_tiny_model():
    """End to end on a random tiny Qwen2 with the character tokenizer: shapes, checker results, VIGOR's
    score equals -sqrt(T) times the engine's norm, invalid completions rank last, and the run is seeded."""
    from vigor.engine import per_sample_grad_norms
    from vigor.packing import pack_completions
    from vigor.tiny import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model("qwen2", vocab=len(tok), hidden=32, layers=2, heads=4, seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    items = [DiagnosticItem(f"{i}+{i}=", lambda text: "a" in text) for i in range(3)]
    run = lambda: sample_and_score(model, tok, items, 4, max_new_tokens=6, groups_per_batch=2, progress=False)
    samples = run()
    assert samples.correct.shape == (3, 4) and set(samples.scores) == set(SCORES)
    assert samples.correct.tolist() == [[("a" in t) for t in g] for g in samples.completions]
    for name in SCORES[:-1]:
        assert np.all(np.isneginf(samples.scores[name][~samples.valid]))
        assert np.all(np.isfinite(samples.scores[name][samples.valid]))
    assert np.array_equal(run().scores["vigor"], samples.scores["vigor"], equal_nan=True)  # seeded
    # recompute VIGOR for the valid completions of group 0 from their text
    g = 0
    rows = [j for j in range(4) if samples.valid[g, j]]
    if rows:
        prompt = tok(items[g].prompt)["input_ids"]
        comps = [tok(samples.completions[g][j])["input_ids"] + [tok.eos_token_id] for j in rows]
        packed = pack_completions([prompt] * len(rows), comps, pad_id=tok.pad_token_id)
        ids, attn, loss = packed.input_ids, packed.attention_mask, packed.loss_mask
        norms = per_sample_grad_norms(model, ids, attn, loss).double()
        expected = -(loss.sum(1).double().sqrt() * norms).numpy()
        np.testing.assert_allclose(samples.scores["vigor"][g, rows], expected, rtol=1e-4)
    report = diagnostic_report(samples, resamples=200)
    assert report["groups"] == 3 and set(report["auroc"]) == set(SCORES)
    assert "| vigor |" in format_report(report)


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("--groups", "0", "--groups >= 1"),
        ("--group-size", "1", "--group-size >= 2"),
        ("--groups-per-batch", "0", "--groups-per-batch >= 1"),
    ],
)
def test_diagnose_options_are_checked_before_any_work(capsys, option, value, problem):
    """Guards the one check shared by `vigor study diagnose` and scripts/smollm2_diagnose.py: a bad sampling
    option is a one-line error and exit 2 (0 groups per batch would otherwise loop forever or divide by 0)."""
    from vigor.cli import main

    assert main(["study", "diagnose", "--model", "checkpoints/addition-sft", option, value]) == 2
    assert problem in capsys.readouterr().err
