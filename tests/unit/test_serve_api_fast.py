"""The HTTP layer through the :class:`~serve.backend.Backend` seam, without Ray: every endpoint's
answer and the error statuses it documents, each in OpenAI's error shape, over
``httpx.ASGITransport`` against a fake backend (the whole file runs in seconds)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from experts.types import GenerationRequest, GenerationResult
from jury.jury import JurorEvidence, Verdict
from registry.errors import (
    AccessDeniedError,
    ConflictError,
    NotFoundError,
    ServerError,
    StatusError,
    UnavailableError,
)
from registry.teams import OPERATOR, TOKEN_PREFIX, Principal
from router_model.runtime import DomainScore, RouteDecision
from serve.api import build_api
from serve.backend import Backend
from serve.config import AuthConfig, LimitsConfig, ServeConfig, UpstreamConfig
from serve.upstream import UpstreamError

ADMIN_TOKEN = "operator-secret-token"
TEAM_TOKEN = TOKEN_PREFIX + "lawyers_" + "s" * 43
EXPERTS = [{"name": "demo-law", "version": "0.1.0", "domains": ["law"], "owner": "lawyers", "kind": "lora"}]


class FakeBackend(Backend):
    """Answers like the Ray ingress from fixed data; ``fail[method]`` is raised by that method
    instead, and ``gate`` (when set) holds ``route`` until it is released."""

    def __init__(self) -> None:
        self.fail: dict[str, Exception] = {}
        self.gate: asyncio.Event | None = None
        self.entered: asyncio.Event | None = None
        self.calls: list[tuple[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}

    def _check(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    async def route(self, query: str) -> RouteDecision:
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        self._check("route")
        return RouteDecision(
            domain="law",
            expert="demo-law",
            confidence=0.9,
            top_k=[
                DomainScore(domain="law", expert="demo-law", p=0.9),
                DomainScore(domain="medicine", expert="base", p=0.1),
            ],
        )

    def _result(self, request: GenerationRequest) -> GenerationResult:
        return GenerationResult(
            expert=request.expert,
            text=f"answer from {request.expert}",
            finish_reason="stop",
            prompt_tokens=7,
            completion_tokens=3,
        )

    async def generate(self, request: GenerationRequest) -> tuple[GenerationResult, int]:
        self._check("generate")
        self.calls.append(("generate", request))
        return self._result(request), 1

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        self.calls.append(("stream", request))
        for piece in ("answer ", "from ", request.expert):
            yield piece
        self._check("stream")
        yield self._result(request)

    async def crosscheck(self, question: str, answer: str, k: int, own_answers: bool) -> Verdict:
        self._check("crosscheck")
        juror = JurorEvidence(
            expert="base", logp_given_question=-1.0, logp_without_question=-2.0, pmi=1.0, answer_tokens=3
        )
        return Verdict(id="v-1", p_correct=0.8, flagged=False, threshold=0.5, jurors=[juror])

    async def feedback(self, verdict_id: str, correct: bool) -> dict[str, float]:
        self._check("feedback")
        if verdict_id != "v-1":
            raise NotFoundError(f"unknown verdict {verdict_id!r}")
        return {"base": 1.1}

    async def upstream_chat(
        self, name: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
    ) -> dict[str, Any]:
        self._check("upstream_chat")
        return {
            "choices": [{"message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }

    async def experts(self) -> list[dict[str, Any]]:
        return EXPERTS

    async def authenticate_team(self, token: str) -> str:
        if token != TEAM_TOKEN:
            raise AccessDeniedError("this team token is not valid (wrong, rotated or revoked)")
        return "lawyers"

    async def register(self, manifest: dict[str, Any], files: dict[str, bytes], actor: Principal) -> dict[str, Any]:
        self._check("register")
        self.calls.append(("register", (manifest, files, actor)))
        record = {
            "name": manifest["name"],
            "version": manifest.get("version", "0.1.0"),
            "status": "registered",
            "kind": "lora",
            "domains": manifest.get("domains", []),
        }
        self.records[record["name"]] = record
        return record

    async def set_status(self, name: str, action: str, actor: Principal, reason: str | None = None) -> dict[str, Any]:
        self._check("set_status")
        self.calls.append(("set_status", (name, action, actor, reason)))
        if name not in self.records:
            raise NotFoundError(f"unknown expert {name!r}")
        status = {"activate": "active", "retire": "retired", "quarantine": "quarantined"}[action]
        self.records[name] = {**self.records[name], "status": status}
        return self.records[name]

    async def health(self) -> dict[str, Any]:
        self._check("health")
        return {"router": "v0001"}


def config(**changes: Any) -> ServeConfig:
    return ServeConfig(
        auth=AuthConfig(admin_token=ADMIN_TOKEN),
        upstreams={"big": UpstreamConfig(base_url="http://upstream.invalid/v1")},
        **changes,
    )


def serve(backend: FakeBackend, settings: ServeConfig | None = None) -> httpx.AsyncClient:
    app = build_api(settings or config(), backend)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://mose.test"
    )


def request(
    method: str, path: str, backend: FakeBackend | None = None, settings: ServeConfig | None = None, **kwargs: Any
) -> httpx.Response:
    async def go() -> httpx.Response:
        async with serve(backend or FakeBackend(), settings) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error body, after checking the status and OpenAI's error shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == str(status)
    return body["error"]


def admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


CHAT = {"model": "demo-law", "messages": [{"role": "user", "content": "Is a verbal contract binding?"}]}
UPLOAD = {
    "manifest": {"name": "demo-tax", "version": "0.1.0", "domains": ["tax"], "owner": "lawyers"},
    "files": {"adapter_model.safetensors": base64.b64encode(b"weights").decode()},
}

# ------------------------------------------------------------------ success


def test_healthz_and_metrics():
    health = request("GET", "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "router": "v0001"}
    metrics = request("GET", "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_models_lists_auto_the_active_experts_and_the_upstreams():
    response = request("GET", "/v1/models")
    assert response.status_code == 200
    cards = {card["id"]: card for card in response.json()["data"]}
    assert list(cards) == ["auto", "demo-law", "upstream:big"]
    assert cards["demo-law"]["owned_by"] == "lawyers" and cards["demo-law"]["mose"] == EXPERTS[0]


def test_route_answers_the_routers_decision():
    response = request("POST", "/v1/route", json={"query": "Is a verbal contract binding?"})
    assert response.status_code == 200
    assert response.json()["expert"] == "demo-law" and response.json()["confidence"] == 0.9


def test_chat_completion_with_a_named_expert():
    response = request("POST", "/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "answer from demo-law"}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert response.headers["x-mose-expert"] == "demo-law"


def test_auto_completion_goes_where_the_router_says_with_its_alternatives():
    response = request("POST", "/v1/completions", json={"model": "auto", "prompt": "Is a verbal contract binding?"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] == "answer from demo-law"
    assert body["mose"]["domain"] == "law" and body["mose"]["alternatives"][0]["domain"] == "medicine"
    assert response.headers["x-mose-confidence"] == "0.9000"


def test_streamed_chat_completion_is_server_sent_events():
    response = request("POST", "/v1/chat/completions", json=CHAT | {"stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "answer from demo-law"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_error_after_the_stream_started_is_reported_in_band():
    backend = FakeBackend()
    backend.fail["stream"] = UnavailableError("the expert pool is restarting")
    response = request("POST", "/v1/chat/completions", backend, json=CHAT | {"stream": True})
    assert response.status_code == 200
    assert '"message": "the expert pool is restarting"' in response.text and "[DONE]" not in response.text


def test_upstream_completion_carries_the_jurys_verdict():
    response = request("POST", "/v1/chat/completions", json=CHAT | {"model": "upstream:big"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Paris" and body["mose"]["verdict"]["id"] == "v-1"
    assert response.headers["x-mose-verdict-id"] == "v-1" and response.headers["x-mose-flagged"] == "false"


def test_crosscheck_and_feedback():
    verdict = request("POST", "/v1/crosscheck", json={"question": "Capital of France?", "answer": "Paris"})
    assert verdict.status_code == 200 and verdict.json()["p_correct"] == 0.8
    feedback = request("POST", "/v1/feedback", json={"verdict_id": "v-1", "correct": True})
    assert feedback.status_code == 200
    assert feedback.json() == {"verdict_id": "v-1", "correct": True, "weights": {"base": 1.1}}


def test_the_operator_registers_activates_retires_and_quarantines():
    backend = FakeBackend()

    async def go() -> list[httpx.Response]:
        async with serve(backend) as client:
            return [
                await client.post("/v1/experts", json=UPLOAD | {"activate": True}, headers=admin()),
                await client.post("/v1/experts/demo-tax/retire", headers=admin()),
                await client.post("/v1/experts/demo-tax/activate", headers=admin()),
                await client.post("/v1/experts/demo-tax/quarantine", json={"reason": "leaks"}, headers=admin()),
            ]

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert [r.json()["status"] for r in responses] == ["active", "retired", "active", "quarantined"]
    manifest, files, actor = backend.calls[0][1]
    assert files == {"adapter_model.safetensors": b"weights"} and actor.actor == OPERATOR
    assert backend.calls[-1][1][3] == "leaks"


def test_a_team_registers_its_own_expert():
    backend = FakeBackend()
    response = request("POST", "/v1/experts", backend, json=UPLOAD, headers=admin(TEAM_TOKEN))
    assert response.status_code == 200, response.text
    assert backend.calls[0][1][2].team == "lawyers"


def test_the_openapi_schema_documents_400_not_422():
    schema = request("GET", "/openapi.json").json()
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert not any("422" in op["responses"] for op in operations)
    assert schema["paths"]["/v1/chat/completions"]["post"]["responses"]["404"]["description"]


# ------------------------------------------------------------------ 400: the request is wrong


@pytest.mark.parametrize(
    ("path", "body", "message", "param"),
    [
        ("/v1/route", {}, "query: Field required", "query"),
        ("/v1/route", {"query": ""}, "query: String should have at least 1 character", "query"),
        ("/v1/route", {"query": 5}, "query: Input should be a valid string", "query"),
        (
            "/v1/crosscheck",
            {"question": "q", "answer": "a", "k": 99},
            "k: Input should be less than or equal to 16",
            "k",
        ),
        (
            "/v1/feedback",
            {"verdict_id": "v-1", "correct": "perhaps"},
            "correct: Input should be a valid boolean",
            "correct",
        ),
        (
            "/v1/chat/completions",
            {"model": "demo-law", "messages": [{"role": "user"}]},
            "messages.0.content: Field required",
            "messages.0.content",
        ),
    ],
)
def test_an_invalid_body_is_a_400_naming_the_field(path, body, message, param):
    found = error(request("POST", path, json=body), 400)
    assert found["message"].startswith(message), found
    assert (found["param"], found["type"]) == (param, "invalid_request_error")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'{"query": "\xff"}', "request body is not valid UTF-8 (byte 0xff"),
    ],
)
def test_a_body_that_cannot_be_parsed_is_a_400_that_says_why(content, message):
    found = error(request("POST", "/v1/route", content=content, headers={"content-type": "application/json"}), 400)
    assert found["message"].startswith(message), found


def test_limits_of_the_request_are_400s():
    settings = config(limits=LimitsConfig(max_prompt_chars=10, max_tokens=8, default_max_tokens=4))
    long = error(request("POST", "/v1/route", settings=settings, json={"query": "x" * 11}), 400)
    assert long["message"] == "prompt is 11 characters; this server allows at most 10"
    tokens = error(
        request(
            "POST",
            "/v1/chat/completions",
            settings=settings,
            json={**CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9},
        ),
        400,
    )
    assert (tokens["message"], tokens["param"]) == ("max_tokens is 9; this server allows at most 8", "max_tokens")


def test_options_mose_cannot_answer_are_400s():
    found = error(request("POST", "/v1/chat/completions", json=CHAT | {"model": "upstream:big", "stream": True}), 400)
    assert found["param"] == "stream" and "upstream" in found["message"]
    found = error(request("POST", "/v1/chat/completions", json=CHAT | {"stream_options": {"include_usage": True}}), 400)
    assert found["param"] == "stream_options"


def test_a_file_that_is_not_base64_is_a_400():
    upload = UPLOAD | {"files": {"adapter_model.safetensors": "not base64!"}}
    found = error(request("POST", "/v1/experts", json=upload, headers=admin()), 400)
    assert (found["message"], found["param"]) == ("files['adapter_model.safetensors'] is not valid base64", "files")


def test_a_quarantine_needs_a_reason():
    found = error(request("POST", "/v1/experts/demo-law/quarantine", json={"reason": ""}, headers=admin()), 400)
    assert found["param"] == "reason"


# ------------------------------------------------------------------ 401 / 403: who may call the admin endpoints


def test_admin_without_a_token_is_401_with_www_authenticate():
    response = request("POST", "/v1/experts/demo-law/activate")
    found = error(response, 401)
    assert found["type"] == "authentication_error" and response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("token", ["wrong-token", TOKEN_PREFIX + "lawyers_" + "x" * 43])
def test_admin_with_a_wrong_operator_or_team_token_is_403(token):
    found = error(request("POST", "/v1/experts/demo-law/activate", headers=admin(token)), 403)
    assert found["type"] == "permission_error" and token not in found["message"]


def test_admin_endpoints_are_403_when_disabled():
    found = error(request("POST", "/v1/experts/demo-law/activate", settings=ServeConfig(), headers=admin()), 403)
    assert "disabled" in found["message"]


def test_a_team_may_not_register_for_another_team_nor_activate():
    backend = FakeBackend()
    other = {**UPLOAD, "manifest": {**UPLOAD["manifest"], "owner": "doctors"}}
    found = error(request("POST", "/v1/experts", backend, json=other, headers=admin(TEAM_TOKEN)), 403)
    assert "may only register experts it owns" in found["message"]
    found = error(
        request("POST", "/v1/experts", backend, json=UPLOAD | {"activate": True}, headers=admin(TEAM_TOKEN)), 403
    )
    assert found["param"] == "activate" and not backend.calls


def test_a_refusal_of_the_registry_is_403():
    backend = FakeBackend()
    backend.fail["set_status"] = AccessDeniedError("team 'lawyers' does not own 'demo-med'")
    found = error(request("POST", "/v1/experts/demo-med/retire", backend, headers=admin(TEAM_TOKEN)), 403)
    assert found["message"] == "team 'lawyers' does not own 'demo-med'"


# ------------------------------------------------------------------ 404 / 405


def test_unknown_model_expert_upstream_verdict_and_endpoint_are_404s():
    found = error(request("POST", "/v1/chat/completions", json=CHAT | {"model": "demo-astronomy"}), 404)
    assert found["param"] == "model" and "GET /v1/models" in found["message"]
    found = error(request("POST", "/v1/chat/completions", json=CHAT | {"model": "upstream:huge"}), 404)
    assert "configured upstreams: ['big']" in found["message"]
    found = error(request("POST", "/v1/experts/demo-astronomy/activate", headers=admin()), 404)
    assert found["message"] == "unknown expert 'demo-astronomy'"
    found = error(request("POST", "/v1/feedback", json={"verdict_id": "v-9", "correct": True}), 404)
    assert found["message"] == "unknown verdict 'v-9'"
    found = error(request("GET", "/v1/nothing"), 404)
    assert found["message"] == "no such endpoint: GET /v1/nothing"


def test_a_wrong_method_is_405():
    assert error(request("GET", "/v1/route"), 405)["message"] == "GET is not allowed on /v1/route"


# ------------------------------------------------------------------ 409


@pytest.mark.parametrize(
    "fault",
    [
        ConflictError("demo-tax@0.1.0 exists with other digests"),
        StatusError("demo-tax is retired; register a new version"),
    ],
)
def test_a_conflict_with_the_registrys_state_is_409(fault):
    backend = FakeBackend()
    backend.fail["register"] = fault
    found = error(request("POST", "/v1/experts", backend, json=UPLOAD, headers=admin()), 409)
    assert found["message"] == str(fault)


def test_feedback_on_a_verdict_already_judged_is_409():
    backend = FakeBackend()
    backend.fail["feedback"] = ConflictError("verdict 'v-1' already has feedback")
    assert error(request("POST", "/v1/feedback", backend, json={"verdict_id": "v-1", "correct": False}), 409)


# ------------------------------------------------------------------ 413


def test_a_body_over_the_limit_is_413_with_or_without_content_length():
    settings = config(limits=LimitsConfig(max_body_bytes=100))
    big = json.dumps({"query": "x" * 200}).encode()
    found = error(
        request("POST", "/v1/route", settings=settings, content=big, headers={"content-type": "application/json"}), 413
    )
    assert found["message"] == "request body is larger than the limit of 100 bytes"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 50):
            yield big[start : start + 50]

    found = error(
        request("POST", "/v1/route", settings=settings, content=chunks(), headers={"content-type": "application/json"}),
        413,
    )
    assert found["message"] == "request body is larger than the limit of 100 bytes"


def test_uploads_have_their_own_limit_and_only_after_the_token_is_checked():
    settings = config(limits=LimitsConfig(max_body_bytes=100, max_upload_bytes=10_000))
    assert request("POST", "/v1/experts", settings=settings, json=UPLOAD, headers=admin()).status_code == 200
    heavy = UPLOAD | {"files": {"adapter_model.safetensors": "A" * 20_000}}
    error(request("POST", "/v1/experts", settings=settings, json=heavy, headers=admin()), 413)
    error(request("POST", "/v1/experts", settings=settings, json=heavy), 401)


# ------------------------------------------------------------------ 429


def test_beyond_the_requests_in_flight_is_429_with_retry_after():
    backend = FakeBackend()
    backend.gate, backend.entered = asyncio.Event(), asyncio.Event()

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with serve(backend, config(limits=LimitsConfig(max_queued_requests=1))) as client:
            first = asyncio.ensure_future(client.post("/v1/route", json={"query": "held"}))
            await backend.entered.wait()
            second = await client.post("/v1/route", json={"query": "refused"})
            backend.gate.set()
            return await first, second

    first, second = asyncio.run(go())
    assert first.status_code == 200
    found = error(second, 429)
    assert found["type"] == "rate_limit_error" and second.headers["retry-after"] == "1"
    assert request("GET", "/healthz", backend).status_code == 200  # not counted: not under /v1/


# ------------------------------------------------------------------ 5xx: the server's faults


class BackPressureError(Exception):
    """Named like Ray Serve's: a deployment's queue is full."""


@pytest.mark.parametrize(
    ("path", "method", "body"),
    [
        ("/v1/route", "route", {"query": "Is a verbal contract binding?"}),
        ("/v1/chat/completions", "generate", CHAT),
        ("/v1/crosscheck", "crosscheck", {"question": "Capital of France?", "answer": "Paris"}),
    ],
)
@pytest.mark.parametrize(
    ("fault", "status", "kind"),
    [
        (UnavailableError("no router artifact: train one with `mose router train`"), 503, "unavailable_error"),
        (ServerError("router artifact v0002 is missing router.onnx"), 500, "server_error"),
    ],
)
def test_server_faults_are_5xx_with_their_message(path, method, body, fault, status, kind):
    backend = FakeBackend()
    backend.fail[method] = fault
    found = error(request("POST", path, backend, json=body), status)
    assert (found["message"], found["type"]) == (str(fault), kind)


def test_backpressure_is_503_with_retry_after():
    backend = FakeBackend()
    backend.fail["generate"] = BackPressureError("queue full")
    response = request("POST", "/v1/chat/completions", backend, json=CHAT)
    assert error(response, 503)["type"] == "overloaded_error" and response.headers["retry-after"] == "1"


def test_an_unexpected_exception_is_a_500_without_its_details():
    backend = FakeBackend()
    backend.fail["health"] = RuntimeError("secret internal state")
    found = error(request("GET", "/healthz", backend), 500)
    assert "secret" not in found["message"] and found["type"] == "server_error"


def test_the_upstream_failing_is_502():
    backend = FakeBackend()
    backend.fail["upstream_chat"] = UpstreamError("upstream 'big' answered 500")
    found = error(request("POST", "/v1/chat/completions", backend, json=CHAT | {"model": "upstream:big"}), 502)
    assert (found["message"], found["type"]) == ("upstream 'big' answered 500", "upstream_error")
