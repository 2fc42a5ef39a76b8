"""A client's error is a 4xx and the server's own fault a 5xx: the HTTP layer maps MoseError
subclasses raised behind the API (here by a backend standing in for the Ray ingress), and every
error body has the same shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from registry.errors import (
    ConflictError,
    ManifestError,
    MoseError,
    NotFoundError,
    ServerError,
    StoredArtifactError,
    UnavailableError,
)
from serve.backend import Backend
from serve.config import ServeConfig


class FailingBackend(Backend):
    """Routes and cross-checks by raising the error it was given."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def route(self, query):
        raise self.error

    async def crosscheck(self, question, answer, k, own_answers):
        raise self.error

    async def experts(self):
        return []

    async def health(self):
        return {"status": "ok"}

    async def authenticate_team(self, token):
        raise AssertionError("not called")

    async def register(self, manifest, files, actor):
        raise AssertionError("not called")

    async def set_status(self, name, action, actor, reason=None):
        raise AssertionError("not called")

    async def generate(self, request):
        raise self.error

    def stream(self, request):
        raise self.error

    async def feedback(self, verdict_id, correct):
        raise AssertionError("not called")

    async def upstream_chat(self, name, messages, max_tokens, temperature):
        raise AssertionError("not called")


def call(error: Exception, path: str = "/v1/route", body: dict | None = None):
    from serve.api import build_api

    client = TestClient(build_api(ServeConfig(), FailingBackend(error)), raise_server_exceptions=False)
    response = client.post(path, json=body or {"query": "What causes high blood pressure?"})
    payload = response.json()
    assert set(payload) == {"error"} and {"message", "type", "code"} <= set(payload["error"]), payload
    return response.status_code, payload["error"]


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (
            UnavailableError("no router artifact in /srv/mose/router: train one with `mose router train`"),
            503,
            "unavailable_error",
        ),
        (ServerError("router artifact /srv/mose/router/v0002 is missing router.onnx"), 500, "server_error"),
        (
            StoredArtifactError("demo-law@0.3.0: adapter_model.safetensors does not match its registered sha256"),
            500,
            "server_error",
        ),
        (NotFoundError("unknown expert 'demo-astronomy'"), 404, "invalid_request_error"),
        (ConflictError("demo-law@0.3.0 exists with other digests"), 409, "invalid_request_error"),
        (ManifestError("domains: at least one domain"), 400, "invalid_request_error"),
        (MoseError("the router needs a non-empty text query"), 400, "invalid_request_error"),
    ],
)
def test_a_server_fault_is_a_5xx_and_a_client_error_a_4xx_with_its_message(error, status, kind):
    code, body = call(error)
    assert (code, body["type"], body["message"], body["code"]) == (status, kind, str(error), str(status))


def test_a_missing_calibrator_on_crosscheck_is_503_and_says_how_to_fix_it(tmp_path):
    from jury.calibrator import load_calibrator

    with pytest.raises(UnavailableError) as missing:
        load_calibrator(tmp_path / "crosscheck")
    code, body = call(missing.value, "/v1/crosscheck", {"question": "Who wrote Hamlet?", "answer": "Shakespeare"})
    assert code == 503 and "mose crosscheck train" in body["message"]


def test_an_unexpected_exception_is_a_500_without_its_details():
    code, body = call(RuntimeError("secret internal state"))
    assert code == 500 and "secret" not in body["message"] and body["type"] == "server_error"
