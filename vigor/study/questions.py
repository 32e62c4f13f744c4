"""Simple questions with checkable answers for a real instruct model, generated offline.

One- and two-digit additions and subtractions, asked in digits ("What is 23 + 14?") or in words ("What is
twenty-three plus fourteen?"): easy enough that a small instruct model (SmolLM2-135M) is right some of the
time, hard enough that it is not always right, so that GRPO groups hold both right and wrong answers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
_ONES += "seventeen eighteen nineteen"
ONES = _ONES.split()
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_INTEGER = re.compile(r"(?<![\w.])-?\d+(?![\d.]*\d)")


def number_words(n: int) -> str:
    """0..99 in English words: 7 -> "seven", 42 -> "forty-two"."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words covers 0..99, got {n}")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


@dataclass(frozen=True)
class Question:
    text: str
    answer: int
    digits: int  # 1 or 2: the larger operand's number of digits
    words: bool  # asked in words


def arithmetic_questions(count: int, seed: int = 0) -> list[Question]:
    """``count`` distinct questions: half with one-digit operands, half with two-digit ones; half in words.
    Subtractions never go below zero."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Question] = []
    while len(out) < count:
        i = len(out)
        digits, words, op = 1 + i % 2, (i // 2) % 2 == 1, rng.choice("+-")
        hi = 9 if digits == 1 else 99
        a, b = rng.randint(1 if digits == 1 else 10, hi), rng.randint(1, hi)
        if op == "-" and b > a:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        if words:
            text = f"What is {number_words(a)} {'plus' if op == '+' else 'minus'} {number_words(b)}?"
        else:
            text = f"What is {a} {op} {b}?"
        if text not in seen:
            seen.add(text)
            out.append(Question(text, answer, digits, words))
    return out


def last_integer(text: str) -> int | None:
    """The last integer written in digits in ``text`` ("12 + 35 = 47." -> 47), or None. Decimals don't count."""
    found = _INTEGER.findall(text.replace(",", ""))
    return int(found[-1]) if found else None
