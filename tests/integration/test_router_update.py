"""A domain the router never saw: register + activate an expert for it, `mose router update`,
and its held-out queries go to that expert, without retraining the encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from router_model.artifact import HELDOUT_ROWS, TRAIN_ROWS, current_dir, read_metadata
from router_model.data import load_jsonl, normalise, split_heldout
from router_model.runtime import OnnxRouter
from tests._fixtures.registry import build_lora_expert
from tests._fixtures.router import UNSEEN_DOMAIN

REPO_ROOT = Path(__file__).resolve().parents[2]


def law_example_queries(shared_data, heldout_texts: set[str], count: int = 30) -> list[str]:
    """Law queries from routing_dev's training side (never held out), a few of each source."""
    from router_model.config import RouterConfig

    config = RouterConfig()
    train, _ = split_heldout(load_jsonl(shared_data / "routing_dev.jsonl"), config.heldout_fraction, config.split_salt)
    law = [
        r for r in train if r.domain == UNSEEN_DOMAIN and normalise(r.query) not in heldout_texts and len(r.query) < 400
    ]
    by_source: dict[str, list[str]] = {}
    for row in law:
        by_source.setdefault(row.source, []).append(row.query)
    picked, sources = [], sorted(by_source)
    while len(picked) < count:
        for source in sources:
            if by_source[source] and len(picked) < count:
                picked.append(by_source[source].pop(0))
    return picked


def test_new_domain_is_learned_without_retraining(router_home_copy, shared_data, tmp_path):
    from registry import Registry

    home = router_home_copy
    before_dir = current_dir(home.router_dir)
    before = read_metadata(before_dir)
    assert UNSEEN_DOMAIN not in before.labels
    heldout = load_jsonl(before_dir / HELDOUT_ROWS)
    law_heldout = [r for r in heldout if r.domain == UNSEEN_DOMAIN]
    other_heldout = [r for r in heldout if r.domain != UNSEEN_DOMAIN]
    assert len(law_heldout) >= 10

    queries = law_example_queries(shared_data, {normalise(r.query) for r in heldout})
    expert = build_lora_expert(
        tmp_path / "law-expert", name="law-helper", domains=(UNSEEN_DOMAIN,), example_queries=queries
    )
    with Registry.open(home) as reg:
        reg.add(expert.manifest_path)
        reg.activate("law-helper")

    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", "router", "update", "--json", "--home", str(home.root)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["added_domains"] == [UNSEEN_DOMAIN] and result["example_queries"] == len(queries)
    # Its duration (result["seconds"]) is reported by benchmarks, not asserted here.

    after_dir = current_dir(home.router_dir)
    after = read_metadata(after_dir)
    assert after.version == "v0002" and after.parent == "v0001" and after.added_domains == [UNSEEN_DOMAIN]
    assert after.labels[: len(before.labels)] == before.labels
    assert "law-helper@1.0.0" in after.experts
    read_metadata(before_dir, verify=True)  # the old version is kept, intact
    assert len(load_jsonl(after_dir / TRAIN_ROWS)) == len(load_jsonl(before_dir / TRAIN_ROWS)) + len(queries)

    with Registry.open(home) as reg:
        router = OnnxRouter.load(home, registry=reg)
        law_decisions = router.route_batch([r.query for r in law_heldout])
        other_decisions = router.route_batch([r.query for r in other_heldout])
    law_rate = np.mean([d.domain == UNSEEN_DOMAIN for d in law_decisions])
    assert law_rate >= 0.5, law_rate
    assert all(d.expert == "law-helper" for d in law_decisions if d.domain == UNSEEN_DOMAIN and not d.abstained)
    # The other domains keep working: few of their held-out queries are pulled into law.
    stolen = np.mean([d.domain == UNSEEN_DOMAIN for d in other_decisions])
    assert stolen < 0.1, stolen

    # Nothing new: a second update is a no-op.
    again = subprocess.run(
        [sys.executable, "-m", "serve.cli", "router", "update", "--home", str(home.root)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0 and "already covers" in again.stdout
    assert current_dir(home.router_dir).name == "v0002"
