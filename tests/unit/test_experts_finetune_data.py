"""Fine-tuning input: bad data files give errors naming the line; splits are seeded."""

from __future__ import annotations

import pytest

from experts.finetune import QAPair, example_queries, load_pairs, split_pairs
from registry.errors import MoseError


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "answer": "a"}\n{not json}\n', "data.jsonl line 2: not valid JSON"),
        ('{"question": "q"}\n', "data.jsonl line 1: needs non-empty string fields 'question' and 'answer'"),
        ('{"question": " ", "answer": "a"}\n', "data.jsonl line 1: needs non-empty string fields"),
        ('["q", "a"]\n', "data.jsonl line 1: needs non-empty string fields"),
    ],
)
def test_bad_rows_are_refused_with_the_line_number(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(MoseError, match=message):
        load_pairs(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MoseError, match=r"nope.jsonl: data file not found"):
        load_pairs(tmp_path / "nope.jsonl")


def test_split_is_seeded_and_disjoint():
    pairs = [QAPair(f"q{i}", f"a{i}") for i in range(50)]
    train, heldout = split_pairs(pairs, 8, seed=3)
    assert (train, heldout) == split_pairs(pairs, 8, seed=3)
    assert split_pairs(pairs, 8, seed=4)[1] != heldout
    assert len(heldout) == 8 and not set(map(id, heldout)) & set(map(id, train)) and len(train) == 42
    with pytest.raises(MoseError, match="need at least 10 question/answer rows, got 5"):
        split_pairs(pairs[:5], 8, seed=0)


def test_example_queries_are_distinct_questions_from_the_data():
    pairs = [QAPair(f"question {i % 30}", "a") for i in range(90)]
    queries = example_queries(pairs, 24, seed=0)
    assert len(queries) == 24 == len(set(queries)) and all(q.startswith("question ") for q in queries)
    with pytest.raises(MoseError, match="only 10 distinct questions"):
        example_queries(pairs[:10], 24, seed=0)
