"""mose's own endpoints: ``GET /healthz``, ``GET /metrics``, ``POST /v1/route`` (the router's decision),
``POST /v1/crosscheck`` (the jury's verdict on an answer) and ``POST /v1/feedback`` (whether a checked
answer was correct)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from jury.jury import Verdict
from router_model.runtime import RouteDecision
from serve.api.errors import errors
from serve.api.openai_routes import check_prompt
from serve.backend import Backend
from serve.config import ServeConfig
from serve.metrics import IngressMetrics
from serve.schemas import CrosscheckRequest, FeedbackRequest, FeedbackResponse, Health, RouteRequest


def mose_router(config: ServeConfig, backend: Backend, metrics: IngressMetrics) -> APIRouter:
    """Health, metrics, routing, cross-checking and feedback."""
    handlers = _MoseHandlers(config, backend, metrics)
    router = APIRouter()
    router.get("/healthz", response_model=Health)(handlers.healthz)
    router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus metrics"}
        },
    )(handlers.metrics_text)
    router.post("/v1/route", response_model=RouteDecision, responses=errors(400, 413, 429, 503))(handlers.route)
    router.post("/v1/crosscheck", response_model=Verdict, responses=errors(400, 413, 429, 503))(handlers.crosscheck)
    router.post("/v1/feedback", response_model=FeedbackResponse, responses=errors(400, 404, 409, 413, 429))(
        handlers.feedback
    )
    return router


class _MoseHandlers:
    """mose's handlers bound to one config, backend and metrics set (no docstrings on the handlers:
    they would become the operations' descriptions in the OpenAPI schema)."""

    def __init__(self, config: ServeConfig, backend: Backend, metrics: IngressMetrics) -> None:
        self.config, self.backend, self.metrics = config, backend, metrics

    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", **(await self.backend.health())}

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def route(self, body: RouteRequest) -> RouteDecision:
        started = time.perf_counter()
        check_prompt(self.config.limits, len(body.query))
        decision = await self.backend.route(body.query)
        self.metrics.observe_route(decision.confidence, decision.abstained)
        self.metrics.observe_request("route", decision.expert, 200, time.perf_counter() - started)
        return decision

    async def crosscheck(self, body: CrosscheckRequest) -> dict[str, Any]:
        started = time.perf_counter()
        check_prompt(self.config.limits, len(body.question) + len(body.answer))
        verdict = await self.backend.crosscheck(body.question, body.answer, body.k, body.own_answers)
        self.metrics.crosschecks.labels(str(verdict.flagged).lower()).inc()
        self.metrics.observe_request("crosscheck", "jury", 200, time.perf_counter() - started)
        return verdict.model_dump(mode="json")

    async def feedback(self, body: FeedbackRequest) -> dict[str, Any]:
        weights = await self.backend.feedback(body.verdict_id, body.correct)
        return {"verdict_id": body.verdict_id, "correct": body.correct, "weights": weights}
