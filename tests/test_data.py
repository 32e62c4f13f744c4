"""The synthetic arithmetic task and prompt loading from local JSONL / parquet files."""

from __future__ import annotations

import json
import re

import pytest

from vigor.tiny import char_tokenizer
from vigor.trainer.config import DataSettings
from vigor.trainer.data import DataError, load_prompts, step_indices
from vigor.trainer.rewards import math_answer_rewards
from vigor.trainer.tasks import arithmetic_splits, write_arithmetic_task


def test_arithmetic_task_is_seeded_split_and_correct():
    train, test = arithmetic_splits(seed=3, num_train=300, num_test=50, max_ops=3)
    assert (train, test) == arithmetic_splits(seed=3, num_train=300, num_test=50, max_ops=3)
    assert arithmetic_splits(seed=4, num_train=300, num_test=50)[0] != train
    questions = [r["question"] for r in train + test]
    assert len(set(questions)) == len(questions)  # no duplicates, no test problem in train
    assert {r["ops"] for r in train} == {1, 2, 3}
    for row in train + test:
        value = int(re.match(r"\w+ has (\d+) ", row["question"]).group(1))
        for step in row["solution"].split(". ")[:-1]:  # replay the worked steps
            a, op, b, _, c = step.split()
            assert int(a) == value and int(c) == {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
            value = int(c)
        assert row["answer"] == str(value) and value >= 0
    # math-verify accepts the worked solution and rejects a wrong final number
    answers = [r["answer"] for r in test[:10]]
    assert math_answer_rewards([r["solution"] for r in test[:10]], answers).tolist() == [1.0] * 10
    wrong = [f"The answer is {int(a) + 1}." for a in answers]
    assert math_answer_rewards(wrong, answers).tolist() == [0.0] * 10


def test_written_task_reads_back_through_datasets(tmp_path):
    train_path, test_path = write_arithmetic_task(tmp_path, seed=0, num_train=20, num_test=5, max_ops=2)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"question", "answer", "solution", "ops"}
    prompts = load_prompts(test_path, "data.test_file", DataSettings(prompt_template="Q: {question}\nA:"), None)
    assert len(prompts) == 5 and prompts.texts[0].startswith("Q: ") and prompts.texts[0].endswith("\nA:")
    assert prompts.answers == [json.loads(line)["answer"] for line in test_path.read_text().splitlines()]
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_parquet_and_chat_template(tmp_path):
    from datasets import Dataset

    path = tmp_path / "p.parquet"
    Dataset.from_list([{"problem": "2+3?", "solution": "5"}, {"problem": "4*2?", "solution": "8"}]).to_parquet(
        str(path)
    )
    cfg = DataSettings(prompt_column="problem", answer_column="solution", chat_template=True, system_prompt="Be brief.")
    prompts = load_prompts(path, "data.train_file", cfg, char_tokenizer())
    assert prompts.texts == [
        "<|system|>Be brief.\n<|user|>2+3?\n<|assistant|>",
        "<|system|>Be brief.\n<|user|>4*2?\n<|assistant|>",
    ]
    assert prompts.answers == ["5", "8"] and prompts.columns["problem"] == ["2+3?", "4*2?"]
    assert prompts.select([1]).texts == [prompts.texts[1]] and prompts.select([1]).answers == ["8"]


def test_data_errors_name_the_file_and_column(tmp_path):
    cfg = DataSettings()
    with pytest.raises(DataError, match=r"data.train_file: data file '.*nope.jsonl' does not exist"):
        load_prompts(tmp_path / "nope.jsonl", "data.train_file", cfg, None)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"is not a .jsonl, .json or .parquet file"):
        load_prompts(csv, "data.train_file", cfg, None)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"prompt_template names column 'question' .* it has \['prompt', 'answer'\]"):
        load_prompts(path, "data.train_file", cfg, None)
    with pytest.raises(DataError, match=r"no column 'label' \(data.answer_column"):
        load_prompts(path, "data.train_file", DataSettings(prompt_template="{prompt}", answer_column="label"), None)
    assert load_prompts(path, "k", DataSettings(prompt_template="{prompt}=", answer_column=None), None).answers is None
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1", "answer": \n')
    with pytest.raises(DataError, match=r"cannot read '.*broken.jsonl' as json"):
        load_prompts(broken, "data.train_file", cfg, None)


def test_step_indices_cover_each_epoch_once_and_depend_only_on_the_step():
    seen = [i for s in range(5) for i in step_indices(s, per_step=4, size=10, seed=7)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a fresh order each epoch
    assert step_indices(3, 4, 10, 7) == seen[12:16] and step_indices(3, 4, 10, 8) != seen[12:16]
