"""A two-node Ray cluster on this machine: `mose serve --address` places the expert pool on the
worker that advertises the ``expert_node`` resource, and a query is answered through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests._fixtures.serve import free_port, start_server, stop_server, wait_until_healthy

RAY = str(Path(sys.executable).with_name("ray"))


def _ray_node(args: list[str], log: Path, temp_dir: Path) -> subprocess.Popen:
    """A Ray node in the foreground (--block), in its own process group so the test can stop
    exactly it (``ray stop`` would stop every Ray on the machine)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _expert_nodes(address: str) -> list[str]:
    code = ("import ray; ray.init(address=%r, log_to_driver=False); "
            "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive'] and 'expert_node' in n['Resources']))")
    out = subprocess.run([sys.executable, "-c", code % address], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return out.stdout.split()


def test_pool_runs_on_the_worker_of_a_two_node_cluster(serve_home, tmp_path):
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    temp_dir = Path("/tmp") / f"mose-ray-{gcs_port}"  # short: Ray's socket paths have a length limit
    head = _ray_node(["--head", f"--port={gcs_port}", "--num-cpus=2", "--include-dashboard=false",
                      "--object-store-memory=100000000", f"--temp-dir={temp_dir}"], tmp_path / "head.log", temp_dir)
    worker = server = None
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(2)
        worker = _ray_node([f"--address={address}", "--num-cpus=2", '--resources={"expert_node": 1}',
                            "--object-store-memory=100000000"], tmp_path / "worker.log", temp_dir)
        while not _expert_nodes(address):
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        config = tmp_path / "serve.yaml"
        config.write_text("expert_pool:\n  num_cpus: 1\n  resources: {expert_node: 1}\n")
        port = free_port()
        log = tmp_path / "serve.log"
        server = start_server(serve_home, port, log, extra_args=("--address", address, "--config", str(config)))
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server, log)
        health = httpx.get(f"{url}/healthz", timeout=60).json()
        assert health["expert_pool"]["node_id"] in _expert_nodes(address)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "auto", "max_tokens": 6, "messages": [{"role": "user", "content": "What causes asthma?"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
    finally:
        if server is not None:
            stop_server(server)
        for proc in (worker, head):
            if proc is not None:
                _stop(proc)
