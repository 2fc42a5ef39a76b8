"""The Ray Serve application on a GPU machine: fractional GPUs (skipped without CUDA).

`mose serve` with its default config asks Ray for half a GPU for the expert pool and a quarter for
the full-weight experts, so both share the one GPU. The pool takes SmolLM2 from the cache
(``ensure_base_model``; random weights on the GPU machine, see ``benchmarks/gpu.py
--random-base``) and serves a real LoRA expert from there. The home has no router artifact (the
GPU machine cannot install MiniLM): queries go to the fallback router, which is not under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests._fixtures.serve import (
    Served,
    free_port,
    home_with_lora_experts,
    start_server,
    stop_server,
    wait_until_healthy,
)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    from experts.base_models import ensure_base_model

    ensure_base_model()
    empty = tmp_path_factory.mktemp("gpu-home-empty")
    home = home_with_lora_experts(empty, tmp_path_factory, "gpu-serve", [("med-expert", "medicine")])
    port, log = free_port(), tmp_path_factory.mktemp("gpu-serve-log") / "serve.log"
    ray_dir = Path(tempfile.mkdtemp(prefix="mose-ray-"))
    proc = start_server(home, port, log, extra_env={"RAY_TMPDIR": str(ray_dir)})
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc, log)
        yield Served(url=f"http://127.0.0.1:{port}", home=home, token="", log=log, ray_dir=ray_dir)
    finally:
        code = stop_server(proc)
        shutil.rmtree(ray_dir, ignore_errors=True)
        assert code == 0, f"mose serve did not shut down cleanly ({code}):\n{log.read_text()[-3000:]}"


def _gpus_total_and_free(ray_dir: Path) -> tuple[float, float]:
    """Ray's own accounting, read by a driver attached to the server's cluster."""
    code = (
        "import ray; ray.init(address='auto', log_to_driver=False); "
        "print(ray.cluster_resources().get('GPU', 0), ray.available_resources().get('GPU', 0))"
    )
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    total, free = out.stdout.split()[-2:]
    return float(total), float(free)


def test_the_pool_and_full_experts_share_one_gpu_in_the_configured_fractions(gpu_server):
    from serve.config import ServeConfig

    config = ServeConfig()
    total, free = _gpus_total_and_free(gpu_server.ray_dir)
    assert total == 1.0
    assert free == pytest.approx(1.0 - config.expert_pool.num_gpus - config.full_experts.num_gpus)  # 0.25


def test_the_pool_replica_holds_a_fraction_of_the_gpu_and_serves_an_expert_from_it(gpu_server):
    with gpu_server.client() as client:
        health = client.get("/healthz").json()
        reply = client.post(
            "/v1/chat/completions",
            json={
                "model": "med-expert",
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What causes high blood pressure?"}],
            },
        )
    pool = health["expert_pool"]
    assert pool["device"] == "cuda", health
    assert pool["gpu_ids"] == ["0"], health  # Ray gave the replica (part of) GPU 0
    assert "med-expert" in pool["experts"]
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "med-expert" and body["usage"]["completion_tokens"] > 0
