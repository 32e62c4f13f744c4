"""The supervised warm-up stage (`vigor sft`): it learns, it stops by its rule, it resumes exactly, it exports a
model that `vigor train` can start from."""

from __future__ import annotations

import json

import pytest
import torch

from vigor.trainer.config import ConfigError
from vigor.trainer.metrics import read_metrics
from vigor.trainer.sft import SFTTrainer, load_sft_config, teacher_forced_loss
from vigor.trainer.tasks import addition_problem, exact_answer_rewards, final_answer


def tiny(tmp_path, name="sft", *extra):
    return load_sft_config(
        None,
        [
            f"run.dir={tmp_path / name}",
            "run.seed=3",
            "run.steps=12",
            "sft.batch_size=16",
            "optim.lr=3e-3",
            "run.progress=false",
            "plots.enabled=false",
            "eval.every=0",
            "model.hidden=32",
            "model.layers=1",
            "data.task=addition",
            "data.num_train=64",
            "data.num_test=8",
            "data.prompt_template='{question}='",
            *extra,
        ],
    )


def test_loss_decreases_on_a_fixed_seed(tmp_path):
    """Twelve steps of teacher forcing on a fixed seed lower the loss on the first batch (the model learns the
    targets' format at least), and the same seed gives the same losses."""
    trainer = SFTTrainer(tiny(tmp_path))
    first = trainer.batch(1)
    with torch.no_grad():
        before = float(teacher_forced_loss(trainer.model, *first))
    records = trainer.train()
    with torch.no_grad():
        after = float(teacher_forced_loss(trainer.model, *first))
    assert after < 0.8 * before
    again = SFTTrainer(tiny(tmp_path, "again")).train()
    assert [r["loss"] for r in records] == [r["loss"] for r in again]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Stopping at step 6 (checkpoint) and resuming to 12 gives the same losses and weights as one run
    (constant LR: the schedule's length is `steps`, which the split run changes)."""
    full = SFTTrainer(tiny(tmp_path, "full", "optim.schedule=constant"))
    full.train()
    SFTTrainer(tiny(tmp_path, "split", "optim.schedule=constant", "run.steps=6")).train()
    resumed = SFTTrainer(tiny(tmp_path, "split", "optim.schedule=constant", "run.resume=auto"))
    assert resumed.step == 6
    resumed.train()
    a = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert a == b
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_stops_at_the_accuracy_rule_and_exports(tmp_path):
    """With stop_at_accuracy the run ends at the first evaluation at or above it (the evaluation is replaced
    by one that reports 1.0 from step 4 on) and exports the model of that step as an HF directory with its
    tokenizer, which loads back to the same weights and tokens."""
    cfg = tiny(tmp_path, "stop", "eval.every=2", "sft.stop_at_accuracy=0.5", "run.steps=50")
    trainer = SFTTrainer(cfg)
    calls = []

    def fake_eval():
        calls.append(trainer.step)
        return {"eval/accuracy": 1.0 if trainer.step >= 4 else 0.0, "eval/completion_length": 3.0}

    trainer.evaluate = fake_eval
    records = trainer.train()
    assert records[-1]["step"] == 4 and records[-1]["stopped"] is True
    assert calls == [0, 2, 4]
    final = tmp_path / "stop" / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "sft_config.yaml").is_file()
    from transformers import AutoModelForCausalLM

    from vigor.trainer.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)
    assert load_tokenizer(str(final))("12+34=")["input_ids"] == trainer.tokenizer("12+34=")["input_ids"]


def test_bad_settings_fail_with_the_key():
    """Wrong settings name the key; a stop rule without evaluations is refused."""
    with pytest.raises(ConfigError, match=r"sft.stop_at_accuracy must be in \(0, 1\] or null, got 1.5"):
        load_sft_config(None, ["sft.stop_at_accuracy=1.5"])
    with pytest.raises(ConfigError, match=r"eval\.every must be >= 1 when sft\.stop_at_accuracy is set"):
        load_sft_config(None, ["sft.stop_at_accuracy=0.5", "eval.every=0"])
    with pytest.raises(ConfigError, match=r"unknown setting 'sft.batchsize' \(did you mean 'sft.batch_size'"):
        load_sft_config(None, ["sft.batchsize=3"])
    with pytest.raises(ConfigError, match=r"optim\.micro_batch_size is not used by vigor sft"):
        load_sft_config(None, ["optim.micro_batch_size=4"])


def test_addition_task_and_exact_check():
    """The addition rows are right (reversed sum; the worked form's column sums add up), and the exact check
    refuses what math-verify would accept (leading zeros, extra text)."""
    import random

    rng = random.Random(0)
    rows = [addition_problem(rng) for _ in range(200)]
    assert {r["worked"] for r in rows} == {True, False}
    for r in rows:
        a, b = map(int, r["question"].split("+"))
        assert r["answer"] == str(a + b)[::-1]
        assert final_answer(r["solution"]) == r["answer"]
    assert exact_answer_rewards(["12 03 05:532", "532", "0532", "53", "x532"], ["532"] * 5).tolist() == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    assert json.loads(json.dumps(rows[0])) == rows[0]
