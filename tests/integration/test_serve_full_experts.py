"""Full-weight experts through Ray Serve model multiplexing, on the real server over HTTP.

Tiny full-weight experts (SmolLM2's vocabulary, random weights, one layer) are registered over the
admin API; each is loaded on demand by the ``FullExperts`` deployment, which keeps at most
``pool.max_full_experts_per_replica`` (2 by default) and unloads the least recently used.
"""

from __future__ import annotations

import base64
import json

import yaml

from tests._fixtures.experts import write_full_expert

NAMES = ("full-alpha", "full-beta", "full-gamma")


def _register_full(client, admin, folder, name, seed):
    manifest_path = write_full_expert(folder, name, seed=seed, domain="science")
    manifest = yaml.safe_load(manifest_path.read_text())
    files = {rel: base64.b64encode((manifest_path.parent / rel).read_bytes()).decode() for rel in manifest["files"]}
    response = client.post("/v1/experts", json={"manifest": manifest, "files": files, "activate": True}, headers=admin)
    assert response.status_code == 200, response.text
    assert response.json()["kind"] == "full"


def _chat(client, model, **extra):
    return client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Name a planet."}],
            "max_tokens": 4,
            "temperature": 0,
            **extra,
        },
    )


def _loaded(client) -> list[str]:
    health = client.get("/healthz").json()
    return sorted(health["full_experts"]["loaded"])


def test_full_experts_load_on_demand_and_the_least_recently_used_is_unloaded(served, tmp_path):
    with served.client() as client:
        for seed, name in enumerate(NAMES):
            _register_full(client, served.admin(), tmp_path, name, seed)
        try:
            for name in NAMES:
                reply = _chat(client, name)
                assert reply.status_code == 200, reply.text
                assert reply.json()["mose"]["expert"] == name
                assert reply.json()["usage"]["completion_tokens"] > 0
            # Three asked for, two kept: the first one was unloaded.
            assert _loaded(client) == ["full-beta", "full-gamma"]
            health = client.get("/healthz").json()
            assert not set(NAMES) & set(health["expert_pool"]["experts"])  # the shared pool holds none
            again = _chat(client, "full-alpha")
            assert again.status_code == 200
            assert _loaded(client) == ["full-alpha", "full-gamma"]
        finally:
            for name in NAMES:
                client.post(f"/v1/experts/{name}/retire", headers=served.admin())


def test_a_full_expert_streams_like_any_other(served, tmp_path):
    with served.client() as client:
        _register_full(client, served.admin(), tmp_path, "full-stream", 7)
        try:
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "full-stream",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                    "temperature": 0,
                    "stream": True,
                },
            ) as response:
                assert response.status_code == 200
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks and all(c["model"] == "full-stream" for c in chunks)
        finally:
            client.post("/v1/experts/full-stream/retire", headers=served.admin())
