"""A two-node Ray cluster on this machine: `mose serve --address` places the expert pool on the
worker that advertises the ``expert_node`` resource, and a query is answered through it; with a
PostgreSQL registry the worker shares no folder with anyone: an expert published after start
from a third home reaches it through the database."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from registry.artifacts import ArtifactStore
from tests._fixtures.experts import write_lora_expert
from tests._fixtures.registry import run_mose
from tests._fixtures.serve import free_port, start_server, stop_server, wait_until_healthy

RAY = str(Path(sys.executable).with_name("ray"))


def _ray_node(args: list[str], log: Path, temp_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Ray node in the foreground (--block), in its own process group so the test can stop
    exactly it (``ray stop`` would stop every Ray on the machine). Its replicas inherit ``env``."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _expert_nodes(address: str) -> list[str]:
    code = (
        "import ray; ray.init(address=%r, log_to_driver=False); "
        "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive'] and 'expert_node' in n['Resources']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code % address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    return out.stdout.split()


@contextlib.contextmanager
def _two_node_cluster(
    tmp_path: Path,
    head_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
    head_resources: str | None = None,
) -> Iterator[str]:
    """A head (with ``head_resources``, JSON) and a worker (``expert_node``) on this machine; yields
    the cluster's address."""
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    temp_dir = Path("/tmp") / f"mose-ray-{gcs_port}"  # short: Ray's socket paths have a length limit
    resources = [f"--resources={head_resources}"] if head_resources else []
    head = _ray_node(
        [
            "--head",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            *resources,
            "--object-store-memory=100000000",
            f"--temp-dir={temp_dir}",
        ],
        tmp_path / "head.log",
        temp_dir,
        head_env,
    )
    worker = None
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(2)
        worker = _ray_node(
            [
                f"--address={address}",
                "--num-cpus=2",
                '--resources={"expert_node": 1}',
                "--object-store-memory=100000000",
            ],
            tmp_path / "worker.log",
            temp_dir,
            worker_env,
        )
        while not _expert_nodes(address):
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        yield address
    finally:
        for proc in (worker, head):
            if proc is not None:
                _stop(proc)


def test_pool_runs_on_the_worker_of_a_two_node_cluster(serve_home, tmp_path):
    with _two_node_cluster(tmp_path) as address:
        config = tmp_path / "serve.yaml"
        config.write_text("expert_pool:\n  num_cpus: 1\n  resources: {expert_node: 1}\n")
        port = free_port()
        log = tmp_path / "serve.log"
        server = start_server(serve_home, port, log, extra_args=("--address", address, "--config", str(config)))
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, server, log)
            health = httpx.get(f"{url}/healthz", timeout=60).json()
            assert health["expert_pool"]["node_id"] in _expert_nodes(address)
            reply = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=120,
                json={
                    "model": "auto",
                    "max_tokens": 6,
                    "messages": [{"role": "user", "content": "What causes asthma?"}],
                },
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"]
        finally:
            stop_server(server)


# The head-side roles pinned to the head (they read its router and calibrator); the pool to the worker.
CLUSTER_CONFIG = """\
ingress: {resources: {mose_head: 1}}
router: {resources: {mose_head: 1}}
crosscheck: {resources: {mose_head: 1}}
full_experts: {resources: {mose_head: 1}}
expert_pool: {num_cpus: 1, resources: {expert_node: 1}}
"""


def test_an_expert_published_after_start_is_served_from_a_worker_that_shares_no_folder(
    trained_router_home, base_models, postgres_url, tmp_path
):
    head_home = tmp_path / "head-home"  # the router (its registry.db is not used: the registry is the database)
    shutil.copytree(trained_router_home.root, head_home)
    worker_home = tmp_path / "worker-home"  # empty: the worker's own folder, nobody else's
    worker_home.mkdir()
    registry_env = {"MOSE_REGISTRY_URL": postgres_url}
    with _two_node_cluster(
        tmp_path,
        head_env=registry_env,
        head_resources='{"mose_head": 100}',
        worker_env={**registry_env, "MOSE_NODE_HOME": str(worker_home)},
    ) as address:
        config = tmp_path / "serve.yaml"
        config.write_text(CLUSTER_CONFIG)
        port = free_port()
        log = tmp_path / "serve.log"
        server = start_server(
            head_home, port, log, extra_env=registry_env, extra_args=("--address", address, "--config", str(config))
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, server, log)
            pool = httpx.get(f"{url}/healthz", timeout=60).json()["expert_pool"]
            assert pool["node_id"] in _expert_nodes(address) and pool["experts"] == ["base"]

            # Published from a third home (another machine, as far as anyone can tell): only the database is shared.
            manifest = write_lora_expert(tmp_path / "publisher-src", "late-expert", seed=7, domain="medicine")
            publisher = tmp_path / "publisher-home"
            run_mose("expert", "add", str(manifest), home=publisher, check=True)
            run_mose("expert", "activate", "late-expert", home=publisher, check=True)
            deadline, reply = time.monotonic() + 120, None
            while time.monotonic() < deadline:
                reply = httpx.post(
                    f"{url}/v1/chat/completions",
                    timeout=120,
                    json={
                        "model": "late-expert",
                        "max_tokens": 6,
                        "messages": [{"role": "user", "content": "What causes asthma?"}],
                    },
                )
                if reply.status_code != 404:  # 404 until the ingress re-reads the active experts
                    break
                time.sleep(1)
            assert reply is not None and reply.status_code == 200, reply.text
            assert reply.json()["mose"]["expert"] == "late-expert" and reply.json()["choices"][0]["message"]["content"]

            pool = httpx.get(f"{url}/healthz", timeout=60).json()["expert_pool"]
            assert pool["node_id"] in _expert_nodes(address) and "late-expert" in pool["experts"], pool
            published = ArtifactStore(publisher / "artifacts")
            fetched = set(ArtifactStore(worker_home / "artifacts").blobs())
            assert fetched == set(published.blobs())  # the worker fetched every blob, verified, into its own home
            assert not set(ArtifactStore(head_home / "artifacts").blobs()) & fetched  # not through the head's folder
        finally:
            stop_server(server)
