"""Test-wide settings. Area fixtures live in tests/_fixtures/<area>.py (one file per area).

Tests never reach the network: the Hugging Face libraries are put in offline mode, and the
converted base weights are shared between test runs through MOSE_CACHE (./.mose-cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
)
os.environ.setdefault("MOSE_CACHE", str(REPO_ROOT / ".mose-cache"))
# The embedded SQLite registry unless a test asks for PostgreSQL (tests/_fixtures/postgres.py).
os.environ.pop("MOSE_REGISTRY_URL", None)
# One torch thread per process: tests run beside Ray replicas and other tests' servers on a
# 2-core machine, where two threads per process wait on each other (measured 3-10x slower).
os.environ.setdefault("MOSE_CPU_THREADS", "1")
# Expected scores are float32's, on any CPU: the bf16 path has its own tests, which ask for it.
os.environ["MOSE_CPU_DTYPE"] = "float32"

pytest_plugins = [
    "tests._fixtures.registry",
    "tests._fixtures.experts",
    "tests._fixtures.router",
    "tests._fixtures.serve",
    "tests._fixtures.faults",
    "tests._fixtures.postgres",
]


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` on machines without a CUDA device."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no CUDA either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mose_home(tmp_path, monkeypatch):
    """A fresh, empty data directory (MOSE_HOME) for one test; base-weight cache shared."""
    from registry.home import MoseHome

    home = tmp_path / "mose-home"
    monkeypatch.setenv("MOSE_HOME", str(home))
    return MoseHome.from_env(home)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real development datasets in ../shared/data (see its README for licences)."""
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}: the checkout must sit beside shared/")
    return SHARED_DATA
