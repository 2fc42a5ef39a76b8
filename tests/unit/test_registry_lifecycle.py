"""Statuses, look-ups, the artifact store, file verification and reputation."""

from __future__ import annotations

import json
import os
import stat

import pytest

from registry import ExpertManifest, Registry, manifest_json_schema
from registry.artifacts import ArtifactStore
from registry.errors import ArtifactError, NotFoundError, StatusError
from registry.manifest import canonical_bytes, load_manifest
from registry.signing import generate_keypair, load_private_key, sign_manifest
from tests._fixtures.registry import build_lora_expert, registry_state, sha256_of


@pytest.fixture
def two_versions(registry, tmp_path):
    for version, seed in (("1.0.0", 1), ("1.2.0", 2), ("1.10.0", 3)):
        registry.add(build_lora_expert(tmp_path / version, name="demo-law", version=version, seed=seed).manifest_path)
    return registry


def test_get_latest_uses_semantic_version_order(two_versions):
    assert two_versions.get("demo-law").version == "1.10.0"
    assert two_versions.get("demo-law", "1.2.0").version == "1.2.0"
    with pytest.raises(NotFoundError) as caught:
        two_versions.get("demo-law", "9.9.9")
    assert str(caught.value) == "demo-law@9.9.9 is not registered (registered versions: 1.0.0, 1.2.0, 1.10.0)"
    with pytest.raises(NotFoundError) as caught:
        two_versions.get("nobody")
    assert str(caught.value) == "expert 'nobody' is not registered (see `mose expert list`)"


def test_at_most_one_active_version(two_versions):
    reg = two_versions
    reg.activate("demo-law", "1.0.0")
    reg.activate("demo-law", "1.2.0")
    assert {r.version: r.status for r in reg.list()} == {"1.0.0": "retired", "1.2.0": "active", "1.10.0": "pending"}
    assert reg.active("demo-law").version == "1.2.0"
    reg.activate("demo-law", "1.0.0")  # roll back
    assert [r.version for r in reg.list(status="active")] == ["1.0.0"]
    assert reg.audit_verify().ok


def test_status_transitions(two_versions):
    reg = two_versions
    reg.activate("demo-law", "1.2.0")
    assert reg.quarantine("demo-law", None, reason="wrong answers").ref == "demo-law@1.2.0"
    assert reg.get("demo-law", "1.2.0").status == "quarantined"
    assert reg.active("demo-law") is None
    reg.retire("demo-law", "1.2.0")
    before = registry_state(reg)
    with pytest.raises(StatusError) as caught:
        reg.quarantine("demo-law", "1.2.0", reason="again")
    assert str(caught.value) == "demo-law@1.2.0 is retired; it can only become active"
    assert registry_state(reg) == before
    assert reg.audit_entries()[-2].details == {"from": "active", "to": "quarantined", "reason": "wrong answers"}


def test_list_filters(two_versions, tmp_path):
    reg = two_versions
    reg.add(build_lora_expert(tmp_path / "med", name="cardio", domains=("cardiology",)).manifest_path)
    reg.activate("cardio")
    assert [r.ref for r in reg.list(status="active")] == ["cardio@1.0.0"]
    assert [r.ref for r in reg.list(domain="cardiology")] == ["cardio@1.0.0"]
    assert len(reg.list(status="pending")) == 3
    with pytest.raises(StatusError):
        reg.list(status="deleted")


def test_remove_refuses_active_and_gc_removes_unreferenced_blobs(two_versions):
    reg = two_versions
    reg.activate("demo-law", "1.0.0")
    with pytest.raises(StatusError) as caught:
        reg.remove("demo-law", "1.0.0")
    assert str(caught.value) == "demo-law@1.0.0 is active; retire it first (`mose expert retire demo-law@1.0.0`)"
    blobs_before = set(reg.artifacts.blobs())
    doomed = reg.get("demo-law", "1.2.0").manifest.files["adapter_model.safetensors"]
    reg.remove("demo-law", "1.2.0")
    assert reg.gc(min_age_s=3600) == []  # too recent: could belong to a registration in flight
    assert reg.gc(min_age_s=0) == [doomed]
    assert set(reg.artifacts.blobs()) == blobs_before - {doomed}
    assert [r.version for r in reg.list()] == ["1.0.0", "1.10.0"]
    assert reg.audit_entries()[-1].action == "remove" and reg.audit_verify().ok


def test_identical_files_are_stored_once(registry, tmp_path):
    a = build_lora_expert(tmp_path / "a", name="law-a", seed=5)
    b = build_lora_expert(tmp_path / "b", name="law-b", seed=5)  # same bytes, other name
    registry.add(a.manifest_path)
    registry.add(b.manifest_path)
    assert len(list(registry.artifacts.blobs())) == 2
    blob = registry.blob_paths(registry.get("law-b"))["adapter_model.safetensors"]
    assert not stat.S_IMODE(blob.stat().st_mode) & 0o222  # blobs are read-only


def test_verify_files_detects_corruption(registry, lora_expert):
    record = registry.add(lora_expert.manifest_path)
    assert registry.verify_files("demo-law").ok
    blob = registry.blob_paths(record)["adapter_model.safetensors"]
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    check = registry.verify_files("demo-law")
    assert not check.ok
    assert check.problems == [
        f"adapter_model.safetensors: blob {blob} is corrupted: its content hashes to {sha256_of(blob)}"
    ]


def test_artifact_put_with_wrong_digest_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "file.json"
    source.write_text("{}")
    with pytest.raises(ArtifactError):
        store.put_file(source, "0" * 64)
    assert list(store.blobs()) == [] and list(store.tmp_root.iterdir()) == []
    path = store.put_file(source, sha256_of(source))
    assert path == store.path_for(sha256_of(source)) and path.read_text() == "{}"


def test_reputation_accumulates_and_persists(mose_home):
    with Registry.open(mose_home) as reg:
        assert reg.reputation("demo-law").mean == 0.5
        reg.update_reputation("demo-law", successes=3)
        rep = reg.update_reputation("demo-law", failures=1)
        assert (rep.alpha, rep.beta, rep.alpha_wrong, rep.beta_wrong) == (4.0, 2.0, 1.0, 1.0)
        rep = reg.update_reputation("demo-law", successes=1, answer_correct=False)
        assert (rep.alpha_wrong, rep.beta_wrong) == (2.0, 1.0)
    with Registry.open(mose_home) as reg:
        rep = reg.reputation("demo-law")
        assert (rep.sensitivity, rep.specificity) == (pytest.approx(4 / 6), pytest.approx(2 / 3))
        assert rep.mean == pytest.approx(2 / 3)
        assert [e.action for e in reg.audit_entries()] == ["reputation"] * 3
        assert reg.audit_entries()[-1].details["answer_correct"] is False


def test_a_juror_that_always_votes_the_same_way_stays_at_one_half(mose_home):
    """The base rate must not pay: always voting "wrong" on a stream of 80 % wrong answers is
    right 80 % of the time, but its balanced accuracy stays 0.5."""
    with Registry.open(mose_home) as reg:
        for answer_correct in [False] * 80 + [True] * 20:
            hit = not answer_correct  # it always says "wrong"
            reg.update_reputation(
                "always-wrong", float(hit), float(not hit), answer_correct=answer_correct, audit=False
            )
        rep = reg.reputation("always-wrong")
    pooled_accuracy = (rep.alpha + rep.alpha_wrong) / (rep.alpha + rep.beta + rep.alpha_wrong + rep.beta_wrong)
    assert pooled_accuracy > 0.75 and rep.specificity > 0.95 and rep.sensitivity < 0.05
    assert rep.mean == pytest.approx(0.5, abs=0.02)  # the Beta(1, 1) priors pull each half a little


def test_a_schema_1_registry_file_gains_the_new_columns_and_keeps_its_rows(mose_home):
    """A registry file written before reputations had two halves opens, migrates in place, and
    its stored reputation reads as the half for correct answers."""
    import sqlite3

    from registry.store import SCHEMA_VERSION

    path = mose_home.db_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE reputation (expert TEXT PRIMARY KEY, alpha REAL NOT NULL, "
            "beta REAL NOT NULL, updated_at TEXT NOT NULL)"
        )
        conn.execute("INSERT INTO reputation VALUES ('demo-law', 5.0, 3.0, '2026-01-01T00:00:00+00:00')")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Registry.open(mose_home) as reg:
        rep = reg.reputation("demo-law", prior=(2.0, 2.0))
        assert (rep.alpha, rep.beta, rep.alpha_wrong, rep.beta_wrong) == (5.0, 3.0, 2.0, 2.0)
        assert rep.updated_at == "2026-01-01T00:00:00+00:00"
        reg.update_reputation("demo-law", failures=1, answer_correct=False, prior=(2.0, 2.0))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT alpha, beta, alpha_wrong, beta_wrong FROM reputation").fetchall() == [
            (5.0, 3.0, 2.0, 3.0)
        ]
    conn.close()


def test_json_manifest_and_schema(registry, tmp_path):
    expert = build_lora_expert(tmp_path / "j", manifest_format="json")
    assert registry.add(expert.manifest_path).ref == "demo-law@1.0.0"
    schema = manifest_json_schema()
    assert schema["additionalProperties"] is False
    assert "example_queries" in schema["required"] and "signature" not in schema["required"]
    assert schema["properties"]["example_queries"]["description"].startswith("At least 20")


def test_canonical_bytes_exclude_signature_and_cover_digests(mose_home, lora_expert):
    manifest = load_manifest(lora_expert.manifest_path)
    pair = generate_keypair("law-team", mose_home.keys_dir)
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    signed = sign_manifest(manifest, load_private_key(pair.private_key), "law-team")
    assert canonical_bytes(signed) == canonical_bytes(manifest)
    assert lora_expert.manifest["files"]["adapter_model.safetensors"] in canonical_bytes(manifest).decode()
    assert json.loads(canonical_bytes(manifest))["name"] == "demo-law"
    assert isinstance(ExpertManifest.model_validate_json(signed.model_dump_json()), ExpertManifest)
