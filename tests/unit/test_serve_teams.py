"""Team tokens over HTTP, on the real FastAPI app without Ray: the admin endpoints are served by
``serve.api.build_api`` against a backend that does what the Ray ingress does with the registry
(``serve.deployments.ingress``' upload and status helpers). Team A gets 403 on every write to
team B's experts and nothing changes; rotated and revoked tokens are refused; no token reaches a response,
a log line or the audit log."""

from __future__ import annotations

import base64
import logging

import pytest
from fastapi.testclient import TestClient

from registry import Registry
from registry.teams import SECRET_CHARS
from serve.backend import Backend
from serve.config import AuthConfig, ServeConfig
from tests._fixtures.registry import build_lora_expert, registry_state

OPERATOR_TOKEN = "operator-token-" + "7" * 24
TEAM_A, TEAM_B = "team-a", "team-b"


class RegistryBackend(Backend):
    """The admin half of the Ray ingress, on a registry in this process."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def authenticate_team(self, token):
        return self.registry.authenticate_team(token).name

    async def register(self, manifest, files, actor):
        from serve.deployments.ingress import _record_json, _register_upload

        return _record_json(_register_upload(self.registry, manifest, files, actor))

    async def set_status(self, name, action, actor, reason=None):
        from serve.deployments.ingress import _change_status, _record_json

        return _record_json(_change_status(self.registry, name, action, actor, reason))

    async def experts(self):
        return []

    async def route(self, query):
        raise NotImplementedError

    async def generate(self, request):
        raise NotImplementedError

    def stream(self, request):
        raise NotImplementedError

    async def crosscheck(self, question, answer, k, own_answers):
        raise NotImplementedError

    async def feedback(self, verdict_id, correct):
        raise NotImplementedError

    async def upstream_chat(self, name, messages, max_tokens, temperature):
        raise NotImplementedError

    async def health(self):
        return {}


def upload(expert) -> dict:
    files = {rel: base64.b64encode((expert.root / rel).read_bytes()).decode() for rel in expert.manifest["files"]}
    return {"manifest": expert.manifest, "files": files}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    return response.status_code, body["error"]["message"]


@pytest.fixture
def site(registry, tmp_path):
    """The app, with teams A and B; B owns the active ``b-expert@1.0.0``."""
    from serve.api import build_api

    _, token_a = registry.create_team(TEAM_A)
    _, token_b = registry.create_team(TEAM_B)
    config = ServeConfig(auth=AuthConfig(admin_token=OPERATOR_TOKEN))
    # As under a server: an error handled into a response is not raised into the test as well.
    client = TestClient(build_api(config, RegistryBackend(registry)), raise_server_exceptions=False)
    b_expert = build_lora_expert(tmp_path / "b1", name="b-expert", owner=TEAM_B, domains=("finance",), seed=1)
    created = client.post("/v1/experts", json=upload(b_expert), headers=bearer(token_b))
    assert created.status_code == 200, created.text
    assert client.post("/v1/experts/b-expert/activate", headers=bearer(OPERATOR_TOKEN)).status_code == 200
    return {"client": client, "registry": registry, "a": token_a, "b": token_b, "tmp": tmp_path}


def test_team_a_gets_403_on_every_write_to_team_b_experts_and_nothing_changes(site):
    client, reg, tmp = site["client"], site["registry"], site["tmp"]
    as_a = bearer(site["a"])
    b_v2 = build_lora_expert(tmp / "b2", name="b-expert", version="2.0.0", owner=TEAM_B, domains=("finance",), seed=2)
    squat = build_lora_expert(tmp / "b3", name="b-expert", version="3.0.0", owner=TEAM_A, domains=("finance",), seed=3)
    before = registry_state(reg)
    only_operator = (
        "is for the registry operator; team 'team-a' may register, update and retire the experts it "
        "owns (ask the operator about 'b-expert')"
    )
    cases = {
        "new version of B's expert": (
            client.post("/v1/experts", json=upload(b_v2), headers=as_a),
            "team 'team-a' may only register experts it owns, and this manifest names owner 'team-b'; set "
            "`owner: team-a` in the manifest",
        ),
        "B's name with owner A": (
            client.post("/v1/experts", json=upload(squat), headers=as_a),
            "expert 'b-expert' is owned by team 'team-b' (the owner of its registered versions); team 'team-a' "
            "may not publish versions of it: choose another name",
        ),
        "retire": (
            client.post("/v1/experts/b-expert/retire", headers=as_a),
            "b-expert@1.0.0 is owned by 'team-b'; team 'team-a' may only change the experts it owns",
        ),
        "activate": (
            client.post("/v1/experts/b-expert/activate", headers=as_a),
            f"activating an expert {only_operator}",
        ),
        "quarantine": (
            client.post("/v1/experts/b-expert/quarantine", json={"reason": "x"}, headers=as_a),
            f"quarantining an expert {only_operator}",
        ),
    }
    for label, (response, message) in cases.items():
        assert error_of(response) == (403, message), label
        assert response.json()["error"]["type"] == "permission_error"
    assert registry_state(reg) == before
    assert [(r.ref, r.status) for r in reg.list()] == [("b-expert@1.0.0", "active")]


def test_a_team_writes_its_own_experts_and_the_operator_everything(site):
    client, reg, tmp = site["client"], site["registry"], site["tmp"]
    as_a, as_op = bearer(site["a"]), bearer(OPERATOR_TOKEN)
    mine = build_lora_expert(tmp / "a1", name="a-expert", owner=TEAM_A, domains=("finance",), seed=4)
    refused = client.post("/v1/experts", json=upload(mine) | {"activate": True}, headers=as_a)
    assert error_of(refused) == (
        403,
        "activating an expert is for the registry operator; register it without "
        "'activate' (team 'team-a' may register, update and retire the experts it owns)",
    )
    assert [r.ref for r in reg.list(name="a-expert")] == []
    registered = client.post("/v1/experts", json=upload(mine), headers=as_a)
    assert (registered.status_code, registered.json()["status"]) == (200, "pending"), registered.text
    assert error_of(client.post("/v1/experts/a-expert/activate", headers=as_a))[0] == 403
    assert client.post("/v1/experts/a-expert/activate", headers=as_op).json()["status"] == "active"
    assert client.post("/v1/experts/a-expert/retire", headers=as_a).json()["status"] == "retired"
    quarantined = client.post("/v1/experts/b-expert/quarantine", json={"reason": "under review"}, headers=as_op)
    assert quarantined.json()["status"] == "quarantined", quarantined.text
    assert client.post("/v1/experts/b-expert/quarantine", json={}, headers=as_op).status_code == 400
    actors = [
        (e.actor, e.action, e.subject)
        for e in reg.audit_entries()
        if e.action in ("register", "activate", "retire", "quarantine")
    ]
    assert actors == [
        ("team:team-b", "register", "b-expert@1.0.0"),
        ("operator", "activate", "b-expert@1.0.0"),
        ("team:team-a", "register", "a-expert@1.0.0"),
        ("operator", "activate", "a-expert@1.0.0"),
        ("team:team-a", "retire", "a-expert@1.0.0"),
        ("operator", "quarantine", "b-expert@1.0.0"),
    ]
    assert reg.audit_verify().ok


def test_rotated_and_revoked_tokens_are_refused(site):
    client, reg = site["client"], site["registry"]
    old_a = site["a"]
    _, new_a = reg.rotate_team_token(TEAM_A)
    reg.revoke_team(TEAM_B)
    revoked_at = reg.team(TEAM_B).revoked_at.isoformat()
    before = registry_state(reg)
    rotated = client.post("/v1/experts/b-expert/retire", headers=bearer(old_a))
    assert error_of(rotated) == (
        403,
        "the token is not valid for team 'team-a' (a wrong token, or one replaced by "
        "`mose team rotate`); ask the operator for the current one",
    )
    revoked = client.post("/v1/experts/b-expert/retire", headers=bearer(site["b"]))
    assert error_of(revoked) == (
        403,
        f"the token of team 'team-b' was revoked at {revoked_at}; ask the operator for "
        "a new one (`mose team rotate team-b`)",
    )
    assert registry_state(reg) == before
    assert reg.get("b-expert").status == "active"
    # The new token of A works (on A's business): past authentication, the registry answers.
    missing = client.post("/v1/experts/a-expert/retire", headers=bearer(new_a))
    assert error_of(missing) == (404, "expert 'a-expert' is not registered (see `mose expert list`)")


def test_a_refused_team_token_is_refused_before_the_body_is_read(site):
    """The gate answers from the headers: a 10 MB upload with a revoked token gets its 403, not a 413 or a parse."""
    client, reg = site["client"], site["registry"]
    reg.revoke_team(TEAM_A)
    big = b"[" + b"1," * 5_000_000 + b"1]"
    response = client.post("/v1/experts", content=big, headers=bearer(site["a"]) | {"content-type": "application/json"})
    assert response.status_code == 403 and "was revoked" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "header, status, message",
    [
        (None, 401, "admin endpoints need 'Authorization: Bearer <token>'"),
        ("Basic abc", 401, "admin endpoints need 'Authorization: Bearer <token>'"),
        ("Bearer not-a-token", 403, "the admin token is not valid"),
        (
            "Bearer mose_team_team-z_" + "A" * SECRET_CHARS,
            403,
            "not a valid team token (no such team, or a mistyped token); team tokens come from `mose team create` or "
            "`mose team rotate`",
        ),
    ],
)
def test_missing_malformed_and_unknown_tokens(site, header, status, message):
    headers = {"Authorization": header} if header else {}
    response = site["client"].post("/v1/experts/b-expert/retire", headers=headers)
    assert error_of(response) == (status, message)


def test_tokens_never_appear_in_responses_logs_or_the_audit_log(site, caplog, mose_home):
    caplog.set_level(logging.DEBUG)
    client, reg, tmp = site["client"], site["registry"], site["tmp"]
    _, rotated = reg.rotate_team_token(TEAM_A)
    tokens = [site["a"], site["b"], rotated, OPERATOR_TOKEN]
    squat = build_lora_expert(tmp / "sq", name="b-expert", version="9.0.0", owner=TEAM_A, domains=("finance",), seed=9)
    bodies = []
    for token in tokens + [site["a"][:-1] + "x", "mose_team_team-a_" + "B" * SECRET_CHARS]:
        for path in ("/v1/experts/b-expert/retire", "/v1/experts/b-expert/activate", "/v1/experts/nope/retire"):
            bodies.append(client.post(path, headers=bearer(token)).text)
        bodies.append(client.post("/v1/experts", json=upload(squat), headers=bearer(token)).text)
        bodies.append(client.post("/v1/experts", json={"manifest": {"name": "x"}}, headers=bearer(token)).text)
    mine = build_lora_expert(tmp / "a1", name="a-expert", owner=TEAM_A, domains=("finance",), seed=5)
    registered = client.post("/v1/experts", json=upload(mine), headers=bearer(rotated))
    assert registered.status_code == 200, registered.text
    bodies.append(registered.text)
    reg.revoke_team(TEAM_B)
    bodies.append(client.post("/v1/experts/b-expert/retire", headers=bearer(site["b"])).text)
    audit = "\n".join(e.model_dump_json() for e in reg.audit_entries())
    stored = b"".join(p.read_bytes() for p in mose_home.root.rglob("*") if p.is_file())
    assert {"team:team-a", "team:team-b", "operator"} <= {e.actor for e in reg.audit_entries()}
    for token in tokens:
        secret = token[-SECRET_CHARS:] if token.startswith("mose_team_") else token
        assert not [b for b in bodies if secret in b], token
        assert secret not in caplog.text and secret not in audit
        assert secret.encode() not in stored
