"""A registration killed with SIGKILL in the middle of copying leaves nothing half-registered, on
each store; on PostgreSQL also when the kill lands while the blob is uploaded to the database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from registry import Registry
from tests._fixtures.registry import REPO_ROOT, build_lora_expert, run_mose, sha256_of


def _wait_for_partial_copy(tmp_dir, proc, prefix, timeout_s=60.0):
    """Until a temp file of blob ``prefix...`` has some bytes in the artifact store's tmp/ (copy under way)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"registration ended before it could be killed: {proc.communicate()}"
        parts = list(tmp_dir.glob(f"{prefix}.*.part")) if tmp_dir.is_dir() else []
        if any(part.stat().st_size > 0 for part in parts):
            return parts
        time.sleep(0.02)
    raise AssertionError("no partial copy appeared")


def test_sigkill_while_copying_leaves_whole_expert_or_nothing(registry_backend, mose_home, tmp_path):
    seed = build_lora_expert(tmp_path / "seed", name="seed-law", seed=1)
    run_mose("expert", "add", str(seed.manifest_path), home=mose_home.root, check=True)
    with Registry.open(mose_home) as reg:
        before = [(r.ref, r.status) for r in reg.list()]

    # 30 layers x rank 16: ~3.7 MB = 4 chunks of 1 MiB, each followed by a 0.5 s pause (test hook).
    big = build_lora_expert(tmp_path / "big", name="big-law", layers=30, rank=16, seed=2)
    env = {**os.environ, "MOSE_HOME": str(mose_home.root), "MOSE_TEST_COPY_CHUNK_DELAY_S": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "expert", "add", str(big.manifest_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    weights_sha = big.manifest["files"]["adapter_model.safetensors"]
    parts = _wait_for_partial_copy(mose_home.artifacts_dir / "tmp", proc, weights_sha[:12])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    full_size = (big.root / "adapter_model.safetensors").stat().st_size
    assert [0 < part.stat().st_size < full_size for part in parts] == [True], "kill must land mid-copy"

    with Registry.open(mose_home) as reg:
        assert [(r.ref, r.status) for r in reg.list()] == before  # no half-registered expert
        assert reg.audit_verify().ok and reg.audit_verify().entries == 1
        visible = list(reg.artifacts.blobs())
        assert weights_sha not in visible  # the partial weights never became visible
        for sha in visible:  # whatever is visible is complete and correct
            assert sha256_of(reg.artifacts.path_for(sha)) == sha

    rerun = run_mose("expert", "add", str(big.manifest_path), "--json", home=mose_home.root, check=True)
    assert '"status": "pending"' in rerun.stdout
    with Registry.open(mose_home) as reg:
        assert [r.ref for r in reg.list()] == ["big-law@1.0.0", "seed-law@1.0.0"]
        assert reg.verify_files("big-law").ok
        assert reg.audit_verify().ok and reg.audit_verify().entries == 2
        assert reg.gc(min_age_s=0) == [parts[0].name]  # the dead process's temp file
        assert not any(reg.artifacts.tmp_root.glob("*.part")) and reg.verify_files("big-law").ok


def _wait_for_upload(url, proc, sha, timeout_s=60.0):
    """Until the registration holds the upload lock of blob ``sha`` (its transaction is open)."""
    import psycopg

    from registry.store_postgres import BLOB_LOCK_CLASS

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"registration ended before it could be killed: {proc.communicate()}"
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid"
                " AND objid = hashtext(%s)::oid AND granted",
                (BLOB_LOCK_CLASS, sha),
            ).fetchone()[0]
            if held:
                return
            time.sleep(0.02)
    raise AssertionError("the upload to the database never started")


def test_sigkill_while_uploading_to_postgres_leaves_nothing(postgres_url, mose_home, tmp_path):
    seed = build_lora_expert(tmp_path / "seed", name="seed-law", seed=1)
    run_mose("expert", "add", str(seed.manifest_path), home=mose_home.root, check=True)
    big = build_lora_expert(tmp_path / "big", name="big-law", layers=30, rank=16, seed=2)
    weights_sha = big.manifest["files"]["adapter_model.safetensors"]
    env = {**os.environ, "MOSE_HOME": str(mose_home.root), "MOSE_TEST_COPY_CHUNK_DELAY_S": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "expert", "add", str(big.manifest_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for_upload(postgres_url, proc, weights_sha)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with Registry.open(mose_home) as reg:
        assert reg.artifacts.has(weights_sha)  # the local copy was complete: the kill landed in the upload
        assert [(r.ref, r.status) for r in reg.list()] == [("seed-law@1.0.0", "pending")]
        assert reg.audit_verify().ok and reg.audit_verify().entries == 1
        assert weights_sha not in reg.shared_blobs.blob_digests()  # rolled back: no partial blob in the database
        config_sha = big.manifest["files"]["adapter_config.json"]  # uploaded whole before the weights
        assert reg.shared_blobs.blob_digests() - reg.store.referenced_blobs() == {config_sha}
        assert sorted(reg.gc(min_age_s=0)) == sorted([config_sha, weights_sha, config_sha])  # here and there
        assert reg.shared_blobs.blob_digests() == reg.store.referenced_blobs()

    run_mose("expert", "add", str(big.manifest_path), home=mose_home.root, check=True)
    with Registry.open(tmp_path / "empty-node") as node:  # a node sharing nothing but the database
        assert [r.ref for r in node.list()] == ["big-law@1.0.0", "seed-law@1.0.0"]
        assert node.verify_files("big-law").ok and node.artifacts.has(weights_sha)
        assert node.audit_verify().ok and node.audit_verify().entries == 2
