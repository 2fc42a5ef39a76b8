"""The catalog generation: one integer bumped in the same transaction as every change to the
experts or the domains, on both stores; a reader on another connection never sees a status
change without its generation, nor the generation without the change."""

from __future__ import annotations

import sqlite3

import pytest

from registry import Registry
from registry.errors import StatusError
from tests._fixtures.registry import build_lora_expert


def test_every_change_bumps_the_generation_once(registry_backend, mose_home, tmp_path):
    with Registry.open(mose_home) as reg:
        seen = [reg.catalog_generation()]

        def bumped() -> bool:
            seen.append(reg.catalog_generation())
            return seen[-1] == seen[-2] + 1

        assert seen == [0]
        reg.add(
            build_lora_expert(tmp_path / "a1", name="cardio", version="1.0.0", domains=("cardiology",)).manifest_path
        )
        assert bumped()
        reg.add(
            build_lora_expert(tmp_path / "a2", name="cardio", version="1.1.0", domains=("cardiology",)).manifest_path
        )
        assert bumped()
        reg.activate("cardio", "1.0.0")
        assert bumped()
        reg.activate("cardio", "1.0.0")  # already active: nothing changes
        assert not bumped()
        seen.pop()
        reg.activate("cardio", "1.1.0")  # 1.0.0 retired and 1.1.0 activated in one transaction
        assert reg.catalog_generation() == seen[-1] + 2
        seen.append(reg.catalog_generation())
        reg.quarantine("cardio", None, "review")
        assert bumped()
        reg.remove("cardio", "1.0.0")
        assert bumped()
        reg.add_domain("interventional_cardiology", parent="cardiology")
        assert bumped()
        generation = reg.publish("router-update", "v0002", {"added_domains": ["cardiology"]}, "test")
        assert generation == reg.catalog_generation() and bumped()
        assert reg.audit_entries()[-1].details["catalog_generation"] == generation
        reg.activate("cardio", "1.1.0")  # back from quarantine
        assert bumped()
        with pytest.raises(StatusError):
            reg.remove("cardio", "1.1.0")  # refused (active): rolled back, no bump
        assert not bumped()
        seen.pop()
        assert reg.audit_verify().ok
    with Registry.open(mose_home) as again:  # another connection, the same integer
        assert again.catalog_generation() == seen[-1]


def test_a_status_change_and_its_generation_commit_together(registry_backend, mose_home, tmp_path):
    expert = build_lora_expert(tmp_path / "x", name="cardio", domains=("cardiology",))
    with Registry.open(mose_home) as writer, Registry.open(mose_home) as reader:
        writer.add(expert.manifest_path)
        before = reader.active_snapshot()
        assert before[1] == []
        with writer.store.transaction():
            writer.activate("cardio")
            # Not committed: the other connection sees neither the status nor the generation.
            assert reader.catalog_generation() == before[0]
            assert reader.list(status="active") == []
        generation, active = reader.active_snapshot()
        assert generation == before[0] + 1 and [r.name for r in active] == ["cardio"]

        with pytest.raises(RuntimeError), writer.store.transaction():
            writer.retire("cardio")
            raise RuntimeError("abort")  # rolled back: the status and the generation
        assert reader.catalog_generation() == generation
        assert [r.name for r in reader.list(status="active")] == ["cardio"]


def test_a_registry_file_from_before_the_generation_gets_it(mose_home, tmp_path, monkeypatch):
    from registry.store import SCHEMA_VERSION

    monkeypatch.delenv("MOSE_REGISTRY_URL", raising=False)
    with Registry.open(mose_home) as reg:
        reg.add(build_lora_expert(tmp_path / "x", name="cardio", domains=("cardiology",)).manifest_path)
    with sqlite3.connect(mose_home.db_path) as conn:
        conn.execute("DROP TABLE catalog")
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    with Registry.open(mose_home) as reg:
        assert reg.catalog_generation() == 0
        reg.activate("cardio")
        assert reg.catalog_generation() == 1
    with sqlite3.connect(mose_home.db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    conn.close()


def test_a_postgres_registry_from_before_the_generation_gets_it(postgres_url, mose_home, tmp_path):
    import psycopg

    from registry.store_postgres import SCHEMA_VERSION

    with Registry.open(mose_home) as reg:
        reg.add(build_lora_expert(tmp_path / "x", name="cardio", domains=("cardiology",)).manifest_path)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE catalog")
        conn.execute("UPDATE mose_schema SET version = 1")
    with Registry.open(mose_home) as reg:
        assert reg.catalog_generation() == 0
        reg.activate("cardio")
        assert reg.catalog_generation() == 1
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM mose_schema").fetchone()[0] == SCHEMA_VERSION == 2
