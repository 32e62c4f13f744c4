"""The real-model diagnostic's questions (vigor.study.questions): right answers, the mix asked for, a checker
that reads the final number the way a reader would."""

from __future__ import annotations

import re

import pytest

from vigor.study.questions import arithmetic_questions, last_integer, number_words


def test_number_words_spot_values_and_range():
    assert [number_words(n) for n in (0, 7, 13, 20, 42, 90, 99)] == [
        "zero", "seven", "thirteen", "twenty", "forty-two", "ninety", "ninety-nine",
    ]  # fmt: skip
    assert len({number_words(n) for n in range(100)}) == 100
    with pytest.raises(ValueError, match=r"0\.\.99"):
        number_words(100)


def test_questions_answers_and_mix():
    """Every answer is the arithmetic of its own text; digits/words and 1/2-digit each make half."""
    words = {number_words(n): n for n in range(100)}
    qs = arithmetic_questions(40, seed=3)
    assert len({q.text for q in qs}) == 40
    for q in qs:
        m = re.fullmatch(r"What is (\S+) (\+|-|plus|minus) (\S+)\?", q.text)
        assert m, q.text
        a, op, b = m.groups()
        a, b = (words[a], words[b]) if q.words else (int(a), int(b))
        assert q.answer == (a + b if op in ("+", "plus") else a - b) >= 0
        assert max(a, b) >= 10 if q.digits == 2 else max(a, b) <= 9
    assert sum(q.words for q in qs) == 20 and sum(q.digits == 2 for q in qs) == 20
    assert arithmetic_questions(40, seed=3) == qs and arithmetic_questions(40, seed=4) != qs


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("12 + 35 = 47.", 47),
        ("The answer is 8", 8),
        ("35-12=23", 23),
        ("It is -3.", -3),
        ("1,234 apples", 1234),
        ("about 3.5 apples", None),
        ("seven", None),
        ("", None),
    ],
)
def test_last_integer(text, want):
    assert last_integer(text) == want
