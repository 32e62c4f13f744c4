"""Built-in synthetic tasks, generated offline from a seed, deduplicated, split into train and test without
overlap, and written with ``datasets`` as JSONL. Each row has ``question``, ``answer`` (as text) and
``solution`` (the target of supervised warm-up, ``vigor sft``).

- ``arithmetic``: multi-step word problems (``ops`` steps); answers checked by math-verify.
- ``addition``: ``a+b`` of two 3-digit numbers, answered with the digits of the sum reversed (units first,
  the order a small model can compute in). Half the solutions show the column sums first
  (``"14 13 07:437"`` for 478+256), half give the answer alone (``"437"``), so completion lengths vary
  inside a GRPO group and VIGOR's sqrt(T) matters. Checked by exact match of the text after the last ``:``
  (math-verify would equal ``"037"`` with ``"37"``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea", "Max", "Nia")
ITEMS = ("apples", "marbles", "stamps", "coins", "books", "shells", "cards", "pens")
GAIN = ("gets {n} more", "buys {n} more", "finds {n} more", "is given {n} more")
LOSS = ("gives away {n}", "loses {n}", "sells {n}", "trades away {n}")
TIMES = {2: "doubles", 3: "triples"}


def arithmetic_problem(rng: random.Random, max_ops: int) -> dict[str, object]:
    """One problem of 1..max_ops steps; every intermediate count stays a non-negative integer below 1000."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(rng.randint(1, max_ops)):
        kind = rng.choice(("add", "sub", "mul") if value < 100 else ("add", "sub"))
        if kind == "sub" and value < 2:
            kind = "add"
        if kind == "add":
            n = rng.randint(1, 20)
            sentences.append(f"Then {name} {rng.choice(GAIN).format(n=n)}.")
            steps.append(f"{value} + {n} = {value + n}")
            value += n
        elif kind == "sub":
            n = rng.randint(1, value - 1)
            sentences.append(f"Then {name} {rng.choice(LOSS).format(n=n)}.")
            steps.append(f"{value} - {n} = {value - n}")
            value -= n
        else:
            k = rng.choice(tuple(TIMES))
            sentences.append(f"Then the number of {item} {TIMES[k]}.")
            steps.append(f"{value} * {k} = {value * k}")
            value *= k
    sentences.append(f"How many {item} does {name} have now?")
    return {
        "question": " ".join(sentences),
        "answer": str(value),
        "solution": ". ".join(steps) + f". The answer is {value}.",
        "ops": len(steps),
    }


def addition_problem(rng: random.Random, digits: int = 3) -> dict[str, object]:
    """``a+b`` with ``digits``-digit operands; the answer is the sum's digits reversed."""
    a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
    columns, carry = [], 0
    for da, db in zip(reversed(str(a)), reversed(str(b)), strict=True):
        total = int(da) + int(db) + carry
        columns.append(f"{total:02d}")
        carry = total // 10
    answer = str(a + b)[::-1]
    worked = rng.random() < 0.5
    return {
        "question": f"{a}+{b}",
        "answer": answer,
        "solution": f"{' '.join(columns)}:{answer}" if worked else answer,
        "worked": worked,
    }


def final_answer(completion: str) -> str:
    """The addition task's answer in a completion: the text after the last ``:``, stripped."""
    return completion.rpartition(":")[2].strip()


def exact_answer_rewards(completions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """1.0 where :func:`final_answer` equals the reference answer exactly, else 0.0."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return torch.tensor([float(final_answer(c) == str(a)) for c, a in zip(completions, answers, strict=True)])


def answer_checker(task: str | None) -> Callable[[Sequence[str], Sequence[str]], torch.Tensor]:
    """How the accuracy metrics and the ``math`` reward check answers: exact match for ``addition``,
    math-verify otherwise."""
    if task == "addition":
        return exact_answer_rewards
    from vigor.rewards import math_answer_rewards

    return math_answer_rewards


def task_splits(task: str, seed: int, num_train: int, num_test: int, max_ops: int = 3) -> tuple[list[dict], list[dict]]:
    """Distinct problems from ``seed``: the first ``num_test`` go to test, the next ``num_train`` to train
    (so the test split does not depend on ``num_train``)."""
    if task == "arithmetic":
        draw = lambda rng: arithmetic_problem(rng, max_ops)
    elif task == "addition":
        draw = addition_problem
    else:
        raise ValueError(f"unknown task {task!r}: use 'arithmetic' or 'addition'")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    tries = 0
    while len(rows) < num_train + num_test:
        tries += 1
        if tries > 50 * (num_train + num_test) + 1000:
            raise ValueError(f"could not draw {num_train + num_test} distinct {task} problems (max_ops={max_ops})")
        row = draw(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows[num_test:], rows[:num_test]


def arithmetic_splits(seed: int, num_train: int, num_test: int, max_ops: int = 3) -> tuple[list[dict], list[dict]]:
    return task_splits("arithmetic", seed, num_train, num_test, max_ops)


def _write_jsonl(rows: list[dict], path: Path) -> None:
    from datasets import Dataset

    from vigor.trainer.data import quiet_datasets

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with quiet_datasets():
        Dataset.from_list(rows).to_json(str(tmp), lines=True)
    os.replace(tmp, path)


def write_task(
    task: str, out_dir: str | Path, seed: int, num_train: int, num_test: int, max_ops: int = 3
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``out_dir`` (each atomically); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = task_splits(task, seed, num_train, num_test, max_ops)
    paths = out / "train.jsonl", out / "test.jsonl"
    _write_jsonl(train, paths[0])
    _write_jsonl(test, paths[1])
    return paths


def write_arithmetic_task(
    out_dir: str | Path, seed: int, num_train: int, num_test: int, max_ops: int = 3
) -> tuple[Path, Path]:
    return write_task("arithmetic", out_dir, seed, num_train, num_test, max_ops)
