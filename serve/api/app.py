"""The FastAPI app of one ingress replica: the middlewares, the error handlers and one router per
group of endpoints (mose's, OpenAI's, the admin's), plus the read-only catalogue pages."""

from __future__ import annotations

from fastapi import FastAPI

from serve.api.admin_routes import admin_router
from serve.api.errors import document_errors_as_400, install_error_handlers
from serve.api.middleware import AdminGateMiddleware, AdmissionMiddleware, BodyLimitMiddleware
from serve.api.mose_routes import mose_router
from serve.api.openai_routes import openai_router
from serve.backend import Backend
from serve.config import ServeConfig
from serve.metrics import IngressMetrics
from serve.ui import mount_catalogue


def build_api(config: ServeConfig, backend: Backend, metrics: IngressMetrics | None = None) -> FastAPI:
    """The FastAPI app for one ingress replica."""
    metrics = metrics or IngressMetrics()
    api = FastAPI(
        title="mose",
        version="0.1.0",
        description="Mixture of small experts: OpenAI-compatible completions routed to vertical experts.",
    )
    api.add_middleware(AdmissionMiddleware, limit=config.limits.max_queued_requests, metrics=metrics)
    api.add_middleware(
        BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes, max_upload_bytes=config.limits.max_upload_bytes
    )
    api.add_middleware(AdminGateMiddleware, auth=config.auth, backend=backend)  # added last: runs first
    install_error_handlers(api)
    api.include_router(mose_router(config, backend, metrics))
    api.include_router(openai_router(config, backend, metrics))
    api.include_router(admin_router(config, backend))
    mount_catalogue(api, backend, metrics)
    document_errors_as_400(api)
    return api
