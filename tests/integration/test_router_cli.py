"""`mose router` through the real CLI (subprocesses): eval JSON contract, route, missing artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from router_model.artifact import HELDOUT_ROWS, current_dir
from router_model.data import load_jsonl, write_jsonl
from tests._fixtures.router import UNSEEN_DOMAIN

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACT = {"n", "accuracy", "macro_f1", "ece", "abstain_rate", "accuracy_when_answered",
            "per_source", "latency_ms", "batch_qps", "baselines"}  # fmt: skip


def mose(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args, "--home", str(home)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_eval_prints_exactly_one_json_object_with_the_contract_keys(trained_router_home, tmp_path):
    rows = [
        r for r in load_jsonl(current_dir(trained_router_home.router_dir) / HELDOUT_ROWS) if r.domain != UNSEEN_DOMAIN
    ]
    data = tmp_path / "eval.jsonl"
    write_jsonl(rows[:80], data)
    plots = tmp_path / "plots"
    done = mose("router", "eval", "--data", str(data), "--json", "--latency-samples", "20", "--plots", str(plots),
                home=trained_router_home.root)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert CONTRACT <= set(report)
    assert report["n"] == 80
    assert set(report["baselines"]) == {"nearest_centroid", "knn", "tfidf_logreg"}
    assert all(0 <= v <= 1 for v in report["baselines"].values())
    assert set(report["latency_ms"]) == {"p50", "p99"} and report["batch_qps"] > 0
    for entry in report["per_source"].values():
        assert set(entry) == {"n", "accuracy"}
    assert sum(e["n"] for e in report["per_source"].values()) == 80
    assert report["accuracy"] <= report["accuracy_when_answered"] + 1e-9
    assert {p.name for p in plots.iterdir()} == {"confusion_matrix.png", "reliability.png"}


def test_route_json_and_status(trained_router_home):
    done = mose(
        "router", "route", "What are the symptoms of iron deficiency anemia?", "--json", home=trained_router_home.root
    )
    assert done.returncode == 0, done.stderr[-2000:]
    decision = json.loads(done.stdout)
    assert decision["domain"] == "medicine" and decision["provider"].endswith("ExecutionProvider")
    assert {"domain", "expert", "confidence", "top_k", "abstained"} <= set(decision)
    status = mose("router", "status", "--json", home=trained_router_home.root)
    assert status.returncode == 0 and json.loads(status.stdout)["version"] == "v0001"


def test_cli_without_router_artifact_says_how_to_fix(tmp_path):
    done = mose("router", "route", "hello", home=tmp_path / "empty-home")
    assert done.returncode == 2
    assert "error: no router artifact in" in done.stderr and "mose router train" in done.stderr
    assert done.stdout == ""


def test_split_writes_the_training_split(router_subset, tmp_path):
    from router_model.config import RouterConfig
    from router_model.data import split_heldout

    done = subprocess.run(
        [sys.executable, "-m", "serve.cli", "router", "split", "--data", str(router_subset), "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = RouterConfig()
    _, expected = split_heldout(load_jsonl(router_subset), config.heldout_fraction, config.split_salt)
    written = load_jsonl(tmp_path / f"{router_subset.stem}.heldout.jsonl")
    assert [r.id for r in written] == [r.id for r in expected]
