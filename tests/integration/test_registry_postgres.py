"""The PostgreSQL registry store on a real server: chosen by MOSE_REGISTRY_URL, the same answers as
SQLite for the same changes, blobs fetched by nodes that share nothing but the database (and
refused when the database's copy is damaged), and a connection the server dropped is reopened."""

from __future__ import annotations

import pytest

from registry import Registry
from registry.errors import AccessDeniedError, ArtifactError, MoseError
from registry.home import MoseHome
from registry.store import SQLiteStore
from registry.stores import describe, open_store
from tests._fixtures.registry import build_lora_expert, run_mose


def test_the_url_chooses_the_store(tmp_path, monkeypatch, postgres_url):
    from registry.store_postgres import PostgresStore

    home = MoseHome.from_env(tmp_path / "home")
    monkeypatch.delenv("MOSE_REGISTRY_URL", raising=False)
    with Registry.open(home) as reg:
        assert isinstance(reg.store, SQLiteStore) and reg.store.path == home.db_path and reg.shared_blobs is None
    other = tmp_path / "elsewhere" / "reg.db"
    store = open_store(home, f"sqlite://{other}")
    assert isinstance(store, SQLiteStore) and store.path == other
    store.close()
    monkeypatch.setenv("MOSE_REGISTRY_URL", postgres_url)
    with Registry.open(home) as reg:
        assert isinstance(reg.store, PostgresStore) and reg.shared_blobs is reg.store
    with pytest.raises(MoseError) as caught:
        open_store(home, "mysql://root:hunter2@db/mose")
    assert str(caught.value).startswith("MOSE_REGISTRY_URL: unsupported registry URL scheme 'mysql'")
    assert "hunter2" not in str(caught.value)


def test_a_password_never_appears_in_messages(tmp_path, postgres_server):
    home = MoseHome.from_env(tmp_path / "home")
    url = f"postgresql://mose:s3cret-pass@127.0.0.1:{postgres_server.port}/no_such_database"
    with pytest.raises(MoseError) as caught:
        open_store(home, url)
    assert "cannot reach the registry database postgresql://mose:***@127.0.0.1" in str(caught.value)
    assert "s3cret-pass" not in str(caught.value)
    assert "s3cret-pass" not in describe(url, home) and describe(url, home).startswith("PostgreSQL ")
    result = run_mose("expert", "list", home=home.root, env={"MOSE_REGISTRY_URL": url})
    assert result.returncode == 2 and "s3cret-pass" not in result.stdout + result.stderr


def _history(home, tmp_path, label) -> dict:
    """The same changes on whichever store MOSE_REGISTRY_URL names; what they leave, minus times."""
    with Registry.open(home) as reg:
        for version, seed in (("1.0.0", 1), ("1.2.0", 2), ("1.10.0", 3)):
            reg.add(
                build_lora_expert(tmp_path / label / version, name="demo-law", version=version, seed=seed).manifest_path
            )
        reg.add(build_lora_expert(tmp_path / label / "b", name="demo_law", seed=4).manifest_path)
        reg.add_domain("maritime_law", parent="law")
        reg.activate("demo-law", "1.0.0")
        reg.activate("demo-law", "1.2.0")
        reg.quarantine("demo-law", None, reason="wrong answers")
        reg.remove("demo-law", "1.0.0")
        reg.update_reputation("demo-law", 3, 1)
        reg.update_reputation("demo-law", 1, 2, answer_correct=False)
        reg.record_verdict("v1", {"jurors": ["demo-law"]})
        reg.record_feedback("v1", True, {"demo-law": (1.0, 0.0)})
        _, old_token = reg.create_team("law-team")
        reg.revoke_team("law-team", reason="lost laptop")
        _, token = reg.rotate_team_token("law-team")
        reg.create_team("bio-team")
        assert reg.authenticate_team(token).name == "law-team"
        with pytest.raises(AccessDeniedError):
            reg.authenticate_team(old_token)
        return {
            "teams": [(t.name, t.public_keys, t.revoked, t.rotated_at is not None) for t in reg.teams()],
            "experts": [(r.ref, r.status, r.domains) for r in reg.list()],
            "latest": reg.get("demo-law").ref,
            "domains": reg.taxonomy.parent("maritime_law"),
            "reputation": reg.reputation("demo-law").model_dump(exclude={"updated_at"}),
            "verdict": reg.verdict("v1"),
            "audit": [(e.seq, e.actor, e.action, e.subject, e.details) for e in reg.audit_entries()],
            "audit_ok": reg.audit_verify().ok,
            "files": [(f.relpath, f.sha256, f.size) for f in reg.store.expert_files("demo-law", "1.2.0")],
            "referenced": sorted(reg.store.referenced_blobs()),
        }


def test_postgres_answers_as_sqlite_does(tmp_path, monkeypatch, postgres_url):
    on_postgres = _history(MoseHome.from_env(tmp_path / "pg-home"), tmp_path, "pg")
    monkeypatch.delenv("MOSE_REGISTRY_URL")
    on_sqlite = _history(MoseHome.from_env(tmp_path / "sqlite-home"), tmp_path, "sqlite")
    assert on_postgres == on_sqlite
    # byte order, as SQLite sorts ('-' before '_'), whatever the database's collation
    assert [ref for ref, _, _ in on_postgres["experts"]] == ["demo-law@1.2.0", "demo-law@1.10.0", "demo_law@1.0.0"]


def test_a_node_with_an_empty_home_fetches_verified_blobs(tmp_path, postgres_url):
    from experts.loader import read_verified

    expert = build_lora_expert(tmp_path / "e", name="demo-law")
    with Registry.open(tmp_path / "head") as head:
        head.add(expert.manifest_path)
        head.activate("demo-law")
    weights = expert.manifest["files"]["adapter_model.safetensors"]
    with Registry.open(tmp_path / "node") as node:
        assert list(node.artifacts.blobs()) == []
        record = node.active("demo-law")
        files = read_verified(node, record)  # what the expert pool reads: fetched, hashed, parsed
        assert files.files["adapter_model.safetensors"] == (expert.root / "adapter_model.safetensors").read_bytes()
        assert sorted(node.artifacts.blobs()) == sorted(expert.manifest["files"].values())
        assert node.fetch_blobs([weights]) == []  # cached: not fetched again
        assert not any(node.artifacts.tmp_root.glob("*"))

    # The database's copy is damaged: a node without the blob refuses it and keeps nothing.
    with Registry.open(tmp_path / "head") as head:
        with head.store.transaction():
            head.store._write("UPDATE blob_chunks SET data = %s WHERE sha256 = %s AND idx = 0", (b"evil", weights))
    with Registry.open(tmp_path / "node2") as node:
        assert node.fetch_blobs([weights]) == []
        assert not node.artifacts.has(weights) and not any(node.artifacts.tmp_root.glob("*"))
        check = node.verify_files("demo-law")
        assert not check.ok and check.problems == [
            f"adapter_model.safetensors: blob {weights} is missing from {node.artifacts.path_for(weights).parent}"
        ]
        with pytest.raises(ArtifactError) as caught:
            read_verified(node, node.active("demo-law"))
        assert "adapter_model.safetensors is missing from the artifact store; the expert was quarantined" in str(
            caught.value
        )
        assert node.get("demo-law").status == "quarantined" and node.audit_verify().ok


def test_a_connection_the_server_dropped_is_reopened(tmp_path, postgres_url):
    import psycopg

    with Registry.open(tmp_path / "home") as reg:
        reg.add(build_lora_expert(tmp_path / "e", name="demo-law").manifest_path)
        pid = reg.store._conn.info.backend_pid
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert [r.ref for r in reg.list()] == ["demo-law@1.0.0"]  # a read: retried on a new connection
        pid = reg.store._conn.info.backend_pid
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        reg.activate("demo-law")  # a write first: its transaction begins on a new connection
        assert reg.store._conn.info.backend_pid != pid and reg.audit_verify().entries == 2
