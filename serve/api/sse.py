"""Server-sent events of a streamed completion, in OpenAI's chunk format."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from experts.types import GenerationResult
from serve.api.errors import find_mose_error, mose_error_status
from serve.schemas import MoseInfo, Usage, new_id

logger = logging.getLogger("mose.api")

CLIENT_CLOSED = 499
"""Status recorded in the metrics for a streamed request whose client went away before its end
(nginx's "client closed request"; the client never sees it)."""


def usage_of(results: Sequence[GenerationResult]) -> Usage:
    """One request's usage: its prompt once, the tokens of every choice."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(result.completion_tokens for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _merged(sources: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(source index, item) from several streams as each produces it; an error in one ends all.
    Closing this closes every source."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, source: AsyncIterator[Any]) -> None:
        try:
            async for item in source:
                await queue.put((index, item, None))
            await queue.put((index, done, None))
        except Exception as exc:
            await queue.put((index, done, exc))

    tasks = [asyncio.ensure_future(pump(i, source)) for i, source in enumerate(sources)]
    try:
        left = len(tasks)
        while left:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                left -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for source in sources:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()


async def _single(source: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    try:
        async for item in source:
            yield 0, item
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()


async def _sse(
    endpoint: str,
    info: MoseInfo,
    pieces: AsyncIterator[str | GenerationResult] | Sequence[AsyncIterator[str | GenerationResult]],
    observe: Callable[[int], None],
    include_usage: bool = False,
) -> AsyncIterator[bytes]:
    """OpenAI server-sent events: per choice a role chunk, one chunk per text piece and a finish
    chunk with the completion's own finish reason (from the :class:`GenerationResult` that ends its
    stream); with ``include_usage``, a last chunk with no choices and the request's usage; [DONE].
    ``pieces`` is one stream (one choice) or a list of them (choice ``i`` from stream ``i``).

    ``observe`` gets the request's status once the stream is over: 200, the status of an error
    reported in-band, or :data:`CLIENT_CLOSED` when the client went away first; the streams are
    closed then, which stops their decoding."""
    chat = endpoint == "chat"
    ident = new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    sources = list(pieces) if isinstance(pieces, (list, tuple)) else [pieces]
    items = _single(sources[0]) if len(sources) == 1 else _merged(sources)

    def event(body: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(body)}\n\n".encode()

    def chunk(index: int, delta: dict[str, Any] | str, finish: str | None) -> bytes:
        if chat:
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            body = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": info.expert,
                "choices": [choice],
                "mose": info.model_dump(mode="json"),
            }
        else:
            choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": None}
            body = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": info.expert,
                "choices": [choice],
                "mose": info.model_dump(mode="json"),
            }
        if include_usage:
            body["usage"] = None
        return event(body)

    status = CLIENT_CLOSED
    results: dict[int, GenerationResult] = {}
    try:
        for index in range(len(sources)):
            yield chunk(index, {"role": "assistant", "content": ""} if chat else "", None)
        try:
            async for index, piece in items:
                if isinstance(piece, GenerationResult):
                    results[index] = piece
                    yield chunk(index, {} if chat else "", piece.finish_reason)
                    continue
                yield chunk(index, {"content": piece} if chat else piece, None)
        except Exception as exc:  # the stream has started: report in-band, as OpenAI does
            known = find_mose_error(exc)
            status = mose_error_status(known) if known else 500
            message = str(known) if known else "internal error while generating; the server log has details"
            if known is None:
                logger.exception("error while streaming")
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n".encode()
            return
        status = 200
        for index in range(len(sources)):
            if index not in results:  # a stream that ended without its result
                yield chunk(index, {} if chat else "", "stop")
        if include_usage:
            usage = usage_of([results[i] for i in sorted(results)]).model_dump()
            yield event(
                {
                    "id": ident,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": info.expert,
                    "choices": [],
                    "usage": usage,
                    "mose": info.model_dump(mode="json"),
                }
            )
        yield b"data: [DONE]\n\n"
    finally:
        observe(status)
        await items.aclose()
