"""Faults on a real server: overload, a killed replica, a killed server, damaged files on disk.

Two server starts on one private data directory (``fault_home``), never the session's ``served``:

1. ``first_server`` (admission limit 6, registry copies slowed by the test hook): a burst beyond
   the admission limit, then the ExpertPool replica killed under load; then the whole server is
   killed with SIGKILL in the middle of an HTTP expert registration (``crashed``).
2. ``restarted`` on the same directory, after the router graph and one adapter were damaged on
   disk: it must start, say what is damaged, quarantine the adapter and serve the rest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests._fixtures.faults import ServerRun, launch, upload_body, wait_for
from tests._fixtures.registry import build_lora_expert, run_mose, sha256_of
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

ADMISSION_LIMIT = 6
POOL = "ExpertPool"


def chat(
    client: httpx.Client, model: str, content: str = "What causes high blood pressure?", max_tokens: int = 8
) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        },
    )


def refusal_is_clear(response: httpx.Response) -> bool:
    """A 429/503 that tells the client when to come back, with an OpenAI-shaped message."""
    return (
        response.status_code in (429, 503)
        and response.headers.get("retry-after") is not None
        and bool(response.json()["error"]["message"])
    )


@pytest.fixture(scope="module")
def loadgen():
    spec = importlib.util.spec_from_file_location("mose_bench_load_faults", REPO_ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def first_server(fault_home, tmp_path_factory):
    env = {
        "MOSE_SERVE__LIMITS__MAX_QUEUED_REQUESTS": str(ADMISSION_LIMIT),
        "MOSE_TEST_COPY_CHUNK_DELAY_S": "0.5",
    }  # registry hook: 0.5 s pause per MiB copied
    run = launch(fault_home, tmp_path_factory.mktemp("fault-log") / "first.log", env)
    yield run
    run.kill_everything()


# ---------------------------------------------------------------- overload and a killed replica


def test_a_burst_beyond_the_admission_limit_is_answered_or_refused_with_retry_after(first_server):
    def one(_: int) -> httpx.Response:
        with first_server.client() as client:
            return chat(client, "math-expert", "Solve for x: 3x + 5 = 20.", max_tokens=16)

    with ThreadPoolExecutor(max_workers=4 * ADMISSION_LIMIT) as pool:
        responses = list(pool.map(one, range(4 * ADMISSION_LIMIT)))
    answered = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(answered) + len(refused) == len(responses), [(r.status_code, r.text[:200]) for r in responses]
    assert len(answered) >= ADMISSION_LIMIT and refused, "the limit must both admit and refuse"
    assert all(refusal_is_clear(r) and "capacity" in r.json()["error"]["message"] for r in refused)


def test_killed_pool_replica_is_replaced_and_requests_in_flight_get_an_answer_or_a_clear_503(first_server, loadgen):
    old = first_server.replica_pids(POOL)
    assert len(old) == 1, f"expected one {POOL} replica, found {old}"
    with ThreadPoolExecutor(max_workers=4) as pool:
        # 3 load clients + 3 single requests stay within the admission limit: none is refused for capacity.
        load = pool.submit(
            loadgen.run_load,
            first_server.url,
            clients=3,
            seconds=45,
            experts=["med-expert", "math-expert"],
            timeout_s=240.0,
        )
        in_flight = [pool.submit(_chat_once, first_server, model) for model in ("auto", "med-expert", "math-expert")]
        wait_for(lambda: _busy(first_server), 60, "requests in flight in the pool")
        os.kill(old[0], signal.SIGKILL)
        outcomes = [f.result() for f in in_flight]
        report = load.result()
    for response in outcomes:
        assert response.status_code == 200 or refusal_is_clear(response), (response.status_code, response.text)
    assert report["errors"] == 0, report["error_samples"]
    assert set(report["statuses"]) <= {"200", "503"}, report["statuses"]

    new = wait_for(lambda: [p for p in first_server.replica_pids(POOL) if p not in old], 240, "a new pool replica")
    assert len(new) == 1
    with first_server.client() as client:
        for model in ("auto", "med-expert", "math-expert"):
            assert chat(client, model).status_code == 200
        assert client.post("/v1/route", json={"query": "What is asthma?"}).status_code == 200
        assert client.post("/v1/crosscheck", json={"question": "2+2?", "answer": "4"}).status_code == 200
        assert client.get("/healthz").json()["expert_pool"]["experts"] == ["base", "math-expert", "med-expert"]


def _chat_once(server: ServerRun, model: str) -> httpx.Response:
    with server.client(timeout=240) as client:
        return chat(client, model, max_tokens=32)


def _busy(server: ServerRun) -> bool:
    """The pool has started decoding (a batch was observed) or requests are waiting on it."""
    with server.client(timeout=30) as client:
        text = client.get("/metrics").text
    return any(
        line.startswith("mose_expert_batch_size_count") and float(line.split()[1]) > 0 for line in text.splitlines()
    )


# ---------------------------------------------------------------- SIGKILL during a registration


@dataclass
class Crash:
    body: dict
    weights_sha: str
    before: list[tuple[str, str]]
    partial_bytes: int
    full_bytes: int


@pytest.fixture(scope="module")
def crashed(first_server, tmp_path_factory) -> Crash:
    """The whole server SIGKILLed while an uploaded expert's weights are being copied into the store."""
    from registry import Registry
    from registry.home import MoseHome

    # 30 layers x rank 16: ~3.7 MB, 4 chunks of 1 MiB, each followed by the hook's 0.5 s pause.
    big = build_lora_expert(tmp_path_factory.mktemp("big") / "big-law", name="big-law", layers=30, rank=16, seed=7)
    weights_sha = big.manifest["files"]["adapter_model.safetensors"]
    home = MoseHome.from_env(first_server.home)
    with Registry.open(home) as reg:
        before = [(r.ref, r.status) for r in reg.list()]
    body = upload_body(big.manifest_path)
    upload = threading.Thread(target=_post_ignoring_the_crash, args=(first_server, body), daemon=True)
    upload.start()
    parts = wait_for(
        lambda: [p for p in (home.artifacts_dir / "tmp").glob(f"{weights_sha[:12]}.*.part") if p.stat().st_size > 0],
        120,
        "the upload's weights to be part-copied",
        every_s=0.02,
    )
    first_server.kill_everything()
    upload.join(timeout=30)
    return Crash(
        body=body,
        weights_sha=weights_sha,
        before=before,
        partial_bytes=parts[0].stat().st_size,
        full_bytes=(big.root / "adapter_model.safetensors").stat().st_size,
    )


def _post_ignoring_the_crash(server: ServerRun, body: dict) -> None:
    try:
        with server.client(timeout=300) as client:
            client.post("/v1/experts", json=body, headers=server.admin())
    except httpx.HTTPError:
        pass  # the server died under this request: that is the point


def test_sigkill_mid_registration_leaves_the_registry_consistent(crashed, fault_home):
    from registry import Registry
    from registry.home import MoseHome

    assert 0 < crashed.partial_bytes < crashed.full_bytes, "the kill must land mid-copy"
    audit = run_mose("audit", "verify", home=fault_home)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    with Registry.open(MoseHome.from_env(fault_home)) as reg:
        assert [(r.ref, r.status) for r in reg.list()] == crashed.before  # no half-registered expert
        visible = list(reg.artifacts.blobs())
        assert crashed.weights_sha not in visible  # the partial weights never became a blob
        assert all(sha256_of(reg.artifacts.path_for(sha)) == sha for sha in visible)


# ---------------------------------------------------------------- restart on damaged files


@dataclass
class Damage:
    adapter: Path
    adapter_bytes: bytes
    """The adapter blob as registered, to restore it."""


@pytest.fixture(scope="module")
def damage(crashed, fault_home) -> Damage:
    """The router graph truncated and med-expert's weights garbled, while no server runs."""
    _truncate(_router_graph(fault_home))
    adapter = _blob(fault_home, "med-expert", "adapter_model.safetensors")
    return Damage(adapter=adapter, adapter_bytes=_garble(adapter))


@pytest.fixture(scope="module")
def restarted(damage, fault_home, tmp_path_factory) -> ServerRun:
    """The same data directory, restarted on the damaged files."""
    run = launch(fault_home, tmp_path_factory.mktemp("fault-log") / "restarted.log")
    yield run
    assert run.stop() == 0, run.log.read_text()[-3000:]


def _router_graph(home: Path) -> Path:
    """The graph the current router serves (model.int8.onnx when quantized, else model.onnx)."""
    version = home / "router" / (home / "router" / "current").read_text().strip()
    return version / json.loads((version / "metadata.json").read_text())["onnx_file"]


def _blob(home: Path, name: str, relpath: str) -> Path:
    from registry import Registry
    from registry.home import MoseHome

    with Registry.open(MoseHome.from_env(home)) as reg:
        return reg.blob_paths(reg.get(name))[relpath]


def _truncate(path: Path) -> None:
    path.chmod(0o644)
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _garble(path: Path) -> bytes:
    """Flip bytes in the middle, size unchanged (silent disk corruption or tampering); returns the original."""
    path.chmod(0o644)
    original = path.read_bytes()
    data = bytearray(original)
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    return original


def test_damaged_router_is_reported_and_queries_go_to_the_base_model(restarted):
    with restarted.client() as client:
        router = client.get("/healthz").json()["router"]
        reply = chat(client, "auto", "What are the symptoms of type 2 diabetes?")
        route = client.post("/v1/route", json={"query": "Solve for x: 3x + 5 = 20."})
    assert router["fallback_only"] is True and _router_graph(restarted.home).name in router["error"]
    assert "router unavailable, every query goes to the base model" in restarted.log.read_text()
    assert reply.status_code == 200 and reply.json()["mose"]["expert"] == "base"
    assert reply.json()["choices"][0]["message"]["content"]
    assert route.status_code == 200 and route.json()["expert"] == "base" and route.json()["abstained"] is True


def test_tampered_adapter_is_quarantined_and_reported_and_the_rest_serves(restarted):
    from registry import Registry
    from registry.home import MoseHome

    with Registry.open(MoseHome.from_env(restarted.home)) as reg:
        assert reg.get("med-expert").status == "quarantined"
        assert reg.get("math-expert").status == "active"
    with restarted.client() as client:
        pool = client.get("/healthz").json()["expert_pool"]
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        math = chat(client, "math-expert", "Solve for x: 3x + 5 = 20.")
        med = chat(client, "med-expert")
    assert "med-expert" in pool["refused"] and "sha256" in pool["refused"]["med-expert"]
    assert "med-expert" not in pool["experts"] and "math-expert" in pool["experts"]
    assert "expert med-expert refused (quarantined in the registry)" in restarted.log.read_text()
    assert "med-expert" not in models
    assert math.status_code == 200 and math.json()["mose"]["expert"] == "math-expert"
    assert med.status_code == 404 and "unknown model 'med-expert'" in med.json()["error"]["message"]


def test_the_expert_whose_registration_was_killed_registers_again(restarted, crashed):
    from registry import Registry
    from registry.home import MoseHome

    with restarted.client() as client:
        response = client.post("/v1/experts", json=crashed.body, headers=restarted.admin())
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "big-law" and response.json()["status"] == "pending"
    with Registry.open(MoseHome.from_env(restarted.home)) as reg:
        assert reg.verify_files("big-law").ok
        assert reg.audit_verify().ok
    assert run_mose("audit", "verify", home=restarted.home).returncode == 0


def test_a_restored_adapter_serves_again_once_reactivated_without_a_restart(restarted, damage):
    damage.adapter.write_bytes(damage.adapter_bytes)  # the operator restored the file from a backup
    with restarted.client() as client:
        activated = client.post("/v1/experts/med-expert/activate", headers=restarted.admin())
        assert activated.status_code == 200 and activated.json()["status"] == "active", activated.text
        reply = wait_for(lambda: _ok(chat(client, "med-expert")), 60, "med-expert to answer again")
        assert reply.json()["mose"]["expert"] == "med-expert"
        pool = client.get("/healthz").json()["expert_pool"]
    assert "med-expert" in pool["experts"] and "med-expert" not in pool["refused"]


def _ok(response: httpx.Response) -> httpx.Response | None:
    return response if response.status_code == 200 else None
