"""Where the registry's records live, behind one small interface.

:class:`RegistryStore` is the interface the rest of the registry codes against, so a server
database can replace SQLite on a cluster. :class:`SQLiteStore` is the default: one file in WAL
mode, one connection per :class:`~registry.Registry`, writes in ``BEGIN IMMEDIATE`` transactions
(one writer at a time, queued on an ``flock`` of ``registry.db.lock``; ``busy_timeout`` covers
writers that do not take it), so concurrent processes lose nothing. Every write method must run inside :meth:`RegistryStore.transaction`.

The **catalog generation** is one integer that every change to the experts or the domains bumps
in the same transaction (:meth:`RegistryStore.bump_catalog_generation`): a server's replicas poll
it with one tiny query and re-read the active experts only when it moved, and a replica that
is told a newer generation than its own knows its snapshot is behind.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from registry.errors import MoseError

SCHEMA_VERSION = 4


def utc_now() -> str:
    """A sortable UTC timestamp (ISO 8601, microseconds)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class StoredExpert:
    """One row of ``experts``: a registered ``name@version``."""

    name: str
    version: str
    kind: str
    base_model: str | None
    status: str
    manifest_json: str
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class StoredFile:
    """One file of an expert: manifest-relative path, sha256 of its blob, size in bytes."""

    relpath: str
    sha256: str
    size: int


@dataclass(frozen=True)
class AuditRow:
    """One audit-log entry as stored; ``hash`` chains it to ``prev_hash`` (see :mod:`registry.audit`)."""

    seq: int
    ts: str
    actor: str
    action: str
    subject: str
    details_json: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class ReputationRow:
    """Two Beta distributions per expert (name): its successes and failures on answers that
    turned out correct (``alpha``, ``beta``) and on answers that turned out wrong
    (``alpha_wrong``, ``beta_wrong``; None until the first such feedback)."""

    expert: str
    alpha: float
    beta: float
    updated_at: str
    alpha_wrong: float | None = None
    beta_wrong: float | None = None


@dataclass(frozen=True)
class StoredTeam:
    """One row of ``teams``: a team, the salted hash of its token, its public keys (a JSON list of
    base64 ed25519 keys), and when it was created, its token last rotated, and revoked."""

    name: str
    token_salt: str
    token_hash: str
    public_keys_json: str
    created_at: str
    rotated_at: str | None = None
    revoked_at: str | None = None


class RegistryStore(ABC):
    """The registry's persistence interface (experts, files, audit log, domains, reputation, teams)."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """An exclusive write transaction; a nested call joins the outer one."""

    @abstractmethod
    def get_expert(self, name: str, version: str) -> StoredExpert | None: ...

    @abstractmethod
    def list_experts(self, status: str | None = None, name: str | None = None) -> list[StoredExpert]:
        """Experts ordered by name, then registration time."""

    @abstractmethod
    def insert_expert(self, expert: StoredExpert, files: list[StoredFile]) -> None:
        """Add an expert (and bump the catalog generation, in the same transaction)."""

    @abstractmethod
    def set_status(self, name: str, version: str, status: str, updated_at: str) -> None:
        """Change an expert's status (and bump the catalog generation, in the same transaction)."""

    @abstractmethod
    def delete_expert(self, name: str, version: str) -> None:
        """Delete an expert's record (and bump the catalog generation, in the same transaction)."""

    @abstractmethod
    def catalog_generation(self) -> int:
        """The catalog generation: 0 for a new registry, then one more for every change to the
        experts (registration, status, removal) or the domains, and for every publication
        (:meth:`bump_catalog_generation`). Never decreases; one tiny read."""

    @abstractmethod
    def bump_catalog_generation(self) -> int:
        """Add one to the catalog generation (inside :meth:`transaction`); returns the new value."""

    @abstractmethod
    def expert_files(self, name: str, version: str) -> list[StoredFile]: ...

    @abstractmethod
    def referenced_blobs(self) -> set[str]:
        """sha256 of every blob some expert still refers to."""

    @abstractmethod
    def last_audit(self) -> AuditRow | None: ...

    @abstractmethod
    def insert_audit(self, row: AuditRow) -> None: ...

    @abstractmethod
    def audit_rows(self) -> Iterator[AuditRow]:
        """Every audit entry in ``seq`` order."""

    @abstractmethod
    def list_domains(self) -> list[tuple[str, str | None]]:
        """Added domains ``(name, parent)`` in the order they were added."""

    @abstractmethod
    def insert_domain(self, name: str, parent: str | None, created_at: str) -> None:
        """Add a domain (and bump the catalog generation, in the same transaction)."""

    @abstractmethod
    def domain_count(self) -> int:
        """How many domains were added (domains are never removed: a cheap change detector)."""

    @abstractmethod
    def get_reputation(self, expert: str) -> ReputationRow | None: ...

    @abstractmethod
    def put_reputation(self, row: ReputationRow) -> None: ...

    @abstractmethod
    def insert_verdict(self, verdict_id: str, payload_json: str, created_at: str) -> None: ...

    @abstractmethod
    def get_verdict(self, verdict_id: str) -> tuple[str, bool | None] | None:
        """``(payload_json, feedback)`` of a verdict; feedback None until given."""

    @abstractmethod
    def set_verdict_feedback(self, verdict_id: str, correct: bool, at: str) -> None: ...

    @abstractmethod
    def get_team(self, name: str) -> StoredTeam | None: ...

    @abstractmethod
    def list_teams(self) -> list[StoredTeam]:
        """Teams ordered by name."""

    @abstractmethod
    def insert_team(self, team: StoredTeam) -> None: ...

    @abstractmethod
    def update_team(self, team: StoredTeam) -> None:
        """Replace every column of the team called ``team.name``."""

    @abstractmethod
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    base_model TEXT,
    status TEXT NOT NULL,
    manifest_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS experts_status ON experts(status);
CREATE TABLE IF NOT EXISTS expert_files (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    relpath TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (name, version, relpath),
    FOREIGN KEY (name, version) REFERENCES experts(name, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS expert_files_sha ON expert_files(sha256);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    details_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    parent TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reputation (
    expert TEXT PRIMARY KEY,
    alpha REAL NOT NULL,
    beta REAL NOT NULL,
    updated_at TEXT NOT NULL,
    alpha_wrong REAL,
    beta_wrong REAL
);
CREATE TABLE IF NOT EXISTS verdicts (
    id TEXT PRIMARY KEY,
    payload_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    feedback INTEGER,
    feedback_at TEXT
);
CREATE TABLE IF NOT EXISTS teams (
    name TEXT PRIMARY KEY,
    token_salt TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    public_keys_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    rotated_at TEXT,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS catalog (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO catalog (id, generation) VALUES (1, 0);
"""


_ADDED_COLUMNS = {"reputation": ("alpha_wrong REAL", "beta_wrong REAL")}
"""Columns added since schema 1: a file made by an older version gets them on open."""


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, columns in _ADDED_COLUMNS.items():
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column.split()[0] not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


class SQLiteStore(RegistryStore):
    """:class:`RegistryStore` on one SQLite file (WAL, ``BEGIN IMMEDIATE`` writes)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()  # one connection, possibly shared by a server's threads
        self._depth = 0
        # Writers queue on an flock before BEGIN IMMEDIATE: the kernel wakes the next writer as
        # soon as the lock is free, where SQLite's busy handler would poll with growing sleeps.
        self._writer_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._configure(busy_timeout_s)

    def _configure(self, busy_timeout_s: float) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise MoseError(f"{self.path}: SQLite could not switch to WAL mode (got {mode}); use a local disk")
        conn.execute("PRAGMA synchronous = FULL")  # a committed registration survives a power cut
        conn.execute("PRAGMA foreign_keys = ON")
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with self.transaction():
                if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(statement)
                    _add_missing_columns(conn)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fcntl.flock(self._writer_fd, fcntl.LOCK_EX)
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._depth = 1
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
                fcntl.flock(self._writer_fd, fcntl.LOCK_UN)

    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        if not self._depth:
            raise RuntimeError("registry store writes must run inside transaction()")
        return self._conn.execute(sql, params)

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @staticmethod
    def _expert(row: sqlite3.Row) -> StoredExpert:
        return StoredExpert(**{key: row[key] for key in row.keys()})

    def get_expert(self, name: str, version: str) -> StoredExpert | None:
        rows = self._read("SELECT * FROM experts WHERE name = ? AND version = ?", (name, version))
        return self._expert(rows[0]) if rows else None

    def list_experts(self, status: str | None = None, name: str | None = None) -> list[StoredExpert]:
        clauses, params = [], []
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if name is not None:
            clauses.append("name = ?")
            params.append(name)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(f"SELECT * FROM experts {where} ORDER BY name, created_at", tuple(params))
        return [self._expert(row) for row in rows]

    def insert_expert(self, expert: StoredExpert, files: list[StoredFile]) -> None:
        self._write(
            "INSERT INTO experts (name, version, kind, base_model, status, manifest_json, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                expert.name,
                expert.version,
                expert.kind,
                expert.base_model,
                expert.status,
                expert.manifest_json,
                expert.created_at,
                expert.updated_at,
            ),
        )
        self._conn.executemany(
            "INSERT INTO expert_files (name, version, relpath, sha256, size) VALUES (?, ?, ?, ?, ?)",
            [(expert.name, expert.version, f.relpath, f.sha256, f.size) for f in files],
        )
        self.bump_catalog_generation()

    def set_status(self, name: str, version: str, status: str, updated_at: str) -> None:
        self._write(
            "UPDATE experts SET status = ?, updated_at = ? WHERE name = ? AND version = ?",
            (status, updated_at, name, version),
        )
        self.bump_catalog_generation()

    def delete_expert(self, name: str, version: str) -> None:
        self._write("DELETE FROM expert_files WHERE name = ? AND version = ?", (name, version))
        self._write("DELETE FROM experts WHERE name = ? AND version = ?", (name, version))
        self.bump_catalog_generation()

    def catalog_generation(self) -> int:
        return self._read("SELECT generation FROM catalog WHERE id = 1")[0][0]

    def bump_catalog_generation(self) -> int:
        self._write("UPDATE catalog SET generation = generation + 1 WHERE id = 1")
        return self.catalog_generation()

    def expert_files(self, name: str, version: str) -> list[StoredFile]:
        rows = self._read(
            "SELECT relpath, sha256, size FROM expert_files WHERE name = ? AND version = ? ORDER BY relpath",
            (name, version),
        )
        return [StoredFile(row["relpath"], row["sha256"], row["size"]) for row in rows]

    def referenced_blobs(self) -> set[str]:
        return {row[0] for row in self._read("SELECT DISTINCT sha256 FROM expert_files")}

    @staticmethod
    def _audit(row: sqlite3.Row) -> AuditRow:
        return AuditRow(**{key: row[key] for key in row.keys()})

    def last_audit(self) -> AuditRow | None:
        rows = self._read("SELECT * FROM audit_log ORDER BY seq DESC LIMIT 1")
        return self._audit(rows[0]) if rows else None

    def insert_audit(self, row: AuditRow) -> None:
        self._write(
            "INSERT INTO audit_log (seq, ts, actor, action, subject, details_json, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.seq, row.ts, row.actor, row.action, row.subject, row.details_json, row.prev_hash, row.hash),
        )

    def audit_rows(self) -> Iterator[AuditRow]:
        for row in self._read("SELECT * FROM audit_log ORDER BY seq"):
            yield self._audit(row)

    def list_domains(self) -> list[tuple[str, str | None]]:
        return [(row[0], row[1]) for row in self._read("SELECT name, parent FROM domains ORDER BY rowid")]

    def insert_domain(self, name: str, parent: str | None, created_at: str) -> None:
        self._write("INSERT INTO domains (name, parent, created_at) VALUES (?, ?, ?)", (name, parent, created_at))
        self.bump_catalog_generation()

    def domain_count(self) -> int:
        return self._read("SELECT count(*) FROM domains")[0][0]

    def get_reputation(self, expert: str) -> ReputationRow | None:
        rows = self._read("SELECT * FROM reputation WHERE expert = ?", (expert,))
        return ReputationRow(**{key: rows[0][key] for key in rows[0].keys()}) if rows else None

    def put_reputation(self, row: ReputationRow) -> None:
        self._write(
            "INSERT INTO reputation (expert, alpha, beta, updated_at, alpha_wrong, beta_wrong)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(expert) DO UPDATE SET alpha = excluded.alpha,"
            " beta = excluded.beta, updated_at = excluded.updated_at, alpha_wrong = excluded.alpha_wrong,"
            " beta_wrong = excluded.beta_wrong",
            (row.expert, row.alpha, row.beta, row.updated_at, row.alpha_wrong, row.beta_wrong),
        )

    def insert_verdict(self, verdict_id: str, payload_json: str, created_at: str) -> None:
        self._write(
            "INSERT INTO verdicts (id, payload_json, created_at) VALUES (?, ?, ?)",
            (verdict_id, payload_json, created_at),
        )

    def get_verdict(self, verdict_id: str) -> tuple[str, bool | None] | None:
        rows = self._read("SELECT payload_json, feedback FROM verdicts WHERE id = ?", (verdict_id,))
        if not rows:
            return None
        feedback = rows[0]["feedback"]
        return rows[0]["payload_json"], (None if feedback is None else bool(feedback))

    def set_verdict_feedback(self, verdict_id: str, correct: bool, at: str) -> None:
        self._write("UPDATE verdicts SET feedback = ?, feedback_at = ? WHERE id = ?", (int(correct), at, verdict_id))

    @staticmethod
    def _team(row: sqlite3.Row) -> StoredTeam:
        return StoredTeam(**{key: row[key] for key in row.keys()})

    def get_team(self, name: str) -> StoredTeam | None:
        rows = self._read("SELECT * FROM teams WHERE name = ?", (name,))
        return self._team(rows[0]) if rows else None

    def list_teams(self) -> list[StoredTeam]:
        return [self._team(row) for row in self._read("SELECT * FROM teams ORDER BY name")]

    def insert_team(self, team: StoredTeam) -> None:
        self._write(
            "INSERT INTO teams (name, token_salt, token_hash, public_keys_json, created_at, rotated_at, revoked_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                team.name,
                team.token_salt,
                team.token_hash,
                team.public_keys_json,
                team.created_at,
                team.rotated_at,
                team.revoked_at,
            ),
        )

    def update_team(self, team: StoredTeam) -> None:
        self._write(
            "UPDATE teams SET token_salt = ?, token_hash = ?, public_keys_json = ?, created_at = ?, rotated_at = ?,"
            " revoked_at = ? WHERE name = ?",
            (
                team.token_salt,
                team.token_hash,
                team.public_keys_json,
                team.created_at,
                team.rotated_at,
                team.revoked_at,
                team.name,
            ),
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            os.close(self._writer_fd)
