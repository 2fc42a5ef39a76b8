"""The OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (an active expert, ``auto`` for the router's choice, or ``upstream:<name>``,
whose answer the jury checks)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from experts.decoding import GREEDY_BELOW_TEMPERATURE
from experts.types import BASE_EXPERT, GenerationRequest, GenerationResult, SamplingParams, TokenLogprob
from experts.types import ChatMessage as PoolMessage
from serve.api.errors import ApiError, describe_validation, errors
from serve.api.sse import _sse, usage_of
from serve.backend import Backend
from serve.config import LimitsConfig, ServeConfig
from serve.metrics import IngressMetrics
from serve.schemas import (
    Alternative,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    Completion,
    CompletionLogprobs,
    CompletionRequest,
    ModelList,
    MoseInfo,
    SamplingFields,
    TextChoice,
    Usage,
)

AUTO = "auto"
UPSTREAM_PREFIX = "upstream:"
MIN_TEMPERATURE = GREEDY_BELOW_TEMPERATURE
"""Temperatures below this are sent as 0 (greedy), as the decoder would treat them anyway."""

_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"},
        "event": {"type": "string"},
    },
}
_SSE_RESPONSE = {
    "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    "description": "The completion; server-sent events (one schema per event) when `stream` is true.",
}


def check_prompt(limits: LimitsConfig, chars: int) -> None:
    """400 for a prompt over ``limits.max_prompt_chars``."""
    limit = limits.max_prompt_chars
    if chars > limit:
        raise ApiError(400, f"prompt is {chars} characters; this server allows at most {limit}", param="messages")


def openai_router(config: ServeConfig, backend: Backend, metrics: IngressMetrics) -> APIRouter:
    """``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``."""
    handlers = _OpenAIHandlers(config, backend, metrics)
    router = APIRouter()
    router.get("/v1/models", response_model=ModelList, responses=errors(429))(handlers.list_models)
    completions = errors(400, 404, 413, 429, 502, 503) | {200: _SSE_RESPONSE}
    router.post("/v1/chat/completions", response_model=ChatCompletion, responses=completions)(handlers.chat_completions)
    router.post("/v1/completions", response_model=Completion, responses=completions)(handlers.completions)
    return router


class _OpenAIHandlers:
    """The OpenAI handlers bound to one config, backend and metrics set (no docstrings on the
    handlers: they would become the operations' descriptions in the OpenAPI schema)."""

    def __init__(self, config: ServeConfig, backend: Backend, metrics: IngressMetrics) -> None:
        self.config, self.backend, self.metrics = config, backend, metrics

    async def list_models(self) -> dict[str, Any]:
        cards = [
            {
                "id": AUTO,
                "object": "model",
                "owned_by": "mose",
                "created": 0,
                "mose": {"description": "the router picks the expert"},
            }
        ]
        for expert in await self.backend.experts():
            cards.append(
                {
                    "id": expert["name"],
                    "object": "model",
                    "owned_by": expert.get("owner", ""),
                    "created": 0,
                    "mose": expert,
                }
            )
        cards.extend(
            {"id": f"{UPSTREAM_PREFIX}{name}", "object": "model", "owned_by": "upstream", "created": 0}
            for name in self.config.upstreams
        )
        return {"object": "list", "data": cards}

    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        check_prompt(self.config.limits, body.prompt_chars())
        messages = [PoolMessage(role=m.role, content=m.content) for m in body.messages]
        return await self._complete("chat", body, body.routing_text(), messages)

    async def completions(self, body: CompletionRequest) -> Response:
        text, ids = body.prompt_text(), body.prompt_ids()
        check_prompt(self.config.limits, len(text) if ids is None else len(ids))
        if ids is not None and body.model == AUTO:
            raise ApiError(
                400, "a prompt of token ids cannot be routed: name the model (an expert or 'base')", param="model"
            )
        return await self._complete("completions", body, text, [PoolMessage(role="user", content=text or " ")])

    async def _complete(
        self, endpoint: str, body: SamplingFields, routing_text: str, messages: list[PoolMessage]
    ) -> Response:
        started = time.perf_counter()
        params = self._sampling(body)
        self._check_options(body, params)
        if body.model.startswith(UPSTREAM_PREFIX):
            return await self._upstream(endpoint, body, routing_text, messages, params, started)
        info = await self._choose_expert(body.model, routing_text)
        raw = _raw_prompt(body)
        # n choices: n rows; with a seed, choice i samples with seed + i (the first one as without n)
        requests = [
            GenerationRequest(
                expert=info.expert,
                messages=messages,
                prompt=raw,
                params=params.model_copy(
                    update={"seed": None if params.seed is None else (params.seed + i + 2**63) % 2**64 - 2**63}
                ),
            )
            for i in range(body.n)
        ]
        headers = _mose_headers(info)
        if body.stream:

            def observe(status: int) -> None:  # once the stream ended: its whole duration, its outcome
                self.metrics.observe_request(endpoint, info.expert, status, time.perf_counter() - started)

            include_usage = body.stream_options is not None and body.stream_options.include_usage
            sources = [self.backend.stream(request) for request in requests]
            stream = _sse(endpoint, info, sources[0] if len(sources) == 1 else sources, observe, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        answers = await asyncio.gather(*(self.backend.generate(request) for request in requests))
        for _, batch_size in answers:
            self.metrics.batch_size.observe(batch_size)
        results = [result for result, _ in answers]
        if getattr(body, "echo", False):
            results = [_echoed(body, result, score_only=body.requested_max_tokens() == 0) for result in results]
        usage = usage_of(results)
        if endpoint == "chat":
            payload: BaseModel = ChatCompletion(
                model=info.expert,
                usage=usage,
                mose=info,
                choices=[
                    ChatChoice(
                        index=i,
                        message=ChatMessage(role="assistant", content=result.text),
                        finish_reason=result.finish_reason,
                        logprobs=_chat_logprobs(result.logprobs),
                    )
                    for i, result in enumerate(results)
                ],
            )
        else:
            payload = Completion(
                model=info.expert,
                usage=usage,
                mose=info,
                choices=[
                    TextChoice(
                        index=i,
                        text=result.text,
                        finish_reason=result.finish_reason,
                        logprobs=_legacy_logprobs(result.logprobs),
                    )
                    for i, result in enumerate(results)
                ],
            )
        self.metrics.observe_request(endpoint, info.expert, 200, time.perf_counter() - started)
        return JSONResponse(payload.model_dump(mode="json"), headers=headers)

    @staticmethod
    def _check_options(body: SamplingFields, params: SamplingParams) -> None:
        """Refuse combinations mose cannot answer, naming the field."""
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if params.logprobs is not None and body.stream:
            raise ApiError(400, "logprobs are not available when streaming; send stream: false", param="logprobs")
        echo = getattr(body, "echo", False)
        if echo and body.stream:
            raise ApiError(400, "echo is not available when streaming; send stream: false", param="echo")
        if body.model.startswith(UPSTREAM_PREFIX):
            for name, value in (("n", body.n != 1), ("logprobs", params.logprobs is not None), ("echo", echo)):
                if value:
                    raise ApiError(400, f"{name} is not available for upstream models", param=name)

    async def _choose_expert(self, model: str, routing_text: str) -> MoseInfo:
        if model == AUTO:
            decision = await self.backend.route(routing_text)
            self.metrics.observe_route(decision.confidence, decision.abstained)
            alternatives = [Alternative(domain=d.domain, expert=d.expert, p=d.p) for d in decision.top_k[1:]]
            return MoseInfo(
                expert=decision.expert,
                domain=decision.domain,
                confidence=decision.confidence,
                abstained=decision.abstained,
                alternatives=alternatives,
            )
        if model in (BASE_EXPERT,):
            return MoseInfo(expert=model)
        if not await self.backend.has_expert(model):
            raise ApiError(
                404,
                f"unknown model {model!r}: use 'auto', one of the active experts "
                f"(GET /v1/models lists them) or 'upstream:<name>'",
                param="model",
            )
        return MoseInfo(expert=model)

    async def _upstream(
        self,
        endpoint: str,
        body: SamplingFields,
        question: str,
        messages: list[PoolMessage],
        params: SamplingParams,
        started: float,
    ) -> Response:
        """Forward to the upstream model, then let the jury check its answer."""
        name = body.model[len(UPSTREAM_PREFIX) :]
        upstream = self.config.upstreams.get(name)
        if upstream is None:
            raise ApiError(
                404,
                f"unknown upstream {name!r}; configured upstreams: {sorted(self.config.upstreams) or 'none'}",
                param="model",
            )
        if body.stream:
            raise ApiError(
                400,
                "streaming is not available for upstream models: the verdict needs the whole answer",
                param="stream",
            )
        reply = await self.backend.upstream_chat(
            name, [m.model_dump() for m in messages], params.max_new_tokens, params.temperature
        )
        text = reply["choices"][0]["message"]["content"] or ""
        info = MoseInfo(expert=body.model)
        headers = _mose_headers(info)
        if upstream.crosscheck:
            verdict = await self.backend.crosscheck(question, text, 3, False)
            self.metrics.crosschecks.labels(str(verdict.flagged).lower()).inc()
            info.verdict = verdict.model_dump(mode="json")
            headers |= {
                "x-mose-flagged": str(verdict.flagged).lower(),
                "x-mose-p-correct": f"{verdict.p_correct:.4f}",
                "x-mose-verdict-id": verdict.id,
            }
        usage = Usage(
            **{
                k: int(v)
                for k, v in (reply.get("usage") or {}).items()
                if k in ("prompt_tokens", "completion_tokens", "total_tokens") and isinstance(v, int)
            }
        )
        finish = (
            reply["choices"][0].get("finish_reason")
            if reply["choices"][0].get("finish_reason") in ("stop", "length")
            else "stop"
        )
        if endpoint == "chat":
            payload: BaseModel = ChatCompletion(
                model=body.model,
                usage=usage,
                mose=info,
                choices=[ChatChoice(message=ChatMessage(role="assistant", content=text), finish_reason=finish)],
            )
        else:
            payload = Completion(
                model=body.model, usage=usage, mose=info, choices=[TextChoice(text=text, finish_reason=finish)]
            )
        self.metrics.observe_request(endpoint, body.model, 200, time.perf_counter() - started)
        return JSONResponse(payload.model_dump(mode="json"), headers=headers)

    def _sampling(self, body: SamplingFields) -> SamplingParams:
        limits = self.config.limits
        requested = body.requested_max_tokens()
        echo = getattr(body, "echo", False)
        if echo and requested == 0:  # only the prompt is scored: one token is decoded, and dropped
            requested = 1
        if requested is not None and requested < 1:
            raise ApiError(400, f"max_tokens must be at least 1 (got {requested})", param="max_tokens")
        if requested is not None and requested > limits.max_tokens:
            raise ApiError(
                400, f"max_tokens is {requested}; this server allows at most {limits.max_tokens}", param="max_tokens"
            )
        try:
            return SamplingParams(
                max_new_tokens=requested or limits.default_max_tokens,
                temperature=body.temperature if (body.temperature or 0.0) >= MIN_TEMPERATURE else 0.0,
                top_p=body.top_p if body.top_p is not None else 1.0,
                stop=body.stop_list(),
                seed=body.seed,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                **({} if body.repetition_penalty is None else {"repetition_penalty": body.repetition_penalty}),
                **({} if body.echo_guard is None else {"echo_guard": body.echo_guard}),
                logprobs=body.logprob_alternatives(),
                prompt_logprobs=(body.logprob_alternatives() or 0) if echo else None,
            )
        except ValidationError as exc:  # the pool's own limits, should the request schema miss one
            raise ApiError(400, f"sampling parameters: {describe_validation(exc.errors())[0]}") from None


def _mose_headers(info: MoseInfo) -> dict[str, str]:
    headers = {"x-mose-expert": info.expert, "x-mose-abstained": str(info.abstained).lower()}
    if info.domain is not None:
        headers["x-mose-domain"] = info.domain
    if info.confidence is not None:
        headers["x-mose-confidence"] = f"{info.confidence:.4f}"
    return headers


def _chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=e.bytes,
                top_logprobs=[ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top],
            )
            for e in entries
        ]
    )


def _legacy_logprobs(entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
    """The completions endpoint's format: parallel lists, alternatives as {token: logprob}, each token's
    character offset in the text."""
    if entries is None:
        return None
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
        text_offset=offsets,
    )


def _raw_prompt(body: SamplingFields) -> str | list[int] | None:
    """What the pool continues as it is (no chat template): an echoed prompt, or token ids."""
    if not isinstance(body, CompletionRequest):
        return None
    ids = body.prompt_ids()
    if ids is not None:
        return ids
    return body.prompt_text() if body.echo else None


def _echoed(body: CompletionRequest, result: GenerationResult, score_only: bool) -> GenerationResult:
    """The result with the prompt before its text (and its tokens before its log-probabilities, when
    asked); ``score_only``: without the token decoded after the prompt."""
    prompt_entries = result.prompt_logprobs or []
    prompt_text = body.prompt_text() if body.prompt_ids() is None else "".join(e.token for e in prompt_entries)
    generated = [] if score_only else (result.logprobs or [])
    logprobs = None
    if body.logprobs is not None:
        logprobs = [*prompt_entries, *generated]
    return result.model_copy(
        update={
            "text": prompt_text + ("" if score_only else result.text),
            "completion_tokens": 0 if score_only else result.completion_tokens,
            "finish_reason": "length" if score_only else result.finish_reason,
            "logprobs": logprobs,
            "prompt_logprobs": None,
        }
    )
