"""The first start's calibrator, fitted beside a running server (`mose up` without `--prepare-only`).

A real `mose serve` on a data directory without a calibrator, and `mose up`'s own fitting step
(`serve.commands.up._fit_calibrator_beside_server`) run in this process on a small sample of
crosscheck_dev: while it fits, `/v1/crosscheck` answers 503 and `/healthz` reports
`calibrator_fitting`; once the calibrator is saved the server picks it up without a restart and
gives calibrated verdicts."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests._fixtures.serve import free_port, home_with_lora_experts, start_server, stop_server, wait_until_healthy

pytestmark = pytest.mark.slow

ROWS_PER_SOURCE = 8
"""Labelled train-bucket rows per source in the small data directory (all of them are scored)."""

QUESTION = {"question": "What is the boiling point of water at sea level?", "answer": "100 degrees Celsius."}


@pytest.fixture(scope="module")
def small_data_dir(shared_data, tmp_path_factory) -> Path:
    """A data directory whose crosscheck_dev.jsonl holds a few train-bucket rows of each source."""
    from jury.crosscheck import load_rows

    rows, taken = [], {}
    for row in load_rows(shared_data / "crosscheck_dev.jsonl"):
        if not row.is_test() and taken.get(row.source, 0) < ROWS_PER_SOURCE:
            taken[row.source] = taken.get(row.source, 0) + 1
            rows.append(row)
    folder = tmp_path_factory.mktemp("small-data")
    (folder / "crosscheck_dev.jsonl").write_text("".join(json.dumps(r.model_dump()) + "\n" for r in rows))
    return folder


def test_the_first_calibrator_is_fitted_beside_the_server_and_picked_up_without_a_restart(
    trained_router_home, base_models, small_data_dir, tmp_path_factory
):
    from registry.home import MoseHome
    from serve.commands.up import _fit_calibrator_beside_server

    root = home_with_lora_experts(
        trained_router_home.root, tmp_path_factory, "first-calibrator", [("med-expert", "medicine")]
    )
    home = MoseHome.from_env(root)
    assert not (home.crosscheck_dir / "current").exists()
    port, log = free_port(), tmp_path_factory.mktemp("first-calibrator-log") / "serve.log"
    ray_dir = tempfile.mkdtemp(prefix="mose-ray-")
    proc = start_server(root, port, log, extra_env={"RAY_TMPDIR": ray_dir})
    url = f"http://127.0.0.1:{port}"
    failures: list[BaseException] = []

    def fit() -> None:
        try:
            _fit_calibrator_beside_server(home, small_data_dir)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            failures.append(exc)

    try:
        wait_until_healthy(url, proc, log)
        fitting = threading.Thread(target=fit)
        fitting.start()
        with httpx.Client(base_url=url, timeout=120) as client:
            refused, reported = None, False
            while fitting.is_alive() and (refused is None or not reported):
                response = client.post("/v1/crosscheck", json=QUESTION)
                if response.status_code == 503:
                    refused = response
                reported = reported or client.get("/healthz").json()["crosscheck"]["calibrator_fitting"] is True
                time.sleep(0.5)
            fitting.join(timeout=900)
            assert not fitting.is_alive() and not failures, failures
            assert refused is not None and "being fitted" in refused.json()["error"]["message"], refused
            assert reported  # /healthz said a calibrator was coming
            version = (home.crosscheck_dir / "current").read_text().strip()
            deadline = time.monotonic() + 60
            while True:  # the replica looks for a new calibrator every few seconds
                response = client.post("/v1/crosscheck", json=QUESTION)
                if response.status_code == 200 and response.json()["calibrator"] == version:
                    break
                assert time.monotonic() < deadline, response.text
                time.sleep(1.0)
            verdict = response.json()
            assert 0.0 <= verdict["p_correct"] <= 1.0 and "base_probe" in verdict["evidence"]
            health = client.get("/healthz").json()["crosscheck"]
            assert health["calibrator_fitting"] is False and health["calibrator"] == version
    finally:
        code = stop_server(proc)
        assert code == 0, log.read_text()[-3000:]
