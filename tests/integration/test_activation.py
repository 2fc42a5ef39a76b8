"""One activation for every entry point: activate, teach the router a domain it does not know
(incremental update, in the caller's process), publish (catalog generation bumped, audited)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from router_model.artifact import current_dir, read_metadata
from router_model.data import load_jsonl, normalise
from router_model.runtime import OnnxRouter
from tests._fixtures.registry import build_lora_expert
from tests._fixtures.router import UNSEEN_DOMAIN
from tests.integration.test_router_update import law_example_queries

REPO_ROOT = Path(__file__).resolve().parents[2]


def _mose(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args, "--home", str(home)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_activation_teaches_the_router_and_publishes(router_home_copy, shared_data, tmp_path):
    from registry import Registry

    home = router_home_copy
    heldout = load_jsonl(current_dir(home.router_dir) / "heldout.jsonl")
    queries = law_example_queries(shared_data, {normalise(r.query) for r in heldout})
    law = build_lora_expert(tmp_path / "law", name="law-helper", domains=(UNSEEN_DOMAIN,), example_queries=queries)
    medicine = build_lora_expert(tmp_path / "med", name="med-helper", domains=("medicine",))
    assert _mose("expert", "add", str(law.manifest_path), home=home.root).returncode == 0
    assert _mose("expert", "add", str(medicine.manifest_path), home=home.root).returncode == 0

    done = _mose("expert", "activate", "law-helper", "--json", home=home.root)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "active"
    assert result["router"]["added_domains"] == [UNSEEN_DOMAIN] and result["router"]["previous"] == "v0001"
    assert result["router"]["version"] == "v0002" == read_metadata(current_dir(home.router_dir)).version
    with Registry.open(home) as reg:
        published = reg.audit_entries()[-1]
        assert (published.action, published.subject) == ("router-update", "v0002")
        assert published.details["added_domains"] == [UNSEEN_DOMAIN]
        assert published.details["catalog_generation"] == result["catalog_generation"] == reg.catalog_generation()
        router = OnnxRouter.load(home, registry=reg)
        decisions = router.route_batch([r.query for r in heldout if r.domain == UNSEEN_DOMAIN])
    assert sum(d.expert == "law-helper" for d in decisions) >= len(decisions) / 2
    assert {d.catalog_generation for d in decisions} == {result["catalog_generation"]}

    # A domain the router knows: nothing to learn, and torch is not even imported.
    probe = (
        "import sys, json; from registry import Registry; from serve.activation import activate; "
        f"reg = Registry.open({str(home.root)!r}); a = activate(reg, 'med-helper'); "
        "print(json.dumps([a.router_json(), 'torch' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MOSE_HOME": str(home.root)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    router_json, torch_imported = json.loads(out.stdout)
    assert router_json["version"] == "v0002" and router_json["added_domains"] == [] and not torch_imported


def test_two_activations_at_once_both_reach_the_router(router_home_copy, tmp_path):
    """The router update is serialised: the second one builds on the first's version."""
    from registry import Registry
    from serve.activation import activate

    home = router_home_copy
    experts = {"cardio-helper": "cardiology", "onco-helper": "oncology"}
    with Registry.open(home) as reg:
        for name, domain in experts.items():
            queries = [f"Question {i} about {domain} and its treatment?" for i in range(22)]
            reg.add(
                build_lora_expert(tmp_path / name, name=name, domains=(domain,), example_queries=queries).manifest_path
            )
    results: dict[str, object] = {}

    def run(name: str) -> None:
        with Registry.open(home) as reg:
            results[name] = activate(reg, name)

    threads = [threading.Thread(target=run, args=(name,)) for name in experts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert all(results[name].router_error is None for name in experts)
    learned = [domain for name in experts for domain in results[name].router.added_domains]
    metadata = read_metadata(current_dir(home.router_dir))
    assert sorted(learned) == sorted(experts.values())  # each update added what was new when it ran
    assert set(experts.values()) <= set(metadata.labels) and metadata.version in ("v0002", "v0003")
