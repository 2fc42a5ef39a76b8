"""Hash-chained audit log, stored beside the records it describes.

Entry ``n`` stores ``hash_n = sha256(hash_{n-1} + canonical(entry_n))`` (``hash_0`` is 64 zeros),
so changing, inserting or deleting any entry breaks every later link. Entries are appended in
the same transaction as the change they describe: there is never a change without its entry.
:func:`verify_chain` recomputes the chain and names the first entry that no longer matches.
(Cutting entries off the *end* leaves a valid shorter chain; keep a copy of the head hash
elsewhere if that matters.)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from registry.store import AuditRow, RegistryStore, utc_now

GENESIS_HASH = "0" * 64


class AuditEntry(BaseModel):
    """One audit-log entry."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    seq: int
    """Position in the log, from 1."""
    ts: str
    """UTC time of the change (ISO 8601)."""
    actor: str
    """Who made the change (``cli``, a user name, ``smoke-test``, ...)."""
    action: str
    """``register``, ``activate``, ``retire``, ``quarantine``, ``remove``, ``add-domain``, ..."""
    subject: str
    """What changed, usually ``name@version``."""
    details: dict[str, Any]
    """Action-specific facts (file digests, previous status, reason, ...)."""
    hash: str
    """This entry's link in the chain."""

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEntry:
        return cls(
            seq=row.seq,
            ts=row.ts,
            actor=row.actor,
            action=row.action,
            subject=row.subject,
            details=json.loads(row.details_json),
            hash=row.hash,
        )


class AuditReport(BaseModel):
    """Result of recomputing the chain."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    ok: bool
    """True when every entry matches its hash and follows the previous one."""
    entries: int
    """How many entries were checked."""
    first_bad: int | None = None
    """``seq`` of the first entry that fails, if any."""
    message: str
    """What was found, in words."""


def _canonical(row_fields: dict[str, Any]) -> str:
    return json.dumps(row_fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(prev_hash: str, seq: int, ts: str, actor: str, action: str, subject: str, details_json: str) -> str:
    """The chain hash of one entry given the previous entry's hash."""
    body = _canonical(
        {"seq": seq, "ts": ts, "actor": actor, "action": action, "subject": subject, "details": details_json}
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def append_entry(store: RegistryStore, action: str, subject: str, details: dict[str, Any], actor: str) -> AuditEntry:
    """Append one entry; joins (or opens) the store's write transaction so it commits with the change."""
    with store.transaction():
        last = store.last_audit()
        prev_hash, seq = (last.hash, last.seq + 1) if last else (GENESIS_HASH, 1)
        ts = utc_now()
        details_json = _canonical(details)
        digest = entry_hash(prev_hash, seq, ts, actor, action, subject, details_json)
        row = AuditRow(seq, ts, actor, action, subject, details_json, prev_hash, digest)
        store.insert_audit(row)
    return AuditEntry.from_row(row)


def verify_chain(store: RegistryStore) -> AuditReport:
    """Recompute every link; the report names the first entry that was altered, inserted or removed."""
    prev_hash, count = GENESIS_HASH, 0
    for expected_seq, row in enumerate(store.audit_rows(), start=1):
        count += 1
        label = f"audit entry {row.seq} ({row.action} {row.subject})"
        if row.seq != expected_seq:
            return _broken(count, expected_seq, f"audit entry {expected_seq} is missing: the log jumps to {label}")
        if row.prev_hash != prev_hash:
            return _broken(
                count, row.seq, f"{label} does not follow entry {row.seq - 1}: the chain was cut or rewritten there"
            )
        recomputed = entry_hash(prev_hash, row.seq, row.ts, row.actor, row.action, row.subject, row.details_json)
        if recomputed != row.hash:
            return _broken(
                count,
                row.seq,
                f"{label} was altered: its content no longer matches its hash (stored {row.hash[:12]}…, recomputed {recomputed[:12]}…)",
            )
        prev_hash = row.hash
    return AuditReport(ok=True, entries=count, message=f"audit chain intact ({count} entries)")


def _broken(count: int, seq: int, message: str) -> AuditReport:
    return AuditReport(ok=False, entries=count, first_bad=seq, message=message)
