"""Upstream mode: a second mose process forwards to a real OpenAI-compatible server (the first
mose process), cross-checks the answer with its jury and attaches the verdict."""

from __future__ import annotations

import httpx
import pytest

from tests._fixtures.serve import free_port, start_server, stop_server, wait_until_healthy


@pytest.fixture(scope="module")
def checking_server(served, serve_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("upstream")
    config = folder / "serve.yaml"
    config.write_text(
        "upstreams:\n"
        f"  big: {{base_url: '{served.url}/v1', model: auto, timeout_s: 120}}\n"
        "  down: {base_url: 'http://127.0.0.1:9/v1', timeout_s: 5}\n"
    )
    port = free_port()
    log = folder / "serve.log"
    proc = start_server(serve_home, port, log, extra_args=("--config", str(config)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, log)
        yield url
    finally:
        assert stop_server(proc) == 0, log.read_text()[-3000:]


def test_upstream_answer_comes_back_with_a_verdict(checking_server):
    response = httpx.post(
        f"{checking_server}/v1/chat/completions",
        timeout=180,
        json={
            "model": "upstream:big",
            "max_tokens": 12,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What causes high blood pressure ?"}],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "upstream:big" and body["choices"][0]["message"]["content"]
    verdict = body["mose"]["verdict"]
    assert 0.0 <= verdict["p_correct"] <= 1.0 and verdict["jurors"][-1]["expert"] == "base"
    assert response.headers["x-mose-flagged"] == str(verdict["flagged"]).lower()
    assert response.headers["x-mose-verdict-id"] == verdict["id"]
    models = [m["id"] for m in httpx.get(f"{checking_server}/v1/models").json()["data"]]
    assert {"upstream:big", "upstream:down"} <= set(models)


@pytest.mark.parametrize(
    "model, stream, status, message",
    [
        ("upstream:nobody", False, 404, "unknown upstream 'nobody'; configured upstreams: ['big', 'down']"),
        ("upstream:big", True, 400, "streaming is not available for upstream models"),
        ("upstream:down", False, 502, "upstream 'down' is unreachable"),
    ],
)
def test_upstream_errors_are_clear(checking_server, model, stream, status, message):
    response = httpx.post(
        f"{checking_server}/v1/chat/completions",
        timeout=60,
        json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
