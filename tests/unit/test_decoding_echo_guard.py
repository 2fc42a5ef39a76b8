"""The echo guard: end-of-turn is held while an answer only restates its question."""

import torch

from experts.decoding import advance, hold_echo, new_row
from experts.sft_data import asked_words, brings_new_word, echoes
from experts.types import ChatMessage, GenerationRequest, SamplingParams

EOS, SPECIAL = 0, 1
WORDS = {2: "The", 3: " moon", 4: ".", 5: " Earth", 6: " weighs"}


class WordTokenizer:
    """One word per token: enough of a tokenizer for the decoding state's text."""

    all_special_ids = [EOS, SPECIAL]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(WORDS.get(i, "") for i in ids)


QUESTION = "What would weigh the most on the moon?"


def _logits(favourite: int) -> torch.Tensor:
    logits = torch.zeros(len(WORDS) + 2)
    logits[favourite] = 5.0
    logits[5] = 4.0  # the best token once end-of-turn and the special token are held
    return logits


def test_a_word_still_being_written_does_not_count_as_new():
    asked = asked_words(QUESTION)
    assert not brings_new_word(asked, "The moon.")
    assert brings_new_word(asked, "The moo", complete=True)
    assert not brings_new_word(asked, "The moo", complete=False)
    assert brings_new_word(asked, "The Earth ", complete=False)
    assert echoes(QUESTION, "The moon.") and not echoes(QUESTION, "The Earth.")


def test_the_row_guards_only_a_question_it_was_given_and_only_when_asked_to():
    assert new_row(SamplingParams(), (), QUESTION).asked == asked_words(QUESTION)
    assert new_row(SamplingParams(echo_guard=False), (), QUESTION).asked is None
    assert new_row(SamplingParams(), (), "  ").asked is None


def test_held_rows_cannot_end_or_open_a_turn_and_free_rows_are_untouched():
    row = new_row(SamplingParams(), (), QUESTION)
    logits = _logits(EOS)
    held = hold_echo(logits, row, WordTokenizer(), {EOS})
    assert torch.isinf(held[[EOS, SPECIAL]]).all() and torch.equal(held[2:], logits[2:])
    row.asked = None
    assert hold_echo(logits, row, WordTokenizer(), {EOS}) is logits


def test_an_echo_is_continued_until_the_answer_brings_a_word_of_its_own():
    tokenizer, row = WordTokenizer(), new_row(SamplingParams(max_new_tokens=8), (), QUESTION)
    for token in (2, 3, 4):  # "The moon."
        row.token_ids.append(token)
    row.text = tokenizer.decode(row.token_ids)
    assert advance(row, _logits(EOS), tokenizer, {EOS}) == 5 and not row.done  # " Earth", not the end
    assert row.asked is not None, "the last word may still grow: not counted yet"
    advance(row, _logits(4), tokenizer, {EOS})  # "."
    assert row.asked is None
    assert advance(row, _logits(EOS), tokenizer, {EOS}) == EOS and row.finish_reason == "stop"
    assert row.text == "The moon. Earth."


def test_unguarded_rows_end_where_the_model_ends():
    tokenizer, row = WordTokenizer(), new_row(SamplingParams(echo_guard=False), (), QUESTION)
    assert advance(row, _logits(EOS), tokenizer, {EOS}) == EOS and row.finish_reason == "stop"


def test_the_question_is_the_last_user_message_and_raw_prompts_have_none():
    messages = [
        ChatMessage(role="user", content="first"),
        ChatMessage(role="assistant", content="reply"),
        ChatMessage(role="user", content=QUESTION),
    ]
    assert GenerationRequest(messages=messages).question == QUESTION
    assert GenerationRequest(messages=messages, prompt="The moon is").question == ""
