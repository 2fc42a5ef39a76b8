"""The admin endpoints (``/v1/experts``: register, activate, retire, quarantine) and who may call them.

The caller is the operator (``MOSE_ADMIN_TOKEN``, compared in constant time, or anyone in insecure
local mode) or a team (its token, checked by the registry), authenticated by
:class:`serve.api.middleware.AdminGateMiddleware` before the body is read.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from registry.errors import AccessDeniedError
from registry.teams import OPERATOR, Principal, looks_like_team_token
from serve.api.errors import ApiError, errors, find_mose_error
from serve.backend import Backend
from serve.config import AuthConfig, ServeConfig
from serve.schemas import ExpertRecordOut

ADMIN_PREFIX = "/v1/experts"

PRINCIPAL_SCOPE_KEY = "mose.principal"
"""Where :class:`~serve.api.middleware.AdminGateMiddleware` leaves the authenticated caller for the admin handlers."""


class RegisterExpertRequest(BaseModel):
    """Register an expert over HTTP: the manifest and each file's bytes, base64-encoded."""

    model_config = ConfigDict(extra="forbid")

    manifest: dict[str, Any]
    """The expert manifest (the same fields as manifest.yaml)."""

    files: dict[str, str] = Field(default_factory=dict)
    """Relative path -> base64 of the file's bytes; every path in ``manifest.files``."""

    activate: bool = False
    """Activate right after registration (routable at once)."""


class QuarantineRequest(BaseModel):
    """Why an expert is taken out of service (recorded in the audit log)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=1000)
    """Why the expert is quarantined."""


def authorize_admin(auth: AuthConfig, authorization: str | None) -> str:
    """Constant-time check of the operator's bearer token; returns the operator's name for the audit log."""
    if auth.admin_mode == "off":
        raise ApiError(
            403,
            "admin endpoints are disabled on this server (start it with MOSE_ADMIN_TOKEN set)",
            kind="permission_error",
        )
    if auth.admin_mode == "insecure":
        return "insecure-local-admin"
    if not authorization or not authorization.startswith("Bearer "):
        raise ApiError(
            401,
            "admin endpoints need 'Authorization: Bearer <token>'",
            kind="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = authorization[len("Bearer ") :].encode()
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
        token = authorization[len("Bearer ") :] if refused.status == 403 and authorization else ""
        if auth.admin_mode == "off" or not looks_like_team_token(token):
            raise
    try:
        return Principal.of_team(await backend.authenticate_team(token))
    except Exception as exc:
        known = find_mose_error(exc)
        if isinstance(known, AccessDeniedError):
            raise ApiError(403, str(known), kind="permission_error") from None
        raise


def admin_router(config: ServeConfig, backend: Backend) -> APIRouter:
    """``POST /v1/experts`` and ``/v1/experts/{name}/{activate,retire,quarantine}``."""
    handlers = _AdminHandlers(config, backend)
    router = APIRouter()
    admin = errors(400, 401, 403, 404, 409, 413, 429)
    router.post(ADMIN_PREFIX, response_model=ExpertRecordOut, responses=admin)(handlers.register_expert)
    router.post(f"{ADMIN_PREFIX}/{{name}}/activate", response_model=ExpertRecordOut, responses=admin)(
        handlers.activate_expert
    )
    router.post(f"{ADMIN_PREFIX}/{{name}}/retire", response_model=ExpertRecordOut, responses=admin)(
        handlers.retire_expert
    )
    router.post(f"{ADMIN_PREFIX}/{{name}}/quarantine", response_model=ExpertRecordOut, responses=admin)(
        handlers.quarantine_expert
    )
    return router


class _AdminHandlers:
    """The admin handlers bound to one config and backend (no docstrings on the handlers: they would
    become the operations' descriptions in the OpenAPI schema)."""

    def __init__(self, config: ServeConfig, backend: Backend) -> None:
        self.config, self.backend = config, backend

    async def _principal(self, request: Request, authorization: str | None) -> Principal:
        """The caller the gate authenticated (authenticated here if the gate was bypassed)."""
        principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
        if isinstance(principal, Principal):
            return principal
        return await authenticate(self.config.auth, authorization, self.backend)

    async def register_expert(
        self, body: RegisterExpertRequest, request: Request, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        actor = await self._principal(request, authorization)
        if actor.team is not None:  # refused before any file is decoded or written (the registry checks again)
            owner = body.manifest.get("owner")
            if owner != actor.team:
                shown = repr(owner) if isinstance(owner, str) else "none"
                raise ApiError(
                    403,
                    f"team {actor.team!r} may only register experts it owns, and this manifest "
                    f"names owner {shown}; set `owner: {actor.team}` in the manifest",
                    kind="permission_error",
                )
            if body.activate:
                raise ApiError(
                    403,
                    f"activating an expert is for the registry operator; register it without "
                    f"'activate' (team {actor.team!r} may register, update and retire the experts "
                    "it owns)",
                    kind="permission_error",
                    param="activate",
                )
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

    async def activate_expert(
        self, name: str, request: Request, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        return await self.backend.set_status(name, "activate", await self._principal(request, authorization))

    async def retire_expert(
        self, name: str, request: Request, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        return await self.backend.set_status(name, "retire", await self._principal(request, authorization))

    async def quarantine_expert(
        self, name: str, body: QuarantineRequest, request: Request, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        return await self.backend.set_status(
            name, "quarantine", await self._principal(request, authorization), body.reason
        )
