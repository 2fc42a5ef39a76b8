"""The hash-chained audit log: appended with every change, and any edit is named by verify."""

from __future__ import annotations

import sqlite3

from registry import Registry
from tests._fixtures.registry import build_lora_expert


def _history(reg, tmp_path):
    expert = build_lora_expert(tmp_path / "law", name="demo-law")
    reg.add(expert.manifest_path)  # 1 register
    reg.activate("demo-law")  # 2 activate
    v2 = build_lora_expert(tmp_path / "law2", name="demo-law", version="1.1.0", seed=3)
    reg.add(v2.manifest_path)  # 3 register
    reg.activate("demo-law", "1.1.0")  # 4 retire 1.0.0, 5 activate 1.1.0
    reg.append_audit("note", "demo-law", {"text": "reviewed"}, actor="alice")  # 6


def test_every_change_is_logged_in_order_and_chain_verifies(registry, tmp_path):
    _history(registry, tmp_path)
    entries = registry.audit_entries()
    assert [(e.seq, e.action, e.subject) for e in entries] == [
        (1, "register", "demo-law@1.0.0"),
        (2, "activate", "demo-law@1.0.0"),
        (3, "register", "demo-law@1.1.0"),
        (4, "retire", "demo-law@1.0.0"),
        (5, "activate", "demo-law@1.1.0"),
        (6, "note", "demo-law"),
    ]
    assert entries[3].details == {"from": "active", "to": "retired", "reason": "superseded by demo-law@1.1.0"}
    report = registry.audit_verify()
    assert (report.ok, report.entries, report.first_bad) == (True, 6, None)
    assert report.message == "audit chain intact (6 entries)"


def test_edited_row_is_named(registry, mose_home, tmp_path):
    _history(registry, tmp_path)
    with sqlite3.connect(mose_home.db_path) as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    report = registry.audit_verify()
    assert (report.ok, report.first_bad, report.entries) == (False, 2, 2)
    assert report.message.startswith(
        "audit entry 2 (activate demo-law@1.0.0) was altered: its content no longer matches its hash (stored "
    )


def test_rewritten_row_with_recomputed_hash_breaks_the_next_link(registry, mose_home, tmp_path):
    from registry.audit import entry_hash

    _history(registry, tmp_path)
    row = next(r for r in registry.store.audit_rows() if r.seq == 3)
    forged = entry_hash(row.prev_hash, 3, row.ts, "mallory", row.action, row.subject, row.details_json)
    with sqlite3.connect(mose_home.db_path) as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory', hash = ? WHERE seq = 3", (forged,))
    report = registry.audit_verify()
    assert (report.ok, report.first_bad) == (False, 4)
    assert report.message == (
        "audit entry 4 (retire demo-law@1.0.0) does not follow entry 3: the chain was cut or rewritten there"
    )


def test_deleted_row_is_named(registry, mose_home, tmp_path):
    _history(registry, tmp_path)
    with sqlite3.connect(mose_home.db_path) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 4")
    report = registry.audit_verify()
    assert (report.ok, report.first_bad) == (False, 4)
    assert report.message == "audit entry 4 is missing: the log jumps to audit entry 5 (activate demo-law@1.1.0)"


def test_failed_change_leaves_no_entry(registry, tmp_path):
    from registry.errors import StatusError

    _history(registry, tmp_path)
    before = registry.audit_verify().entries
    try:
        registry.quarantine("demo-law", "1.0.0", reason="late complaint")  # retired -> quarantined not allowed
    except StatusError:
        pass
    assert registry.audit_verify().entries == before


def test_log_survives_reopen(mose_home, tmp_path):
    with Registry.open(mose_home) as reg:
        _history(reg, tmp_path)
    with Registry.open(mose_home) as reg:
        assert reg.audit_verify().entries == 6
        reg.retire("demo-law")
        assert reg.audit_verify().ok and reg.audit_entries(limit=1)[0].action == "retire"
