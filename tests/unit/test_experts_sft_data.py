"""Chat-shaped training data: option fragments become answers, echo rows go, the held-out split is
fixed by the question's hash, and the degenerate-answer checks say why an answer is bad."""

from __future__ import annotations

import json
import random

import pytest

from experts.demo import load_vertical
from experts.finetune import QAPair
from experts.sft_data import (
    degenerate,
    echoes,
    heldout_bucket,
    loops,
    option_answer,
    shape_pair,
    solution_answer,
    split_by_hash,
)


@pytest.mark.parametrize(
    ("question", "option", "answer"),
    [
        (
            "Averaging the output of multiple decision trees helps _.",
            "Decrease variance",
            "Averaging the output of multiple decision trees helps Decrease variance.",
        ),
        (
            "The term 'emotion work' (Hochschild 1983) refers to:",
            "the techniques used to manage emotions",
            "The term 'emotion work' (Hochschild 1983) refers to the techniques used to manage emotions.",
        ),
        ("In what year did the Great Depression begin?", "1929", "1929."),
        (
            "Which of the following statements about lipids is correct?",
            "Phospholipids are water soluble.",
            "Phospholipids are water soluble.",
        ),
        ("Which of the following is true?", "True, False", None),
        ("Why did the author write this?", "to amuse", None),
        # an option that points at the others, or a row of labels, says nothing alone
        ("The phenomenon of interference occurs for", "Both of these", None),
        (
            "For which of these two scenarios does the main character do something clearly morally wrong? "
            "Scenario 1 | I hunted a giraffe with my bow. Scenario 2 | I threw confetti.",
            "Wrong, Not wrong",
            None,
        ),
        # a stem completed with one new word only copies the question back
        ("Corresponding to the practical aim of moral theory is the principle of", "practical guidance", None),
        (
            "Based on the characteristic population curves that result from plotting population growth of a "
            "species, the most effective means of controlling the mosquito population is to",
            "reduce the carrying capacity of the environment",
            None,
        ),
    ],
)
def test_options_become_answers_that_stand_alone(question, option, answer):
    assert option_answer(question, option) == answer


def test_mmlu_row_is_shaped_and_gsm8k_solution_ends_with_its_answer():
    pair = shape_pair("The Krebs cycle in humans occurs in the", "mitochondrial matrix", "mmlu/college_biology")
    assert pair is not None and pair.answer == "The Krebs cycle in humans occurs in the mitochondrial matrix."
    solution = "The gas cost 8*3.5=$<<8*3.5=28>>28\nSo in total he paid 150+28=$<<150+28=178>>178\n#### 178"
    assert solution_answer(solution) == "The gas cost 8*3.5=$28\nSo in total he paid 150+28=$178\nThe answer is 178."


def test_echo_rows_are_dropped_and_restated_openings_removed():
    assert shape_pair("Is Septo-optic dysplasia inherited ?", "Is septo-optic dysplasia inherited?", "medquad") is None
    pair = shape_pair(
        "What are the symptoms of Dowling-Degos disease ?",
        "What are the signs and symptoms of Dowling-Degos disease? Dark patches appear in skin folds.",
        "medquad",
    )
    assert pair is not None and pair.answer == "Dark patches appear in skin folds."
    kept = shape_pair(
        "What is the most popular sport in Japan?", "Baseball is the most popular sport in Japan", "truthfulqa"
    )
    assert kept is not None and kept.answer == "Baseball is the most popular sport in Japan."


@pytest.mark.parametrize(
    ("question", "answer", "why"),
    [
        ("What causes high blood pressure?", "What causes high blood pressure?", "echo"),
        ("What causes high blood pressure?", "  ...  ", "empty"),
        ("Is it wrong?", "Not wrong, not wrong, not wrong, not wrong.", "loop"),
        (
            "Explain inflation.",
            "Prices rise. Money buys less over time. Prices rise. Money buys less over time.",
            "loop",
        ),
        ("What causes high blood pressure?", "Being overweight, a salty diet and too little exercise raise it.", None),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", None),
        ("Explain what inflation is.", "The answer is inflation.", "echo"),
    ],
)
def test_degenerate_answers_are_named(question, answer, why):
    assert degenerate(question, answer) == why


def test_a_long_answer_with_repeated_function_words_is_not_a_loop():
    text = (
        "High blood pressure is caused by many things. It is more common in older adults, and it is more "
        "common in people who smoke. A diet high in salt raises it, and so does stress."
    )
    assert not loops(text) and not echoes("What causes high blood pressure?", text)


def test_split_is_fixed_by_question_hash_and_disjoint():
    pairs = [QAPair(f"question number {i}?", f"answer {i}") for i in range(2000)]
    train, heldout = split_by_hash(pairs)
    shuffled = pairs[:]
    random.Random(5).shuffle(shuffled)
    train2, heldout2 = split_by_hash(shuffled)
    assert heldout == heldout2 and set(train) == set(train2)
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert 150 <= len(heldout) <= 250  # 10 % of 2,000
    # the same question with other casing or spacing stays on the same side
    assert heldout_bucket(heldout[0].question.upper() + "  ") is True


def test_vertical_split_holds_at_least_50_rows_and_never_trains_on_them(shared_data):
    for vertical in ("general_knowledge", "law"):
        data = load_vertical(shared_data, vertical)
        assert len(data.heldout) >= 50
        assert not {p.question for p in data.train} & {p.question for p in data.heldout}
        assert load_vertical(shared_data, vertical, seed=3).heldout == data.heldout


def test_vertical_data_errors_name_the_line(tmp_path):
    from registry.errors import MoseError

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "law.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n{oops\n")
    with pytest.raises(MoseError, match="law.jsonl line 2"):
        load_vertical(tmp_path, "law")
