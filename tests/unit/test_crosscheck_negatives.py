"""Constructed wrong answers: made only from the rows given, on their side of the train/eval split,
named by the rows they came from, and counted in the calibrator's metadata."""

from __future__ import annotations

import random

from jury.crosscheck import CheckRow, load_rows, negatives_mix, with_negatives
from jury.negatives import CROSS_DOMAIN, NegativesConfig, constructed_negatives, is_constructed, perturb


def _rows(shared_data):
    return load_rows(shared_data / "crosscheck_dev.jsonl")


def test_negatives_come_only_from_training_rows_and_stay_on_their_side(shared_data):
    rows = _rows(shared_data)
    train = [r for r in rows if not r.is_test()][:800]
    made = constructed_negatives(train, NegativesConfig(seed=1))
    by_digest = {r.digest(): r for r in train}
    test_answers = {r.answer for r in rows if r.is_test()} - {r.answer for r in train}
    assert made and all(r.label == 0 and is_constructed(r.source) for r in made)
    for row in made:
        assert row.origin() in by_digest  # its id names the training row it was made from
        assert not row.is_test()  # so the train bucket keeps it
        assert row.question == by_digest[row.origin()].question
        if "~swap~" in row.id:  # the answer moved here is a training row's, never a test row's
            other = row.id.split("~swap~")[1]
            assert other in by_digest and row.answer == by_digest[other].answer
            assert row.answer not in test_answers
    kinds = {r.source for r in made}
    assert CROSS_DOMAIN in kinds and any(k.startswith("swapped_mmlu") for k in kinds)
    assert any(k.startswith("perturbed_") for k in kinds)


def test_swaps_keep_the_source_and_cross_swaps_change_the_domain(shared_data):
    train = [r for r in _rows(shared_data) if not r.is_test()][:800]
    by_digest = {r.digest(): r for r in train}
    for row in constructed_negatives(train):
        if "~swap~" not in row.id:
            continue
        origin, other = by_digest[row.origin()], by_digest[row.id.split("~swap~")[1]]
        if row.source == CROSS_DOMAIN:
            assert other.domain != origin.domain if origin.domain else other.source != origin.source
        else:
            assert row.source == "swapped_" + origin.source == "swapped_" + other.source
        assert other.question != origin.question


def test_mix_is_counted_and_shares_are_honoured(shared_data):
    train = [r for r in _rows(shared_data) if not r.is_test()][:600]
    correct = sum(r.label for r in train)
    rows = with_negatives(train, NegativesConfig(swapped_share=0.5, cross_share=0.25, perturbed_share=0.0))
    mix = negatives_mix(rows)
    assert mix["labelled"] == len(train) and mix["perturbed"] == 0
    assert 0.4 * correct <= mix["swapped"] <= 0.5 * correct + 1
    assert 0.2 * correct <= mix["swapped_cross"] <= 0.25 * correct + 1
    assert with_negatives(train, None) == train


def test_perturbation_changes_one_fact():
    rng = random.Random(0)
    assert perturb("Water boils at 100 degrees Celsius.", rng) != "Water boils at 100 degrees Celsius."
    assert "1929" not in perturb("The Great Depression began in 1929.", rng, years=["1929", "1066", "1945"])
    changed = perturb("The capital of Australia is Canberra.", rng, names=["Canberra", "Paris"])
    assert changed == "The capital of Australia is Paris."
    assert perturb("yes", rng) is None


def test_test_rows_make_test_negatives():
    rows = [
        CheckRow(
            question=f"What is fact {i}?",
            answer=f"Fact {i} is {i * 7}.",
            label=1,
            source="s",
            domain="d" if i % 2 else "e",
            id=f"id{i}",
        )
        for i in range(200)
    ]
    test = [r for r in rows if r.is_test()]
    assert all(n.is_test() for n in constructed_negatives(test))
