"""The registry on a PostgreSQL server, for clusters (``MOSE_REGISTRY_URL=postgresql://...``).

:class:`PostgresStore` implements :class:`~registry.store.RegistryStore` with psycopg 3: one
connection per store (shared by a server's threads under a lock), autocommit reads, and write
transactions that first take one transaction-scoped advisory lock. Every writer of every process
and machine queues on that lock, so the audit chain's "read the last entry, append the next"
is serialised exactly as SQLite's ``BEGIN IMMEDIATE`` serialises it on one host. A writer killed
mid-transaction loses its connection; the server rolls its transaction back and frees the lock.

It is also a :class:`~registry.blobs.SharedBlobs`: artifact blobs live in the database too
(``blobs`` + ``blob_chunks``, 1 MiB per row), each stored whole in one transaction, so a node
with no shared filesystem fetches what it needs by sha256 into its own artifact store.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from registry.artifacts import CHUNK_BYTES
from registry.blobs import SharedBlobs
from registry.errors import ArtifactError, MoseError
from registry.store import (
    AuditRow,
    RegistryStore,
    ReputationRow,
    StoredExpert,
    StoredFile,
    StoredTeam,
    utc_now,
)

SCHEMA_VERSION = 2
"""Version of the Postgres schema below (independent of the SQLite file's ``user_version``);
2 added the catalog generation, which every writer must bump (an older mose would not)."""

WRITE_LOCK = (0x6D6F7365, 0)
"""Advisory lock ``(class, key)`` every registry write transaction takes first ('mose', 0)."""

BLOB_LOCK_CLASS = 0x6D6F7362
"""Advisory lock class of one blob's upload ('mosb', hashtext(sha256))."""

CONNECT_TIMEOUT_S = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mose_schema (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
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
    size BIGINT NOT NULL,
    PRIMARY KEY (name, version, relpath),
    FOREIGN KEY (name, version) REFERENCES experts(name, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS expert_files_sha ON expert_files(sha256);
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    ts TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    details_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS domains (
    id BIGSERIAL UNIQUE,
    name TEXT PRIMARY KEY,
    parent TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reputation (
    expert TEXT PRIMARY KEY,
    alpha DOUBLE PRECISION NOT NULL,
    beta DOUBLE PRECISION NOT NULL,
    updated_at TEXT NOT NULL,
    alpha_wrong DOUBLE PRECISION,
    beta_wrong DOUBLE PRECISION
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
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    chunks INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    touched_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_chunks (
    sha256 TEXT NOT NULL REFERENCES blobs(sha256) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    idx INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (sha256, idx)
);
CREATE TABLE IF NOT EXISTS catalog (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO catalog (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
"""

_EXPERT_COLUMNS = "name, version, kind, base_model, status, manifest_json, created_at, updated_at"
_AUDIT_COLUMNS = "seq, ts, actor, action, subject, details_json, prev_hash, hash"
_REPUTATION_COLUMNS = "expert, alpha, beta, updated_at, alpha_wrong, beta_wrong"
_TEAM_COLUMNS = "name, token_salt, token_hash, public_keys_json, created_at, rotated_at, revoked_at"


def is_postgres_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("postgresql", "postgres")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class PostgresStore(RegistryStore, SharedBlobs):
    """:class:`RegistryStore` (and :class:`SharedBlobs`) on a PostgreSQL database."""

    def __init__(self, url: str, lock_timeout_s: float = 120.0) -> None:
        self.url = url
        self.lock_timeout_s = lock_timeout_s
        self._lock = threading.RLock()  # one connection, possibly shared by a server's threads
        self._depth = 0
        self._conn = self._connect()
        self._migrate()

    # -------------------------------------------------------------- connection
    def _connect(self) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="mose-registry"
            )
            conn.execute(f"SET lock_timeout = '{int(self.lock_timeout_s * 1000)}ms'")
            return conn
        except psycopg.OperationalError as exc:
            raise MoseError(
                f"cannot reach the registry database {redact_url(self.url)}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
            ) from None

    def _live(self) -> Any:
        """The connection, reopened when the server closed it (restart, idle timeout) between calls."""
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _migrate(self) -> None:
        with self.transaction():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._conn.execute(statement)
            row = self._conn.execute("SELECT version FROM mose_schema WHERE id = 1").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO mose_schema (id, version) VALUES (1, %s)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise MoseError(
                    f"the registry database {redact_url(self.url)} has schema {row[0]}, newer "
                    f"than this mose understands ({SCHEMA_VERSION}): upgrade mose"
                )
            elif row[0] < SCHEMA_VERSION:  # the tables above were added: an older mose now refuses it
                self._conn.execute("UPDATE mose_schema SET version = %s WHERE id = 1", (SCHEMA_VERSION,))

    @contextmanager
    def _locked_transaction(self, lock: tuple[int, Any], lock_sql: str = "%s::int4") -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            import psycopg

            conn = self._live()
            try:
                conn.execute("BEGIN")
            except psycopg.OperationalError:
                if not (conn.closed or conn.broken):
                    raise
                conn = self._live()  # dropped since the last call: nothing was done yet, begin anew
                conn.execute("BEGIN")
            try:
                self._depth = 1
                try:
                    conn.execute(f"SELECT pg_advisory_xact_lock(%s::int4, {lock_sql})", lock)
                except psycopg.errors.LockNotAvailable:
                    raise MoseError(
                        f"the registry database is busy: another writer held its lock for over "
                        f"{self.lock_timeout_s:g} s; retry, or look for a stuck `mose` process"
                    ) from None
                yield
                conn.execute("COMMIT")
            except BaseException:
                if not conn.closed and not conn.broken:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    def transaction(self) -> Iterator[None]:
        """A write transaction holding the registry-wide advisory lock (one writer at a time)."""
        return self._locked_transaction(WRITE_LOCK)

    def _write(self, sql: str, params: tuple = ()) -> Any:
        if not self._depth:
            raise RuntimeError("registry store writes must run inside transaction()")
        return self._conn.execute(sql, params)

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with self._lock:
            try:
                return self._live().execute(sql, params).fetchall()
            except psycopg.OperationalError:
                if self._depth or not (self._conn.closed or self._conn.broken):
                    raise
            # The connection died between calls: one retry on a new one (reads are idempotent).
            return self._live().execute(sql, params).fetchall()

    # ------------------------------------------------------------------ experts
    def get_expert(self, name: str, version: str) -> StoredExpert | None:
        rows = self._read(f"SELECT {_EXPERT_COLUMNS} FROM experts WHERE name = %s AND version = %s", (name, version))
        return StoredExpert(*rows[0]) if rows else None

    def list_experts(self, status: str | None = None, name: str | None = None) -> list[StoredExpert]:
        clauses, params = [], []
        if status is not None:
            clauses.append("status = %s")
            params.append(status)
        if name is not None:
            clauses.append("name = %s")
            params.append(name)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        # Byte order, as SQLite sorts, whatever the database's collation.
        rows = self._read(
            f'SELECT {_EXPERT_COLUMNS} FROM experts {where} ORDER BY name COLLATE "C", created_at', tuple(params)
        )
        return [StoredExpert(*row) for row in rows]

    def insert_expert(self, expert: StoredExpert, files: list[StoredFile]) -> None:
        self._write(
            f"INSERT INTO experts ({_EXPERT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
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
        with self._conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO expert_files (name, version, relpath, sha256, size) VALUES (%s, %s, %s, %s, %s)",
                [(expert.name, expert.version, f.relpath, f.sha256, f.size) for f in files],
            )
        self.bump_catalog_generation()

    def set_status(self, name: str, version: str, status: str, updated_at: str) -> None:
        self._write(
            "UPDATE experts SET status = %s, updated_at = %s WHERE name = %s AND version = %s",
            (status, updated_at, name, version),
        )
        self.bump_catalog_generation()

    def delete_expert(self, name: str, version: str) -> None:
        self._write("DELETE FROM expert_files WHERE name = %s AND version = %s", (name, version))
        self._write("DELETE FROM experts WHERE name = %s AND version = %s", (name, version))
        self.bump_catalog_generation()

    def catalog_generation(self) -> int:
        return self._read("SELECT generation FROM catalog WHERE id = 1")[0][0]

    def bump_catalog_generation(self) -> int:
        return self._write(
            "UPDATE catalog SET generation = generation + 1 WHERE id = 1 RETURNING generation"
        ).fetchone()[0]

    def expert_files(self, name: str, version: str) -> list[StoredFile]:
        rows = self._read(
            "SELECT relpath, sha256, size FROM expert_files WHERE name = %s AND version = %s"
            ' ORDER BY relpath COLLATE "C"',
            (name, version),
        )
        return [StoredFile(*row) for row in rows]

    def referenced_blobs(self) -> set[str]:
        return {row[0] for row in self._read("SELECT DISTINCT sha256 FROM expert_files")}

    # -------------------------------------------------------------------- audit
    def last_audit(self) -> AuditRow | None:
        rows = self._read(f"SELECT {_AUDIT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1")
        return AuditRow(*rows[0]) if rows else None

    def insert_audit(self, row: AuditRow) -> None:
        self._write(
            f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (row.seq, row.ts, row.actor, row.action, row.subject, row.details_json, row.prev_hash, row.hash),
        )

    def audit_rows(self) -> Iterator[AuditRow]:
        for row in self._read(f"SELECT {_AUDIT_COLUMNS} FROM audit_log ORDER BY seq"):
            yield AuditRow(*row)

    # ------------------------------------------------------------------ domains
    def list_domains(self) -> list[tuple[str, str | None]]:
        return [(row[0], row[1]) for row in self._read("SELECT name, parent FROM domains ORDER BY id")]

    def insert_domain(self, name: str, parent: str | None, created_at: str) -> None:
        self._write("INSERT INTO domains (name, parent, created_at) VALUES (%s, %s, %s)", (name, parent, created_at))
        self.bump_catalog_generation()

    def domain_count(self) -> int:
        return self._read("SELECT count(*) FROM domains")[0][0]

    # --------------------------------------------------------------- reputation
    def get_reputation(self, expert: str) -> ReputationRow | None:
        rows = self._read(f"SELECT {_REPUTATION_COLUMNS} FROM reputation WHERE expert = %s", (expert,))
        return ReputationRow(*rows[0]) if rows else None

    def put_reputation(self, row: ReputationRow) -> None:
        self._write(
            f"INSERT INTO reputation ({_REPUTATION_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (expert) DO UPDATE SET alpha = excluded.alpha, beta = excluded.beta,"
            " updated_at = excluded.updated_at, alpha_wrong = excluded.alpha_wrong, beta_wrong = excluded.beta_wrong",
            (row.expert, row.alpha, row.beta, row.updated_at, row.alpha_wrong, row.beta_wrong),
        )

    # ----------------------------------------------------------------- verdicts
    def insert_verdict(self, verdict_id: str, payload_json: str, created_at: str) -> None:
        self._write(
            "INSERT INTO verdicts (id, payload_json, created_at) VALUES (%s, %s, %s)",
            (verdict_id, payload_json, created_at),
        )

    def get_verdict(self, verdict_id: str) -> tuple[str, bool | None] | None:
        rows = self._read("SELECT payload_json, feedback FROM verdicts WHERE id = %s", (verdict_id,))
        if not rows:
            return None
        payload, feedback = rows[0]
        return payload, (None if feedback is None else bool(feedback))

    def set_verdict_feedback(self, verdict_id: str, correct: bool, at: str) -> None:
        self._write("UPDATE verdicts SET feedback = %s, feedback_at = %s WHERE id = %s", (int(correct), at, verdict_id))

    # -------------------------------------------------------------------- teams
    def get_team(self, name: str) -> StoredTeam | None:
        rows = self._read(f"SELECT {_TEAM_COLUMNS} FROM teams WHERE name = %s", (name,))
        return StoredTeam(*rows[0]) if rows else None

    def list_teams(self) -> list[StoredTeam]:
        return [StoredTeam(*row) for row in self._read(f'SELECT {_TEAM_COLUMNS} FROM teams ORDER BY name COLLATE "C"')]

    def insert_team(self, team: StoredTeam) -> None:
        self._write(
            f"INSERT INTO teams ({_TEAM_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
            "UPDATE teams SET token_salt = %s, token_hash = %s, public_keys_json = %s, created_at = %s,"
            " rotated_at = %s, revoked_at = %s WHERE name = %s",
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

    # -------------------------------------------------------------------- blobs
    def _blob_transaction(self, sha256: str) -> Any:
        """A transaction holding this blob's advisory lock (uploads of other blobs go on in parallel)."""
        return self._locked_transaction((BLOB_LOCK_CLASS, sha256), "hashtext(%s)")

    def has_blob(self, sha256: str) -> bool:
        return bool(self._read("SELECT 1 FROM blobs WHERE sha256 = %s", (sha256,)))

    def put_blob(self, sha256: str, source: Path, chunk_hook: Callable[[], None] | None = None) -> bool:
        with self._blob_transaction(sha256):
            if self._conn.execute("UPDATE blobs SET touched_at = %s WHERE sha256 = %s", (time.time(), sha256)).rowcount:
                return False  # already there (fresh touch: gc leaves it alone)
            digest, size, index = hashlib.sha256(), 0, 0
            with open(source, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    self._conn.execute(
                        "INSERT INTO blob_chunks (sha256, idx, data) VALUES (%s, %s, %s)", (sha256, index, chunk)
                    )
                    index += 1
                    if chunk_hook is not None:
                        chunk_hook()
            if digest.hexdigest() != sha256:
                raise ArtifactError(f"{source}: hashes to {digest.hexdigest()}, not {sha256}; nothing was uploaded")
            self._conn.execute(
                "INSERT INTO blobs (sha256, size, chunks, created_at, touched_at) VALUES (%s, %s, %s, %s, %s)",
                (sha256, size, index, utc_now(), time.time()),
            )
        return True

    def read_blob(self, sha256: str) -> Iterator[bytes]:
        rows = self._read("SELECT chunks FROM blobs WHERE sha256 = %s", (sha256,))
        if not rows:
            raise ArtifactError(f"blob {sha256} is not in the registry database")
        for index in range(rows[0][0]):
            chunk = self._read("SELECT data FROM blob_chunks WHERE sha256 = %s AND idx = %s", (sha256, index))
            if not chunk:
                raise ArtifactError(f"blob {sha256} lost chunk {index} in the registry database while it was read")
            yield bytes(chunk[0][0])

    def blob_digests(self) -> set[str]:
        return {row[0] for row in self._read("SELECT sha256 FROM blobs")}

    def gc_blobs(self, stale_after_s: float) -> list[str]:
        cutoff = time.time() - stale_after_s
        with self.transaction():  # with the write lock: no registration commits in between
            rows = self._write(
                "DELETE FROM blobs WHERE touched_at < %s AND sha256 NOT IN (SELECT sha256 FROM expert_files)"
                " RETURNING sha256",
                (cutoff,),
            ).fetchall()
        return sorted(row[0] for row in rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
