"""Errors of the HTTP API: OpenAI's error body, the status of every error, and the one formatter of
validation errors.

Every error is an OpenAI-shaped JSON body (``{"error": {"message", "type", "param", "code"}}``): a 4xx
for what the client got wrong, 503 for something the request needs that is not available, 500 for
another fault of the server's, 502 for the upstream model's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import (
    AccessDeniedError,
    ConflictError,
    MoseError,
    NotFoundError,
    ServerError,
    StatusError,
    UnavailableError,
)
from serve.schemas import ErrorBody, ErrorResponse
from serve.upstream import UpstreamError

logger = logging.getLogger("mose.api")

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

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
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
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


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


def describe_validation(errors: Iterable[Mapping[str, Any]]) -> tuple[str, str | None]:
    """The one formatter of pydantic validation errors: a message naming each field that is wrong
    (``where: what``, joined by ``; ``) and the first such field, OpenAI's ``param``. Used for
    request bodies and for the pool's own sampling limits."""
    problems, param = [], None
    for err in errors:
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


class BodyTooLarge(Exception):
    """Raised by the counting ``receive`` of :class:`serve.api.middleware.BodyLimitMiddleware` once a
    body without Content-Length passes the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body is larger than the limit of {limit} bytes")


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer, all in OpenAI's error shape."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def document_errors_as_400(api: FastAPI) -> None:
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


def install_error_handlers(api: FastAPI) -> None:
    """Render every error raised while handling a request as OpenAI's error body with its status."""

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps what receive() raised
            return too_large(exc.__cause__.limit)
        return error_response(exc.status_code, _http_error_message(request, exc), headers=exc.headers)

    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(exc.errors())
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
            return error_response(
                503,
                "the expert pool is overloaded; retry shortly",
                kind="overloaded_error",
                headers={"Retry-After": "1"},
            )
        logger.exception("unhandled error")
        return error_response(500, "internal error; the server log has details", kind="server_error")


def _is_backpressure(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in {"BackPressureError", "DeploymentUnavailableError", "ActorDiedError", "RayActorError"}
