"""Repetition, presence and frequency penalties on one row's logits."""

import pytest
import torch

from experts.decoding import new_row, penalise
from experts.types import SamplingParams


def _row(prompt=(), answer=(), **penalties):
    row = new_row(SamplingParams(**penalties), prompt)
    row.token_ids = list(answer)
    return row


def test_no_penalty_leaves_the_logits_alone():
    logits = torch.tensor([1.0, -2.0, 3.0])
    assert penalise(logits, _row((0, 1), (2,), repetition_penalty=1.0)) is logits


def test_repetition_penalty_shrinks_positive_and_grows_negative_logits_of_the_answers_tokens():
    logits = torch.tensor([2.0, -2.0, 3.0, 4.0])
    out = penalise(logits, _row(prompt=(0,), answer=(1, 1, 2), repetition_penalty=2.0))
    assert out.tolist() == [2.0, -4.0, 1.5, 4.0]  # answer tokens once each; the prompt's untouched
    assert logits.tolist() == [2.0, -2.0, 3.0, 4.0]  # the model's logits are not changed in place
    with_prompt = penalise(
        logits, _row(prompt=(0,), answer=(1,), repetition_penalty=2.0, repetition_penalty_prompt=True)
    )
    assert with_prompt.tolist() == [1.0, -4.0, 3.0, 4.0]


def test_presence_and_frequency_read_the_answer_only():
    logits = torch.zeros(4)
    out = penalise(
        logits, _row(prompt=(3,), answer=(0, 0, 1), repetition_penalty=1.0, presence_penalty=0.5, frequency_penalty=1.0)
    )
    assert out.tolist() == pytest.approx([-2.5, -1.5, 0.0, 0.0])


def test_the_penalty_on_prompt_and_answer_matches_hugging_face():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(50)
    prompt, answer = (3, 7, 7, 11), (11, 20, 3)
    ours = penalise(logits, _row(prompt, answer, repetition_penalty=1.3, repetition_penalty_prompt=True))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + answer]), logits.clone()[None])[0]
    assert torch.allclose(ours, theirs)
    assert torch.argmax(ours) == torch.argmax(theirs)
