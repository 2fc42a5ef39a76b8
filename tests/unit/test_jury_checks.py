"""Checks of an answer's text: calculations redone exactly, only where the page shows them whole."""

from __future__ import annotations

import pytest

from jury.calibrator import CHECK_FEATURES
from jury.checks import arithmetic_slips, calculations, equation_in, text_checks, unsolved_equation


@pytest.mark.parametrize(
    ("text", "slips"),
    [
        ("12 * 3 = 36, so she has 36 + 4 = 40 apples.", 0),
        ("12 * 3 = 36, so she has 36 + 4 = 41 apples.", 1),
        ("Goldy gave 3 + 4 = 7 sacks.\nShe kept 20 - 7 = 12 sacks.", 1),
        ("The fee is $350 000 x 5/100 = $17 500.", 0),
        ("Together 1,000 + 2,500 = 3,500, and", 0),
        ("20% of them: 50 * 20% = 10 people", 0),
        ("Each gets 96/6 = 16 cookies", 0),
        ("It costs $0.25 * 16 = $4.00.", 0),
        ("The milk was $0.5 - $0.4 = $0.5 cheaper.", 1),
        ("He walks 10 x 2 = 20 miles", 0),
        ("It took 450/70 = 6.43 hours", 0),
        ("It took 450/70 = 6 hours", 0),  # rounded to the digits it shows
        ("It took 450/70 = 7 hours", 1),
        ("From 2020-2021 = 1 year", 0),  # a difference written without its sign
        ("The price is x = 19.50 / 0.75 = 26.", 0),
    ],
)
def test_stated_calculations_are_redone(text: str, slips: int):
    assert arithmetic_slips(text) == slips


@pytest.mark.parametrize(
    "text",
    [
        "12 kg * 1/3 = 4 kg",  # the left side begins before "kg": 1/3 = 4 is not what it says
        "the temperature rose to - 6 + 3 = -3 degrees",
        "LCM = 2^2 × 3^2 × 5 = 180",  # powers are not read
        "36\n- 9 + 27 = 54",  # a line break ends a calculation
        "x + 4 = 9",  # algebra, not arithmetic
        "The answer is 42.",
    ],
)
def test_calculations_not_all_on_the_page_are_skipped(text: str):
    assert calculations(text) == []


def test_a_division_by_zero_is_not_a_slip_and_not_an_error():
    assert arithmetic_slips("5 / 0 = 7") == 0


@pytest.mark.parametrize(
    ("question", "answer", "unsolved"),
    [
        ("Solve 2x + 3 = 11.", "x = 4", False),
        ("Solve 2x + 3 = 11.", "x = 7", True),
        ("If 3(y - 1) = 12, what is y?", "y is 5", False),
        ("If 3(y - 1) = 12, what is y?", "So y = 4.", True),
        ("Solve for x: 5x - 2 = 3x + 6", "The answer is x = 4.", False),
        ("Solve x^2 = 16 for positive x.", "x = 5", True),
        ("Find n if n/4 = 2.5.", "n = 10", False),
        ("Solve 2x + 3 = 11.", "It is four.", False),  # no value stated for x: nothing to check
        ("Solve 2x + 3y = 11.", "x = 7", False),  # two unknowns: not checked
        ("What is the capital of France?", "x = 7", False),
    ],
)
def test_a_stated_solution_is_substituted_into_the_question_equation(question: str, answer: str, unsolved: bool):
    assert unsolved_equation(question, answer) == unsolved


def test_the_equation_is_read_from_the_words_around_it():
    assert equation_in("Solve for x: 5x - 2 = 3x + 6 please") == ("5 * x - 2", "3 * x + 6", "x")
    assert equation_in("Is 2 + 2 = 4?") is None  # no unknown
    assert equation_in("a = b = c") is None


def test_text_checks_are_the_calibrator_check_columns():
    assert tuple(text_checks("What is 2 + 2?", "2 + 2 = 5")) == CHECK_FEATURES
    assert text_checks("What is 2 + 2?", "2 + 2 = 5") == {"arithmetic_slip": 1.0}
    assert text_checks("What is 2 + 2?", "2 + 2 = 4") == {"arithmetic_slip": 0.0}
    assert text_checks("Solve 2x + 3 = 11.", "x = 7") == {"arithmetic_slip": 1.0}
