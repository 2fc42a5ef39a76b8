"""Four processes registering 25 experts each at once lose nothing and keep the audit chain valid,
on each store (SQLite in MOSE_HOME, and a PostgreSQL server)."""

from __future__ import annotations

import json
import subprocess
import sys

from registry import Registry
from tests._fixtures.registry import REPO_ROOT, build_lora_expert, run_mose

WORKERS, PER_WORKER = 4, 25


def test_four_processes_register_100_experts(registry_backend, mose_home, tmp_path):
    batches = [
        [
            str(build_lora_expert(tmp_path / f"w{w}-{i}", name=f"law-w{w}-{i}", layers=1, seed=w * 100 + i).root)
            for i in range(PER_WORKER)
        ]
        for w in range(WORKERS)
    ]
    go = tmp_path / "go"
    code = (
        "import sys, json; from tests._fixtures.registry import register_many; "
        "register_many(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(mose_home.root), json.dumps(batch), str(go)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for batch in batches
    ]
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    with Registry.open(mose_home) as reg:
        names = sorted(r.name for r in reg.list())
        assert names == sorted(f"law-w{w}-{i}" for w in range(WORKERS) for i in range(PER_WORKER))
        assert all(r.status == "pending" for r in reg.list())
        report = reg.audit_verify()
        assert report.ok and report.entries == WORKERS * PER_WORKER, report.message
        assert {e.subject for e in reg.audit_entries()} == {f"{n}@1.0.0" for n in names}
        assert len({e.actor for e in reg.audit_entries()}) == WORKERS
        for record in reg.list():
            assert all(path.is_file() for path in reg.blob_paths(record).values())
    verified = run_mose("audit", "verify", "--json", home=mose_home.root, check=True)
    assert json.loads(verified.stdout)["entries"] == WORKERS * PER_WORKER
    if registry_backend == "postgres":  # every blob is in the database: a node with an empty home gets them all
        with Registry.open(tmp_path / "empty-node") as node:
            assert all(node.verify_files(record.name).ok for record in node.list())  # fetched, then re-hashed
            assert set(node.artifacts.blobs()) == node.store.referenced_blobs() == node.shared_blobs.blob_digests()
