"""The HTTP API: OpenAI-compatible completions plus mose's routing and admin endpoints.

:func:`build_api` turns a :class:`~serve.config.ServeConfig` and a :class:`~serve.backend.Backend`
into a FastAPI app. Every error is an OpenAI-shaped JSON body (``{"error": {"message", ...}}``)
with a 4xx status that says what was wrong; nothing a client sends may cause a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from experts.decoding import GREEDY_BELOW_TEMPERATURE
from experts.types import BASE_EXPERT, GenerationRequest, GenerationResult, SamplingParams, TokenLogprob
from experts.types import ChatMessage as PoolMessage
from jury.jury import Verdict
from registry.errors import (
    AccessDeniedError,
    ConflictError,
    MoseError,
    NotFoundError,
    ServerError,
    StatusError,
    UnavailableError,
)
from registry.teams import OPERATOR, Principal, looks_like_team_token
from router_model.runtime import RouteDecision
from serve.backend import Backend
from serve.config import AuthConfig, ServeConfig
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
    CrosscheckRequest,
    ErrorBody,
    ErrorResponse,
    ExpertRecordOut,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelList,
    MoseInfo,
    RouteRequest,
    SamplingFields,
    TextChoice,
    Usage,
    new_id,
)
from serve.ui import UI_PREFIX, mount_catalogue
from serve.upstream import UpstreamError

logger = logging.getLogger("mose.api")

AUTO = "auto"
UPSTREAM_PREFIX = "upstream:"
ADMIN_PREFIX = "/v1/experts"
MIN_TEMPERATURE = GREEDY_BELOW_TEMPERATURE
"""Temperatures below this are sent as 0 (greedy), as the decoder would treat them anyway."""

CLIENT_CLOSED = 499
"""Status recorded in the metrics for a streamed request whose client went away before its end
(nginx's "client closed request"; the client never sees it)."""

ERROR_DESCRIPTIONS = {
    400: "The request is malformed or over a limit; the message names the field.",
    401: "Admin endpoint called without 'Authorization: Bearer <token>'.",
    403: "Wrong, rotated or revoked token; a team token used on another team's expert or for an operator-only "
         "action; or admin endpoints are disabled on this server.",
    404: "Unknown model, expert, verdict or endpoint.",
    409: "Conflicts with the registry's or the verdict's current state.",
    413: "Request body over the server's limit.",
    429: "The server is at capacity; retry after Retry-After seconds.",
    502: "The upstream model failed.",
    503: "The expert pool is overloaded or restarting; retry after Retry-After seconds.",
}


class ApiError(Exception):
    """An error with its HTTP status, raised inside handlers and rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


class RegisterExpertRequest(BaseModel):
    """Register an expert over HTTP: the manifest and each file's bytes, base64-encoded."""

    model_config = ConfigDict(extra="forbid")

    manifest: dict[str, Any]
    """The expert manifest (the same fields as manifest.yaml)."""

    files: dict[str, str] = Field(default_factory=dict)
    """Relative path -> base64 of the file's bytes; every path in ``manifest.files``."""

    activate: bool = False
    """Activate right after registration (routable at once)."""


PRINCIPAL_SCOPE_KEY = "mose.principal"
"""Where :class:`AdminGateMiddleware` leaves the authenticated caller for the admin handlers."""


class QuarantineRequest(BaseModel):
    """Why an expert is taken out of service (recorded in the audit log)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000)
    """Why the expert is quarantined."""


def authorize_admin(auth: AuthConfig, authorization: str | None) -> str:
    """Constant-time check of the operator's bearer token; returns the operator's name for the audit log."""
    if auth.admin_mode == "off":
        raise ApiError(403, "admin endpoints are disabled on this server (start it with MOSE_ADMIN_TOKEN set)",
                       kind="permission_error")
    if auth.admin_mode == "insecure":
        return "insecure-local-admin"
    if not authorization or not authorization.startswith("Bearer "):
        raise ApiError(401, "admin endpoints need 'Authorization: Bearer <token>'", kind="authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})
    given = authorization[len("Bearer "):].encode()
    if not hmac.compare_digest(given, auth.admin_token.get_secret_value().encode()):
        raise ApiError(403, "the admin token is not valid", kind="permission_error")
    return OPERATOR


async def authenticate(auth: AuthConfig, authorization: str | None, backend: Backend) -> Principal:
    """The caller of an admin endpoint: the operator (its token, or anyone in insecure local mode) or
    the team whose token this is (checked by the registry: salted hash, constant-time comparison).
    401 without a bearer token; 403 for a wrong, rotated or revoked one. Errors never hold the token."""
    try:
        return Principal.operator(authorize_admin(auth, authorization))
    except ApiError as refused:
        token = authorization[len("Bearer "):] if refused.status == 403 and authorization else ""
        if auth.admin_mode == "off" or not looks_like_team_token(token):
            raise
    try:
        return Principal.of_team(await backend.authenticate_team(token))
    except Exception as exc:
        known = find_mose_error(exc)
        if isinstance(known, AccessDeniedError):
            raise ApiError(403, str(known), kind="permission_error") from None
        raise


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=str(status)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def mose_error_status(exc: BaseException) -> int:
    """HTTP status for a MoseError raised anywhere behind the API: 4xx for the client's error,
    503 when something the request needs is not available, 500 for another fault of the server's."""
    if isinstance(exc, UpstreamError):
        return 502
    if isinstance(exc, UnavailableError):
        return 503
    if isinstance(exc, ServerError):
        return 500
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, AccessDeniedError):
        return 403
    if isinstance(exc, (ConflictError, StatusError)):
        return 409
    return 400


def _error_kind(status: int) -> str:
    """The OpenAI-style ``error.type`` of a status."""
    return {403: "permission_error", 502: "upstream_error", 503: "unavailable_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


def find_mose_error(exc: BaseException) -> MoseError | None:
    """The innermost MoseError behind ``exc``. Ray wraps errors raised in other replicas in a class
    that is also a MoseError but whose text is the remote traceback: the original is its ``.cause``."""
    seen, found = set(), None
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MoseError):
            found = exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return found


def _describe_errors(errors: list[dict[str, Any]]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            problems.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            problems.append("request body must be a JSON object (send Content-Type: application/json)")
            continue
        where = ".".join(loc)
        param = param or where or (err.get("ctx") or {}).get("field") or None
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(problems) or "invalid request", param


class AdminGateMiddleware:
    """Authenticate ``/v1/experts`` requests (operator or team token) before their body is read:
    nobody without a valid token can make the server read (up to ``max_upload_bytes``) or parse an
    upload. The caller is left in the scope for the handlers."""

    def __init__(self, app: Any, auth: AuthConfig, backend: Backend) -> None:
        self.app, self.auth, self.backend = app, auth, backend

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(ADMIN_PREFIX):
            header = dict(scope.get("headers") or []).get(b"authorization")
            try:
                scope[PRINCIPAL_SCOPE_KEY] = await authenticate(
                    self.auth, header.decode("latin-1") if header is not None else None, self.backend)
            except ApiError as exc:
                response = error_response(exc.status, exc.message, exc.kind, exc.param, exc.headers)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over the limit with 413, before they are read into memory.

    Expert uploads (``/v1/experts``, admin only: :class:`AdminGateMiddleware` runs first) carry
    weights and get their own, larger limit.
    """

    def __init__(self, app: Any, max_bytes: int, max_upload_bytes: int) -> None:
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    def _limit(self, scope: dict) -> int:
        return self.max_upload_bytes if scope.get("path", "").startswith(ADMIN_PREFIX) else self.max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, receive, send, limit)
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, limit: int) -> None:
        await _too_large(limit)(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised by the counting ``receive`` once a body without Content-Length passes the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body is larger than the limit of {limit} bytes")


class AdmissionMiddleware:
    """Admission control: beyond ``limit`` requests in flight, answer 429 with Retry-After at once."""

    def __init__(self, app: Any, limit: int, metrics: IngressMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(("/v1/", UI_PREFIX)):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            self.metrics.rejected.labels("queue_full").inc()
            response = error_response(
                429, f"server is at capacity ({self.limit} requests in flight); retry shortly",
                kind="rate_limit_error", headers={"Retry-After": "1"},
            )
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def build_api(config: ServeConfig, backend: Backend, metrics: IngressMetrics | None = None) -> FastAPI:
    """The FastAPI app for one ingress replica."""
    metrics = metrics or IngressMetrics()
    api = FastAPI(
        title="mose",
        version="0.1.0",
        description="Mixture of small experts: OpenAI-compatible completions routed to vertical experts.",
    )
    api.add_middleware(AdmissionMiddleware, limit=config.limits.max_queued_requests, metrics=metrics)
    api.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes,
                       max_upload_bytes=config.limits.max_upload_bytes)
    api.add_middleware(AdminGateMiddleware, auth=config.auth, backend=backend)  # added last: runs first
    _install_error_handlers(api)
    handlers = _Handlers(config, backend, metrics)

    api.get("/healthz", response_model=Health)(handlers.healthz)
    api.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus metrics"}})(handlers.metrics_text)
    api.get("/v1/models", response_model=ModelList, responses=_errors(429))(handlers.list_models)
    api.post("/v1/route", response_model=RouteDecision, responses=_errors(400, 413, 429, 503))(handlers.route)
    completions = _errors(400, 404, 413, 429, 502, 503) | {200: _SSE_RESPONSE}
    api.post("/v1/chat/completions", response_model=ChatCompletion, responses=completions)(handlers.chat_completions)
    api.post("/v1/completions", response_model=Completion, responses=completions)(handlers.completions)
    api.post("/v1/crosscheck", response_model=Verdict, responses=_errors(400, 413, 429, 503))(handlers.crosscheck)
    api.post("/v1/feedback", response_model=FeedbackResponse,
             responses=_errors(400, 404, 409, 413, 429))(handlers.feedback)
    admin = _errors(400, 401, 403, 404, 409, 413, 429)
    api.post("/v1/experts", response_model=ExpertRecordOut, responses=admin)(handlers.register_expert)
    api.post("/v1/experts/{name}/activate", response_model=ExpertRecordOut, responses=admin)(handlers.activate_expert)
    api.post("/v1/experts/{name}/retire", response_model=ExpertRecordOut, responses=admin)(handlers.retire_expert)
    api.post("/v1/experts/{name}/quarantine", response_model=ExpertRecordOut,
             responses=admin)(handlers.quarantine_expert)
    mount_catalogue(api, backend, metrics)
    _document_errors_as_400(api)
    return api


_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"},
                             "event": {"type": "string"}}}
_SSE_RESPONSE = {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                 "description": "The completion; server-sent events (one schema per event) when `stream` is true."}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer, all in OpenAI's error shape."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def _document_errors_as_400(api: FastAPI) -> None:
    """Drop FastAPI's automatic 422 from the schema: invalid bodies get 400 (documented per route)."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    api.openapi = openapi  # type: ignore[method-assign]


def _http_error_message(request: Request, exc: StarletteHTTPException) -> str:
    """A clear message for the errors FastAPI and Starlette raise themselves."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"request body is not valid UTF-8 (byte {cause.object[cause.start]:#04x} at position {cause.start})"
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "request body holds an integer with too many digits"
    if exc.status_code == 404:
        return f"no such endpoint: {request.method} {request.url.path}"
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}"
    return str(exc.detail)


def _install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, _BodyTooLarge):  # FastAPI wraps what receive() raised
            return _too_large(exc.__cause__.limit)
        return error_response(exc.status_code, _http_error_message(request, exc), headers=exc.headers)

    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, param=param)

    @api.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        known = find_mose_error(exc)
        if known is not None:
            status = mose_error_status(known)
            if status >= 500:
                logger.error("server fault: %s", known)
            return error_response(status, str(known), kind=_error_kind(status))
        if _is_backpressure(exc):
            return error_response(503, "the expert pool is overloaded; retry shortly", kind="overloaded_error",
                                  headers={"Retry-After": "1"})
        logger.exception("unhandled error")
        return error_response(500, "internal error; the server log has details", kind="server_error")


def _is_backpressure(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in {"BackPressureError", "DeploymentUnavailableError", "ActorDiedError", "RayActorError"}


class _Handlers:
    """Route handlers bound to one config, backend and metrics set."""

    def __init__(self, config: ServeConfig, backend: Backend, metrics: IngressMetrics) -> None:
        self.config, self.backend, self.metrics = config, backend, metrics

    # ------------------------------------------------------------ plain endpoints

    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", **(await self.backend.health())}

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def list_models(self) -> dict[str, Any]:
        cards = [{"id": AUTO, "object": "model", "owned_by": "mose", "created": 0,
                  "mose": {"description": "the router picks the expert"}}]
        for expert in await self.backend.experts():
            cards.append({"id": expert["name"], "object": "model", "owned_by": expert.get("owner", ""),
                          "created": 0, "mose": expert})
        cards.extend({"id": f"{UPSTREAM_PREFIX}{name}", "object": "model", "owned_by": "upstream", "created": 0}
                     for name in self.config.upstreams)
        return {"object": "list", "data": cards}

    async def route(self, body: RouteRequest) -> RouteDecision:
        started = time.perf_counter()
        self._check_prompt(len(body.query))
        decision = await self.backend.route(body.query)
        self.metrics.observe_route(decision.confidence, decision.abstained)
        self.metrics.observe_request("route", decision.expert, 200, time.perf_counter() - started)
        return decision

    async def crosscheck(self, body: CrosscheckRequest) -> dict[str, Any]:
        started = time.perf_counter()
        self._check_prompt(len(body.question) + len(body.answer))
        verdict = await self.backend.crosscheck(body.question, body.answer, body.k, body.own_answers)
        self.metrics.crosschecks.labels(str(verdict.flagged).lower()).inc()
        self.metrics.observe_request("crosscheck", "jury", 200, time.perf_counter() - started)
        return verdict.model_dump(mode="json")

    async def feedback(self, body: FeedbackRequest) -> dict[str, Any]:
        weights = await self.backend.feedback(body.verdict_id, body.correct)
        return {"verdict_id": body.verdict_id, "correct": body.correct, "weights": weights}

    # ------------------------------------------------------------ completions

    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        self._check_prompt(body.prompt_chars())
        messages = [PoolMessage(role=m.role, content=m.content) for m in body.messages]
        return await self._complete("chat", body, body.routing_text(), messages)

    async def completions(self, body: CompletionRequest) -> Response:
        text, ids = body.prompt_text(), body.prompt_ids()
        self._check_prompt(len(text) if ids is None else len(ids))
        if ids is not None and body.model == AUTO:
            raise ApiError(400, "a prompt of token ids cannot be routed: name the model (an expert or 'base')",
                           param="model")
        return await self._complete("completions", body, text, [PoolMessage(role="user", content=text or " ")])

    async def _complete(self, endpoint: str, body: SamplingFields, routing_text: str,
                        messages: list[PoolMessage]) -> Response:
        started = time.perf_counter()
        params = self._sampling(body)
        self._check_options(body, params)
        if body.model.startswith(UPSTREAM_PREFIX):
            return await self._upstream(endpoint, body, routing_text, messages, params, started)
        info = await self._choose_expert(body.model, routing_text)
        raw = _raw_prompt(body)
        # n choices: n rows; with a seed, choice i samples with seed + i (the first one as without n)
        requests = [GenerationRequest(expert=info.expert, messages=messages, prompt=raw, params=params.model_copy(
            update={"seed": None if params.seed is None else (params.seed + i + 2**63) % 2**64 - 2**63}))
            for i in range(body.n)]
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
        usage = _usage(results)
        if endpoint == "chat":
            payload: BaseModel = ChatCompletion(
                model=info.expert, usage=usage, mose=info,
                choices=[ChatChoice(index=i, message=ChatMessage(role="assistant", content=result.text),
                                    finish_reason=result.finish_reason, logprobs=_chat_logprobs(result.logprobs))
                         for i, result in enumerate(results)])
        else:
            payload = Completion(model=info.expert, usage=usage, mose=info, choices=[
                TextChoice(index=i, text=result.text, finish_reason=result.finish_reason,
                           logprobs=_legacy_logprobs(result.logprobs)) for i, result in enumerate(results)])
        self.metrics.observe_request(endpoint, info.expert, 200, time.perf_counter() - started)
        return JSONResponse(payload.model_dump(mode="json"), headers=headers)

    @staticmethod
    def _check_options(body: SamplingFields, params: SamplingParams) -> None:
        """Refuse combinations mose cannot answer, naming the field."""
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if params.logprobs is not None and body.stream:
            raise ApiError(400, "logprobs are not available when streaming; send stream: false",
                           param="logprobs")
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
            return MoseInfo(expert=decision.expert, domain=decision.domain, confidence=decision.confidence,
                            abstained=decision.abstained, alternatives=alternatives)
        if model in (BASE_EXPERT,):
            return MoseInfo(expert=model)
        if not await self.backend.has_expert(model):
            raise ApiError(404, f"unknown model {model!r}: use 'auto', one of the active experts "
                           f"(GET /v1/models lists them) or 'upstream:<name>'", param="model")
        return MoseInfo(expert=model)

    async def _upstream(self, endpoint: str, body: SamplingFields, question: str, messages: list[PoolMessage],
                        params: SamplingParams, started: float) -> Response:
        """Forward to the upstream model, then let the jury check its answer."""
        name = body.model[len(UPSTREAM_PREFIX):]
        upstream = self.config.upstreams.get(name)
        if upstream is None:
            raise ApiError(404, f"unknown upstream {name!r}; configured upstreams: "
                           f"{sorted(self.config.upstreams) or 'none'}", param="model")
        if body.stream:
            raise ApiError(400, "streaming is not available for upstream models: the verdict needs the whole answer",
                           param="stream")
        reply = await self.backend.upstream_chat(name, [m.model_dump() for m in messages], params.max_new_tokens,
                                                 params.temperature)
        text = reply["choices"][0]["message"]["content"] or ""
        info = MoseInfo(expert=body.model)
        headers = _mose_headers(info)
        if upstream.crosscheck:
            verdict = await self.backend.crosscheck(question, text, 3, False)
            self.metrics.crosschecks.labels(str(verdict.flagged).lower()).inc()
            info.verdict = verdict.model_dump(mode="json")
            headers |= {"x-mose-flagged": str(verdict.flagged).lower(), "x-mose-p-correct": f"{verdict.p_correct:.4f}",
                        "x-mose-verdict-id": verdict.id}
        usage = Usage(**{k: int(v) for k, v in (reply.get("usage") or {}).items()
                         if k in ("prompt_tokens", "completion_tokens", "total_tokens") and isinstance(v, int)})
        finish = reply["choices"][0].get("finish_reason") if reply["choices"][0].get("finish_reason") in ("stop", "length") else "stop"
        if endpoint == "chat":
            payload: BaseModel = ChatCompletion(model=body.model, usage=usage, mose=info, choices=[
                ChatChoice(message=ChatMessage(role="assistant", content=text), finish_reason=finish)])
        else:
            payload = Completion(model=body.model, usage=usage, mose=info,
                                 choices=[TextChoice(text=text, finish_reason=finish)])
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
            raise ApiError(400, f"max_tokens is {requested}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        try:
            return SamplingParams(
                max_new_tokens=requested or limits.default_max_tokens,
                temperature=body.temperature if (body.temperature or 0.0) >= MIN_TEMPERATURE else 0.0,
                top_p=body.top_p if body.top_p is not None else 1.0,
                stop=body.stop_list(),
                seed=body.seed,
                logprobs=body.logprob_alternatives(),
                prompt_logprobs=(body.logprob_alternatives() or 0) if echo else None,
            )
        except ValidationError as exc:  # the pool's own limits, should the request schema miss one
            raise ApiError(400, f"sampling parameters: {_describe_errors(exc.errors())}") from None

    def _check_prompt(self, chars: int) -> None:
        limit = self.config.limits.max_prompt_chars
        if chars > limit:
            raise ApiError(400, f"prompt is {chars} characters; this server allows at most {limit}",
                           param="messages")

    # ------------------------------------------------------------ admin

    async def _principal(self, request: Request, authorization: str | None) -> Principal:
        """The caller the gate authenticated (authenticated here if the gate was bypassed)."""
        principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
        if isinstance(principal, Principal):
            return principal
        return await authenticate(self.config.auth, authorization, self.backend)

    async def register_expert(self, body: RegisterExpertRequest, request: Request,
                              authorization: str | None = Header(default=None)) -> dict[str, Any]:
        actor = await self._principal(request, authorization)
        if actor.team is not None:  # refused before any file is decoded or written (the registry checks again)
            owner = body.manifest.get("owner")
            if owner != actor.team:
                shown = repr(owner) if isinstance(owner, str) else "none"
                raise ApiError(403, f"team {actor.team!r} may only register experts it owns, and this manifest "
                               f"names owner {shown}; set `owner: {actor.team}` in the manifest",
                               kind="permission_error")
            if body.activate:
                raise ApiError(403, f"activating an expert is for the registry operator; register it without "
                               f"'activate' (team {actor.team!r} may register, update and retire the experts "
                               "it owns)", kind="permission_error", param="activate")
        files: dict[str, bytes] = {}
        for path, encoded in body.files.items():
            try:
                files[path] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"files[{path!r}] is not valid base64", param="files") from None
        record = await self.backend.register(body.manifest, files, actor)
        if body.activate:
            record = await self.backend.set_status(record["name"], "activate", actor)
        return record

    async def activate_expert(self, name: str, request: Request,
                              authorization: str | None = Header(default=None)) -> dict[str, Any]:
        return await self.backend.set_status(name, "activate", await self._principal(request, authorization))

    async def retire_expert(self, name: str, request: Request,
                            authorization: str | None = Header(default=None)) -> dict[str, Any]:
        return await self.backend.set_status(name, "retire", await self._principal(request, authorization))

    async def quarantine_expert(self, name: str, body: QuarantineRequest, request: Request,
                                authorization: str | None = Header(default=None)) -> dict[str, Any]:
        return await self.backend.set_status(name, "quarantine", await self._principal(request, authorization),
                                             body.reason)


def _mose_headers(info: MoseInfo) -> dict[str, str]:
    headers = {"x-mose-expert": info.expert, "x-mose-abstained": str(info.abstained).lower()}
    if info.domain is not None:
        headers["x-mose-domain"] = info.domain
    if info.confidence is not None:
        headers["x-mose-confidence"] = f"{info.confidence:.4f}"
    return headers


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
    return result.model_copy(update={
        "text": prompt_text + ("" if score_only else result.text),
        "completion_tokens": 0 if score_only else result.completion_tokens,
        "finish_reason": "length" if score_only else result.finish_reason,
        "logprobs": logprobs, "prompt_logprobs": None})


def _usage(results: Sequence[GenerationResult]) -> Usage:
    """One request's usage: its prompt once, the tokens of every choice."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(result.completion_tokens for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                         top_logprobs=[ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top])
        for e in entries])


def _legacy_logprobs(entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
    """The completions endpoint's format: parallel lists, alternatives as {token: logprob}, each token's
    character offset in the text."""
    if entries is None:
        return None
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[None if e.logprob is None else {t.token: t.logprob for t in e.top}
                                            for e in entries],
                              text_offset=offsets)


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


async def _sse(endpoint: str, info: MoseInfo,
               pieces: AsyncIterator[str | GenerationResult] | Sequence[AsyncIterator[str | GenerationResult]],
               observe: Callable[[int], None], include_usage: bool = False) -> AsyncIterator[bytes]:
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
            body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": info.expert,
                    "choices": [choice], "mose": info.model_dump(mode="json")}
        else:
            choice = {"index": index, "text": delta, "finish_reason": finish, "logprobs": None}
            body = {"id": ident, "object": "text_completion", "created": created, "model": info.expert,
                    "choices": [choice], "mose": info.model_dump(mode="json")}
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
            usage = _usage([results[i] for i in sorted(results)]).model_dump()
            yield event({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": info.expert, "choices": [], "usage": usage,
                         "mose": info.model_dump(mode="json")})
        yield b"data: [DONE]\n\n"
    finally:
        observe(status)
        await items.aclose()
