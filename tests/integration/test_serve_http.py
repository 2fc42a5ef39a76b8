"""The real application over real HTTP: routing, the OpenAI client, cross-checks, admin, limits."""

from __future__ import annotations

import base64
import json

import pytest

from tests._fixtures.experts import write_lora_expert

# Clear to the session's small test router too: "Solve for x: 3x + 5 = 20." sat 0.001-0.005
# above its out-of-distribution cut (support 0.628-0.631 against 0.627, moved by int8 batching)
# and was sometimes answered by the fallback; this phrasing has support 0.73.
CLEAR = [
    ("What are the symptoms of type 2 diabetes?", "medicine", "med-expert"),
    ("What causes high blood pressure ?", "medicine", "med-expert"),
    ("If 3x + 5 = 20, what is the value of x?", "math", "math-expert"),
    ("What is the derivative of x^2 + 3x?", "math", "math-expert"),
]


def chat(client, content, model="auto", **extra):
    return client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            "temperature": 0,
            **extra,
        },
    )


@pytest.mark.parametrize("query, domain, expert", CLEAR)
def test_auto_sends_clear_queries_to_their_vertical_expert(served, query, domain, expert):
    with served.client() as client:
        response = chat(client, query)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mose"]["domain"] == domain and body["mose"]["expert"] == expert
    assert body["mose"]["abstained"] is False
    assert response.headers["x-mose-expert"] == expert and response.headers["x-mose-domain"] == domain
    assert 0 < float(response.headers["x-mose-confidence"]) <= 1
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0


def test_official_openai_client_works_unchanged(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    models = [m.id for m in client.models.list()]
    assert {"auto", "med-expert", "math-expert"} <= set(models)
    reply = client.chat.completions.create(
        model="med-expert", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "What is asthma?"}]
    )
    assert reply.choices[0].message.content and reply.model == "med-expert"
    stream = client.chat.completions.create(
        model="auto",
        max_tokens=8,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": "Solve 2x = 10 for x."}],
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces).strip()
    completion = client.completions.create(model="math-expert", prompt="2 + 2 =", max_tokens=4, temperature=0)
    assert completion.choices[0].text is not None


def test_openai_fields_on_the_real_pool(served):
    """n, logprobs, top_logprobs and include_usage through the official client, decoded by the pool."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "What is asthma?"}]
    reply = client.chat.completions.create(
        model="med-expert", max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=2, messages=question
    )
    first, second = reply.choices
    assert first.message.content == second.message.content and reply.usage.completion_tokens == 12
    content = first.logprobs.content
    assert len(content) == 6 and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].token == e.token for e in content)  # greedy: the most likely token
    assert "".join(e.token for e in content) == first.message.content
    text = client.completions.create(
        model="med-expert", prompt="What is asthma?", max_tokens=6, temperature=0, logprobs=1
    )
    assert text.choices[0].logprobs.token_logprobs == pytest.approx([e.logprob for e in content], abs=1e-4)
    chunks = list(
        client.chat.completions.create(
            model="med-expert",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            messages=question,
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.message.content


def test_lm_eval_loglikelihood_requests_score_the_prompt(served):
    """lm-eval-harness's local-completions loglikelihood request (text prompts): the context and the
    continuation echoed with each token's log-prob, then one decoded token it drops."""
    context, continuation = "The capital of France is", " Paris"
    shape = {"model": "med-expert", "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    with served.client() as client:
        whole = client.post("/v1/completions", json=shape | {"prompt": [context + continuation]})
        alone = client.post("/v1/completions", json=shape | {"prompt": [context], "max_tokens": 0})
    assert whole.status_code == 200 and alone.status_code == 200, (whole.text, alone.text)
    scored, prefix = whole.json()["choices"][0], alone.json()["choices"][0]
    assert scored["text"].startswith(context + continuation) and prefix["text"] == context
    ctxlen = len(prefix["logprobs"]["tokens"])
    tokens, values = scored["logprobs"]["tokens"], scored["logprobs"]["token_logprobs"]
    assert "".join(tokens[ctxlen:-1]) == continuation and values[0] is None
    assert values[:ctxlen] == pytest.approx(prefix["logprobs"]["token_logprobs"], abs=1e-4)
    assert all(v < 0 for v in values[ctxlen:-1])
    tops = scored["logprobs"]["top_logprobs"][ctxlen:-1]
    assert all(len(top) == 1 for top in tops)  # what lm-eval compares to tell a greedy continuation
    assert scored["logprobs"]["text_offset"][ctxlen] == len(context)
    assert whole.json()["usage"]["completion_tokens"] == 1 and alone.json()["usage"]["completion_tokens"] == 0


def _sse_events(response) -> list:
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_streaming_is_server_sent_events_ending_with_done(served):
    body = {"model": "auto", "max_tokens": 6, "messages": [{"role": "user", "content": "What causes asthma?"}]}
    with served.client() as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # the same completion as without streaming, finish reason included
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


@pytest.mark.parametrize(
    "extra, reason", [({"max_tokens": 2}, "length"), ({"max_tokens": 40, "stop": ["Paris"]}, "stop")]
)
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_finish_reason_is_what_happened_streamed_or_not(served, endpoint, extra, reason):
    question = "What is the capital of France?"
    body = {"model": "base", "temperature": 0, **extra}
    body |= (
        {"messages": [{"role": "user", "content": question}]}
        if endpoint == "chat/completions"
        else {"prompt": question}
    )
    with served.client() as client:
        whole = client.post(f"/v1/{endpoint}", json=body).json()
        with client.stream("POST", f"/v1/{endpoint}", json={**body, "stream": True}) as response:
            events = _sse_events(response)
    assert whole["choices"][0]["finish_reason"] == reason
    assert events[-2]["choices"][0]["finish_reason"] == reason and events[-1] == "[DONE]"


def test_a_client_that_disconnects_mid_stream_stops_its_decoding(served):
    """The stream is cut after a few chunks; the pool's engine cancels the row instead of decoding
    it to max_tokens (counted in decoded tokens, not time)."""
    import time

    body = {
        "model": "med-expert",
        "max_tokens": 256,
        "temperature": 1.5,
        "seed": 11,
        "messages": [{"role": "user", "content": "Tell me everything about the history of medicine."}],
    }
    with served.client() as client:
        whole = client.post("/v1/chat/completions", json=body).json()
        assert whole["choices"][0]["finish_reason"] == "length", "this request must run to its limit"
        before = client.get("/healthz").json()["expert_pool"]["engine"]
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(8)) if line.startswith("data: ")) >= 3
        # leaving the block closed the connection; wait (bounded) until the pool has nothing running
        deadline = time.monotonic() + 120
        while True:
            after = client.get("/healthz").json()["expert_pool"]["engine"]
            if after["running"] == 0 and after["waiting"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert after["finished"]["cancelled"] == before["finished"]["cancelled"] + 1
    assert after["finished"]["length"] == before["finished"]["length"]
    assert after["tokens"] - before["tokens"] < 256


def test_route_and_models_endpoints(served):
    with served.client() as client:
        decision = client.post("/v1/route", json={"query": "What causes high blood pressure ?"}).json()
        models = client.get("/v1/models").json()
    assert decision["domain"] == "medicine" and decision["expert"] == "med-expert"
    assert len(decision["top_k"]) >= 2 and decision["top_k"][0]["p"] >= decision["top_k"][1]["p"]
    assert models["object"] == "list" and models["data"][0]["id"] == "auto"


def test_health_says_where_each_part_runs(served):
    with served.client() as client:
        health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["router"]["provider"] == "CPUExecutionProvider" and not health["router"]["fallback_only"]
    # no GPU here: the pool runs on CPU and Ray gave its replica none (tests/integration/test_serve_cuda.py)
    assert health["expert_pool"]["device"] == "cpu" and health["expert_pool"]["gpu_ids"] == []
    assert {"base", "math-expert", "med-expert"} <= set(health["expert_pool"]["experts"])


def test_crosscheck_returns_a_verdict_and_feedback_moves_weights(served):
    with served.client() as client:
        verdict = client.post("/v1/crosscheck", json={"question": "What is 12 * 3?", "answer": "36", "k": 2}).json()
        assert 0 <= verdict["p_correct"] <= 1 and isinstance(verdict["flagged"], bool)
        assert verdict["jurors"][-1]["expert"] == "base" and len(verdict["jurors"]) == 3
        feedback = client.post("/v1/feedback", json={"verdict_id": verdict["id"], "correct": True})
        assert feedback.status_code == 200 and set(feedback.json()["weights"]) == {
            j["expert"] for j in verdict["jurors"]
        }
        again = client.post("/v1/feedback", json={"verdict_id": verdict["id"], "correct": False})
        assert again.status_code == 409 and "already recorded" in again.json()["error"]["message"]
        unknown = client.post("/v1/feedback", json={"verdict_id": "vrd-unknown", "correct": True})
        assert unknown.status_code == 404
        own = client.post(
            "/v1/crosscheck", json={"question": "What is 12 * 3?", "answer": "36", "k": 1, "own_answers": True}
        ).json()
        assert isinstance(own["agreement"], bool) and all(j["own_answer"] for j in own["jurors"])


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "request body is not valid JSON",
        ),
        ({"json": {"model": "auto", "messages": []}}, 400, "messages: List should have at least 1 item"),
        ({"json": {"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}}, 404, "unknown model 'nobody'"),
        (
            {"json": {"model": "auto", "messages": [{"role": "user", "content": "x" * 9000}]}},
            400,
            "prompt is 9000 characters; this server allows at most 8000",
        ),
        (
            {"json": {"model": "auto", "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}},
            400,
            "max_tokens is 100000; this server allows at most 256",
        ),
        (
            {"json": {"model": "auto", "max_tokens": -1, "messages": [{"role": "user", "content": "hi"}]}},
            400,
            "max_tokens must be at least 1 (got -1)",
        ),
        (
            {"json": {"model": "auto", "temperature": 5, "messages": [{"role": "user", "content": "hi"}]}},
            400,
            "temperature: Input should be less than or equal to 2",
        ),
    ],
)
def test_bad_requests_get_clear_4xx(served, kwargs, status, message):
    with served.client() as client:
        response = client.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_body_over_the_limit_is_refused_with_413(served):
    with served.client() as client:
        response = client.post(
            "/v1/chat/completions", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert "larger than the limit of 1000000 bytes" in response.json()["error"]["message"]


def _upload(folder, name, domain):
    manifest_path = write_lora_expert(folder, name, seed=99, domain=domain)
    import yaml

    manifest = yaml.safe_load(manifest_path.read_text())
    files = {rel: base64.b64encode((manifest_path.parent / rel).read_bytes()).decode() for rel in manifest["files"]}
    return {"manifest": manifest, "files": files}


def test_admin_calls_need_the_right_token_and_change_nothing_otherwise(served, tmp_path):
    from registry import Registry
    from registry.home import MoseHome

    body = _upload(tmp_path, "sneaky-expert", "finance")
    with Registry.open(MoseHome.from_env(served.home)) as reg:
        before = [(r.ref, r.status) for r in reg.list()]
    with served.client() as client:
        missing = client.post("/v1/experts", json=body)
        wrong = client.post("/v1/experts", json=body, headers={"Authorization": "Bearer not-the-token"})
        retire = client.post("/v1/experts/med-expert/retire", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    assert wrong.status_code == 403 and wrong.json()["error"]["message"] == "the admin token is not valid"
    assert retire.status_code == 403
    assert served.token not in served.log.read_text()
    with Registry.open(MoseHome.from_env(served.home)) as reg:
        assert [(r.ref, r.status) for r in reg.list()] == before
        assert reg.audit_verify().ok


def test_registering_over_http_makes_an_expert_servable_without_restart(served, tmp_path):
    body = _upload(tmp_path, "fin-expert", "finance") | {"activate": True}
    with served.client() as client:
        created = client.post("/v1/experts", json=body, headers=served.admin())
        assert created.status_code == 200, created.text
        assert created.json()["status"] == "active"
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        reply = chat(client, "What is compound interest?", model="fin-expert")
    assert "fin-expert" in models
    assert reply.status_code == 200 and reply.json()["mose"]["expert"] == "fin-expert"


def test_upload_with_a_bad_manifest_gets_the_registry_message_and_stores_nothing(served, tmp_path):
    from registry import Registry
    from registry.home import MoseHome

    body = _upload(tmp_path, "thin-expert", "finance")
    body["manifest"]["example_queries"] = body["manifest"]["example_queries"][:5]
    with served.client() as client:
        response = client.post("/v1/experts", json=body, headers=served.admin())
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("manifest: example_queries: ")
    assert "at least 20" in response.json()["error"]["message"]
    with Registry.open(MoseHome.from_env(served.home)) as reg:
        assert not reg.list(name="thin-expert")


def test_upload_with_escaping_paths_is_refused(served, tmp_path):
    body = _upload(tmp_path, "escape-expert", "finance")
    body["files"]["../../evil.json"] = base64.b64encode(b"{}").decode()
    with served.client() as client:
        response = client.post("/v1/experts", json=body, headers=served.admin())
    assert response.status_code == 400
    assert "uploaded files do not match manifest.files" in response.json()["error"]["message"]


def test_metrics_count_what_was_sent(served):
    with served.client() as client:
        for _ in range(3):
            chat(client, "What causes high blood pressure ?")
        text = client.get("/metrics").text
    assert 'mose_requests_total{endpoint="chat",expert="med-expert",status="200"}' in text
    count = float(text.split('mose_requests_total{endpoint="chat",expert="med-expert",status="200"} ')[1].split()[0])
    assert count >= 3
    assert "mose_route_confidence_bucket" in text and "mose_expert_batch_size_count" in text


def test_a_calibrator_with_a_truthfulness_probe_gets_the_base_models_state_through_ray(served):
    """A calibrator trained while the server runs is picked up by the CrossCheck replica; its
    probe then needs the base model's answer state, which the pool replica returns through the
    Ray handle with the likelihoods (a calibrator fitted on random numbers: the plumbing is tested
    here, its quality in the benchmarks)."""
    import time

    import numpy as np

    from jury.calibrator import FEATURES, CalibratorConfig, fit_calibrator, save_calibrator
    from registry.home import MoseHome

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    calibrator = fit_calibrator(
        rng.normal(size=(60, len(FEATURES))), labels, CalibratorConfig(probe_layer=20), rng.normal(size=(60, 576))
    )  # SmolLM2-135M's hidden width
    calibrator.trained_on["adapters_read_question"] = False
    save_calibrator(calibrator, MoseHome.from_env(served.home).crosscheck_dir)
    body = {"question": "What is the boiling point of water at sea level?", "answer": "100 degrees Celsius.", "k": 1}
    deadline = time.monotonic() + 60
    with served.client() as client:
        while True:  # the replica looks for a new calibrator every few seconds, on a verdict
            response = client.post("/v1/crosscheck", json=body)
            assert response.status_code == 200, response.text
            verdict = response.json()
            if verdict["calibrator"] == calibrator.version or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    assert verdict["calibrator"] == calibrator.version
    assert "base_probe" in verdict["evidence"] and 0.0 <= verdict["p_correct"] <= 1.0
    assert all("answer_state" not in juror for juror in verdict["jurors"])
