"""The pool's engine loop on the real SmolLM2: shared decoding steps, rows joining and leaving,
cancellation, finish reasons. Batch composition is read from the loop's step records, never
from timing."""

from __future__ import annotations

import threading

import pytest

from experts.chat import prompt_ids
from experts.decoding import decode
from experts.engine import RowCancelled
from registry.errors import MoseError
from tests._fixtures.experts import FRANCE, random_lora

LONG = [
    {
        "role": "user",
        "content": "Write a long story about a lighthouse keeper and the sea, with many "
        "details about the weather, the boats and the people of the harbour.",
    }
]
SHORT = [{"role": "user", "content": "Hi"}]
SAMPLED = {"temperature": 1.5, "seed": 11}
"""Seeded sampling at a high temperature: a row that runs to its length limit (checked where used)."""


def _req(expert="base", messages=FRANCE, **params):
    return {"expert": expert, "messages": messages, "params": {"max_new_tokens": 8, **params}}


@pytest.fixture(scope="module")
def pool(expert_pool):
    expert_pool.add_adapter("alpha", *random_lora(1))
    expert_pool.add_adapter("beta", *random_lora(2, scale=0.6, modules=("k_proj", "o_proj"), layers=range(10, 30)))
    yield expert_pool
    expert_pool.engine.observer = None
    for name in ("alpha", "beta"):
        if name in expert_pool.experts():
            expert_pool.remove(name)


@pytest.fixture
def steps(pool):
    """The loop's step records while the test runs."""
    records = []
    pool.engine.observer = records.append
    yield records
    pool.engine.observer = None


def _static(pool, request) -> str:
    """The text of one request decoded alone by the plain static-batch decoder
    (:func:`experts.decoding.decode`) on the same model and adapter."""
    from experts.pool import _as_list

    request = pool._check_request(request)
    key = pool._resolve(request.expert)[1]
    model, tokenizer = pool._shared_model(), pool.tokenizer
    eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None}
    context, adapters = pool._adapter_context(pool._adapter_names([key]))
    with pool._lock, context:
        *_, rows = decode(
            model,
            tokenizer,
            [pool._prompt(tokenizer, request)],
            [request.params],
            adapters,
            eos,
            tokenizer.pad_token_id,
            [request.question],
        )  # the decoder yields the rows after each step: keep the last
    return rows[0].text


def _runs_to_length(pool, request) -> None:
    [result] = pool.generate([request])
    assert result.finish_reason == "length", "the test needs a row that does not stop early"


def test_greedy_texts_equal_the_static_decoder_alone_and_in_mixed_batches(pool):
    requests = [
        _req(expert, messages, max_new_tokens=12)
        for messages in (FRANCE, LONG, SHORT)
        for expert in ("base", "alpha", "beta")
    ]
    expected = [_static(pool, r) for r in requests]
    assert [pool.generate([r])[0].text for r in requests] == expected
    assert [r.text for r in pool.generate(requests)] == expected
    assert len(set(expected[:3])) == 3, "the adapters must really change the text"


def test_rows_joining_a_running_batch_decode_as_they_would_alone(pool, steps):
    """Rows with longer and shorter prompts join a row that is decoding (their caches are merged
    into its cache, left-padded), and leave before it: every text is the one decoded alone."""
    first = _req("alpha", LONG, max_new_tokens=24)
    late = [
        _req("beta", FRANCE, max_new_tokens=6),
        _req("base", LONG + FRANCE, max_new_tokens=5),
        _req("alpha", SHORT, max_new_tokens=9),
    ]
    alone = [pool.generate([r])[0].text for r in [first, *late]]
    _runs_to_length(pool, first)
    handles = []

    def join_at_third_step(record):
        if len(steps) == 3 and not handles:
            handles.extend(pool.submit(r) for r in late)  # from the loop's own thread: joins at the next step

    # the last step of the run above may reach the observer after its result did: skip it
    since = pool.engine.stats()["steps"]
    steps.clear()
    pool.engine.observer = lambda record: record.step > since and (steps.append(record), join_at_third_step(record))
    head = pool.submit(first)
    texts = [head.result().text] + [h.result().text for h in handles]
    assert texts == alone
    late_ids = {h.id for h in handles}
    joined = next(s for s in steps if late_ids & set(s.rows))
    assert set(joined.admitted) == late_ids and head.id in joined.rows and joined.step > steps[0].step
    assert all(s.rows == (head.id,) for s in steps[: joined.step - steps[0].step])  # head ran alone before
    assert max(len(s.rows) for s in steps) == 4 and len(steps[-1].rows) == 1  # all four, then head alone again


def test_streamed_and_generated_rows_decode_in_the_same_steps(pool, steps):
    _runs_to_length(pool, _req("beta", max_new_tokens=16, **SAMPLED))
    results = []
    with pool._lock:  # the loop waits: everything below is queued before its next step
        stream = pool.stream(_req("beta", max_new_tokens=16, **SAMPLED))
        thread = threading.Thread(target=lambda: results.extend(pool.generate([_req("alpha"), _req("base")])))
        thread.start()
        while pool.engine.stats()["waiting"] < 3:
            thread.join(0.01)
    pieces = list(stream)
    thread.join()
    mixed = [s for s in steps if stream.id in s.rows and len(s.rows) == 3]
    assert mixed, [s.rows for s in steps]
    assert all(s.streamed == (stream.id,) for s in mixed)
    assert "".join(pieces) == stream.result().text and len(pieces) > 1
    assert [r.text for r in results] == [pool.generate([r])[0].text for r in (_req("alpha"), _req("base"))]
    assert stream.batch_size == 3 and stream.result().finish_reason == "length"


def test_a_stream_closed_by_its_consumer_stops_decoding_within_a_step(pool, steps):
    request = _req("alpha", LONG, max_new_tokens=64, **SAMPLED)
    _runs_to_length(pool, request)
    before = pool.engine.stats()["finished"]["cancelled"]
    steps.clear()
    stream = pool.stream(request)
    pieces = []
    for piece in stream:  # leaving the loop closes the iteration, which cancels the row
        pieces.append(piece)
        if len(pieces) == 3:
            break
    closed_at = len(steps)
    with pytest.raises(RowCancelled):
        stream.result()
    # at most the step under way when it was closed, and the one whose record was still being handed out
    assert len([s for s in steps[closed_at:] if stream.id in s.rows]) <= 2
    assert len([s for s in steps if stream.id in s.rows]) < 63  # 64 tokens: the prefill and 63 steps
    assert pool.engine.stats()["finished"]["cancelled"] == before + 1


def test_cancelling_one_row_leaves_the_others_of_its_batch_unchanged(pool, steps):
    keep = _req("beta", FRANCE, max_new_tokens=10)
    alone = pool.generate([keep])[0].text
    doomed = pool.submit(_req("alpha", LONG, max_new_tokens=64, **SAMPLED))
    kept = pool.submit(keep)
    doomed.cancel()
    assert kept.result().text == alone
    with pytest.raises(RowCancelled):
        doomed.result()


@pytest.mark.parametrize(
    "params, reason",
    [
        ({"max_new_tokens": 40}, "stop"),
        ({"max_new_tokens": 3}, "length"),
        ({"max_new_tokens": 12, "stop": ["Paris"]}, "stop"),
    ],
)
def test_finish_reason_is_what_happened_streamed_or_not(pool, params, reason):
    request = _req("base", **params)
    [generated] = pool.generate([request])
    stream = pool.stream(request)
    pieces = list(stream)
    streamed = stream.result()
    assert generated.finish_reason == streamed.finish_reason == reason
    assert "".join(pieces) == streamed.text == generated.text
    if params.get("stop"):  # the start of a stop string is held back until it is clear it is none
        assert streamed.text.strip() and "Par" not in "".join(pieces)
    assert (streamed.completion_tokens == 3) == (reason == "length")


def test_an_expert_unloaded_mid_generation_fails_its_row_only(pool, steps):
    pool.add_adapter("gamma", *random_lora(3))
    keep = _req("base", LONG, max_new_tokens=12)
    alone = pool.generate([keep])[0].text
    handles = []

    def unload_at_second_step(record):
        if len([s for s in steps if handles and handles[0].id in s.rows]) == 2 and "gamma" in pool.experts():
            pool.remove("gamma")

    steps.clear()
    pool.engine.observer = lambda record: (steps.append(record), unload_at_second_step(record))
    with pool._lock:
        handles.extend([pool.submit(_req("gamma", LONG, max_new_tokens=40)), pool.submit(keep)])
    with pytest.raises(MoseError, match="expert 'gamma' was unloaded while it was generating"):
        handles[0].result()
    assert handles[1].result().text == alone
    assert "gamma" not in pool.experts()


def test_prompts_are_cut_from_the_left_like_before(pool):
    ids = prompt_ids(pool.tokenizer, LONG)
    request = pool._check_request(_req("base", LONG))
    assert pool._admit(request).prompt == ids[-pool.config.max_prompt_tokens :]
