"""Shared pytest fixtures for the router tests.

One small router is trained once per session (head only, on a fixed, real subset of
``routing_dev.jsonl`` with the ``law`` domain left out so the incremental-update test has a
domain the router never saw) and reused read-only; tests that change an artifact work on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROUTER_SUBSET_PER_DOMAIN = 70
UNSEEN_DOMAIN = "law"


def small_router_config(**overrides):
    """Head-only training on the small subset: a few seconds on 2 cores."""
    from router_model.config import RouterConfig

    return RouterConfig(fine_tune="no", **overrides)


@pytest.fixture(scope="session")
def router_subset(shared_data, tmp_path_factory) -> Path:
    """A fixed real subset of routing_dev.jsonl: up to 70 rows per domain (hash-chosen), all
    fields and ids kept so its held-out split agrees with the full file's."""
    from router_model.data import cap_per_label, load_jsonl, write_jsonl

    rows = load_jsonl(shared_data / "routing_dev.jsonl")
    subset = cap_per_label(rows, ROUTER_SUBSET_PER_DOMAIN, salt="router-tests")
    path = tmp_path_factory.mktemp("router-data") / "routing_subset.jsonl"
    write_jsonl(subset, path)
    return path


@pytest.fixture(scope="session")
def trained_router_home(router_subset, tmp_path_factory):
    """A MoseHome holding one trained router (v0001) without the ``law`` domain. Read-only."""
    from registry.home import MoseHome
    from router_model.service import train_and_publish

    home = MoseHome.from_env(tmp_path_factory.mktemp("router-home") / "home")
    train_and_publish(home, [router_subset], None, small_router_config(), exclude_domains=[UNSEEN_DOMAIN])
    return home


@pytest.fixture
def router_home_copy(trained_router_home, tmp_path):
    """A private copy of the trained home, for tests that change it."""
    from registry.home import MoseHome

    target = tmp_path / "home"
    shutil.copytree(trained_router_home.root, target)
    return MoseHome.from_env(target)
