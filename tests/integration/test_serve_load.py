"""A short run of the load benchmark against the real server: it answers or says "later", nothing else.

The full run (32 clients x 120 s, with RSS growth) is ``benchmarks/load.py``; this is the same
generator for ~20 s with 16 clients, asserting only behaviour (timing lives in the benchmark).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def loadgen():
    """``benchmarks/load.py`` as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("mose_bench_load", REPO_ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_mixed_load_is_answered_or_refused_with_retry_after_and_nothing_else(served, loadgen):
    report = loadgen.run_load(
        served.url, clients=16, seconds=18, experts=["med-expert", "math-expert"], timeout_s=120.0
    )
    assert report["errors"] == 0, report["error_samples"]
    assert report["answered"] > 0
    assert set(report["by_kind"]) == {"chat-auto", "chat-named", "route", "crosscheck"}
    # Every non-2xx the clients saw was a refusal that said when to come back (counted as rejected).
    refused = sum(n for code, n in report["statuses"].items() if not code.startswith("2"))
    assert refused == report["rejected"]
    assert set(report["statuses"]) <= {"200", "429", "503"}
    with served.client() as client:
        assert client.get("/healthz").status_code == 200


def test_the_generator_refuses_anything_but_loopback(loadgen):
    with pytest.raises(SystemExit, match="only loopback"):
        loadgen.run_load("http://example.com:8000", clients=1, seconds=1, experts=["base"])
