"""Server-sent events of a streamed completion: the real finish reason, metrics observed at the end,
and a stream closed by a client that went away closes the generation behind it."""

from __future__ import annotations

import asyncio
import json

import pytest

from experts.types import GenerationResult
from registry.errors import NotFoundError
from serve.api import CLIENT_CLOSED, _sse
from serve.schemas import MoseInfo


class Pieces:
    """A backend stream: text pieces, then the completion's result (or an error)."""

    def __init__(self, pieces, finish_reason="length", error=None):
        self.pieces, self.finish_reason, self.error = pieces, finish_reason, error
        self.closed = False

    async def __call__(self):
        try:
            for piece in self.pieces:
                yield piece
            if self.error is not None:
                raise self.error
            text = "".join(self.pieces)
            yield GenerationResult(
                expert="med",
                text=text,
                finish_reason=self.finish_reason,
                prompt_tokens=5,
                completion_tokens=len(self.pieces),
            )
        finally:
            self.closed = True


def events(chunks: list[bytes]) -> list:
    lines = [chunk.decode().removeprefix("data: ").strip() for chunk in chunks]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("reason", ["length", "stop"])
def test_the_last_chunk_carries_the_finish_reason_and_metrics_come_at_the_end(endpoint, reason):
    source, observed = Pieces(["Hel", "lo"], reason), []

    async def scenario():
        stream = _sse(endpoint, MoseInfo(expert="med"), source(), observed.append)
        chunks = [await stream.__anext__(), await stream.__anext__()]
        assert observed == []  # the request is not over while its stream runs
        chunks += [chunk async for chunk in stream]
        return chunks

    sent = events(asyncio.run(scenario()))
    assert sent[-1] == "[DONE]" and observed == [200] and source.closed
    choices = [event["choices"][0] for event in sent[:-1]]
    assert [c["finish_reason"] for c in choices] == [None, None, None, reason]
    texts = [c["delta"].get("content", "") if endpoint == "chat" else c["text"] for c in choices]
    assert "".join(texts) == "Hello"


def test_a_client_that_goes_away_closes_the_generation_and_is_counted_as_such():
    source, observed = Pieces(["a", "b", "c", "d"]), []

    async def scenario():
        stream = _sse("chat", MoseInfo(expert="med"), source(), observed.append)
        for _ in range(3):  # the role chunk and two pieces
            await stream.__anext__()
        await stream.aclose()  # what the server does when the client disconnects

    asyncio.run(scenario())
    assert observed == [CLIENT_CLOSED] and source.closed


def test_an_error_after_the_first_chunk_is_reported_in_band_with_its_status():
    source, observed = Pieces(["a"], error=NotFoundError("unknown expert 'x'")), []

    async def scenario():
        return [chunk async for chunk in _sse("chat", MoseInfo(expert="med"), source(), observed.append)]

    sent = events(asyncio.run(scenario()))
    assert sent[-1]["error"]["message"] == "unknown expert 'x'" and observed == [404]
