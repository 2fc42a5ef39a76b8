"""A real mose server for the HTTP tests: `mose serve` in its own process, on a free port.

The data directory holds the session's small trained router (no ``law`` domain) and two LoRA
experts (medicine, math) with random but real adapter weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ADMIN_TOKEN = "test-admin-token-0123456789"
STARTUP_TIMEOUT_S = 300


@dataclass
class Served:
    url: str
    home: Path
    token: str
    log: Path
    ray_dir: Path | None = None
    """The server's private Ray temp folder (RAY_TMPDIR): its session logs are under it."""

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Healthy, and past ``serving on``: only then has ``mose serve`` its own SIGTERM handler (before
    it, Ray's aborts the process, and a quick test's teardown would see exit -6)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mose serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200 and "serving on" in log.read_text():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    pytest.fail(f"mose serve did not become healthy in {timeout}s:\n{log.read_text()[-4000:]}")


def start_server(
    home: Path,
    port: int,
    log: Path,
    extra_env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    token: str | None = ADMIN_TOKEN,
) -> subprocess.Popen:
    """``mose serve`` on ``port``; ``token=None`` starts it without MOSE_ADMIN_TOKEN."""
    env = {**os.environ, "MOSE_HOME": str(home)}
    env.pop("MOSE_ADMIN_TOKEN", None)
    if token is not None:
        env["MOSE_ADMIN_TOKEN"] = token
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", "--port", str(port), "--home", str(home), *extra_args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def home_with_lora_experts(router_home: Path, tmp_path_factory, label: str, experts: list[tuple[str, str]]) -> Path:
    """A copy of ``router_home`` with ``experts`` ((name, domain) pairs) registered and active:
    real LoRA adapters with random weights on SmolLM2."""
    from registry import Registry
    from registry.home import MoseHome
    from tests._fixtures.experts import write_lora_expert

    root = tmp_path_factory.mktemp(label) / "home"
    shutil.copytree(router_home, root)
    folder = tmp_path_factory.mktemp(f"{label}-experts")
    with Registry.open(MoseHome.from_env(root)) as reg:
        for seed, (name, domain) in enumerate(experts):
            reg.add(write_lora_expert(folder, name, seed=seed + 10, domain=domain))
            reg.activate(name)
    return root


@pytest.fixture(scope="session")
def serve_home(trained_router_home, base_models, tmp_path_factory) -> Path:
    return home_with_lora_experts(
        trained_router_home.root, tmp_path_factory, "serve", [("med-expert", "medicine"), ("math-expert", "math")]
    )


@pytest.fixture(scope="session")
def served(serve_home, tmp_path_factory):
    """The running server; stopped with SIGTERM at the end of the session."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    # A short private Ray folder (socket paths are limited to 107 bytes), so the tests can read
    # this server's Ray logs and not another process's.
    ray_dir = Path(tempfile.mkdtemp(prefix="mose-ray-"))
    proc = start_server(serve_home, port, log, extra_env={"RAY_TMPDIR": str(ray_dir)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, log)
        yield Served(url=url, home=serve_home, token=ADMIN_TOKEN, log=log, ray_dir=ray_dir)
    finally:
        code = stop_server(proc)
        shutil.rmtree(ray_dir, ignore_errors=True)
        assert code == 0, f"mose serve did not shut down cleanly ({code}):\n{log.read_text()[-3000:]}"
