"""The ASGI middlewares in front of every route, in the order they run: the admin gate, the body
limit, admission control. Each answers its refusal itself, in OpenAI's error shape."""

from __future__ import annotations

from typing import Any

from serve.api.admin_routes import ADMIN_PREFIX, PRINCIPAL_SCOPE_KEY, authenticate
from serve.api.errors import ApiError, BodyTooLarge, error_response, too_large
from serve.backend import Backend
from serve.config import AuthConfig
from serve.metrics import IngressMetrics
from serve.ui import UI_PREFIX


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
                    self.auth, header.decode("latin-1") if header is not None else None, self.backend
                )
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
                raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, limit: int) -> None:
        await too_large(limit)(scope, receive, send)


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
                429,
                f"server is at capacity ({self.limit} requests in flight); retry shortly",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            )
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
