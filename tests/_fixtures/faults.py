"""Servers that tests may break: a private data directory each, and the processes to kill.

``fault_home`` is built like the shared ``serve_home`` (the session's trained router, two LoRA
experts) but owned by one test module, so killing, crashing and corrupting never touch the
session's ``served`` server. :class:`ServerRun` is one ``mose serve`` process and its process
tree (Ray's GCS, raylet and workers are its descendants).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests._fixtures.serve import (
    ADMIN_TOKEN,
    free_port,
    home_with_lora_experts,
    start_server,
    stop_server,
    wait_until_healthy,
)

FAULT_EXPERTS = (("med-expert", "medicine"), ("math-expert", "math"))


@dataclass
class ServerRun:
    """One ``mose serve`` process on ``home``."""

    proc: subprocess.Popen
    url: str
    home: Path
    log: Path

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def replica_pids(self, deployment: str) -> list[int]:
        """PIDs of the Ray Serve replicas of ``deployment`` (Ray titles them ``ray::ServeReplica:<app>:<name>``)."""
        pids = []
        for proc in self.tree():
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "ServeReplica" in title and f":{deployment}" in title:
                pids.append(proc.pid)
        return pids

    def kill_everything(self) -> None:
        """SIGKILL the server's process group and every descendant (a power cut, as far as mose can tell)."""
        tree = self.tree()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in tree:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=30)

    def stop(self) -> int:
        """SIGTERM, as an operator would; everything left is killed."""
        tree = self.tree()
        code = stop_server(self.proc)
        for proc in psutil.wait_procs(tree, timeout=10)[1]:
            proc.kill()
        return code


def launch(home: Path, log: Path, env: dict[str, str] | None = None) -> ServerRun:
    """Start ``mose serve`` on ``home`` and wait until /healthz answers."""
    port = free_port()
    proc = start_server(home, port, log, extra_env=env)
    run = ServerRun(proc=proc, url=f"http://127.0.0.1:{port}", home=home, log=log)
    try:
        wait_until_healthy(run.url, proc, log)
    except BaseException:
        run.kill_everything()
        raise
    return run


def upload_body(manifest_path: Path) -> dict:
    """``POST /v1/experts`` body for an expert folder: the manifest and base64 of each file."""
    import yaml

    manifest = yaml.safe_load(manifest_path.read_text())
    files = {rel: base64.b64encode((manifest_path.parent / rel).read_bytes()).decode() for rel in manifest["files"]}
    return {"manifest": manifest, "files": files}


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def fault_home(trained_router_home, base_models, tmp_path_factory) -> Path:
    """A private data directory: the session's trained router and two active LoRA experts."""
    return home_with_lora_experts(trained_router_home.root, tmp_path_factory, "fault", list(FAULT_EXPERTS))
