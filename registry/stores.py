"""Which :class:`~registry.store.RegistryStore` a registry uses, chosen by its URL.

``MOSE_REGISTRY_URL`` (or the ``url`` argument) decides:

* unset or empty: SQLite at ``<MOSE_HOME>/registry.db`` (the embedded default, one host);
* ``sqlite:///abs/path.db`` or ``sqlite:relative/path.db``: SQLite at that file;
* ``postgresql://user:password@host:5432/db`` (or ``postgres://``, any libpq URL): the
  PostgreSQL store, for a cluster. Artifact blobs are then kept in the database too, and each
  node caches the ones it needs in its own ``MOSE_HOME`` (no shared filesystem).

With a database registry, a node that serves experts may keep its cache somewhere other than
the application's home: ``MOSE_NODE_HOME`` in that node's environment (:func:`node_home`).
"""

from __future__ import annotations

import os
from pathlib import Path

from registry.errors import MoseError
from registry.home import MoseHome
from registry.store import RegistryStore, SQLiteStore

REGISTRY_URL_ENV = "MOSE_REGISTRY_URL"
NODE_HOME_ENV = "MOSE_NODE_HOME"


def registry_url(url: str | None = None) -> str:
    """The registry URL in force: ``url``, else ``$MOSE_REGISTRY_URL``, else '' (SQLite in the home)."""
    return (url if url is not None else os.environ.get(REGISTRY_URL_ENV, "")).strip()


def describe(url: str | None, home: MoseHome) -> str:
    """Where the records live, in words, with any password hidden."""
    from registry.store_postgres import is_postgres_url, redact_url

    chosen = registry_url(url)
    if chosen and is_postgres_url(chosen):
        return f"PostgreSQL {redact_url(chosen)}"
    return f"SQLite {_sqlite_path(chosen, home)}"


def _sqlite_path(url: str, home: MoseHome) -> Path:
    if not url:
        return home.db_path
    path = url.removeprefix("sqlite:").removeprefix("//")
    return Path(path).expanduser()


def open_store(home: MoseHome, url: str | None = None) -> RegistryStore:
    """The store named by ``url`` / ``$MOSE_REGISTRY_URL`` (SQLite in ``home`` when neither is set)."""
    from registry.store_postgres import is_postgres_url

    chosen = registry_url(url)
    if chosen and is_postgres_url(chosen):
        from registry.store_postgres import PostgresStore

        return PostgresStore(chosen)
    if not chosen or chosen.startswith("sqlite:"):
        path = _sqlite_path(chosen, home)
        path.parent.mkdir(parents=True, exist_ok=True)
        return SQLiteStore(path)
    scheme = chosen.split("://", 1)[0] if "://" in chosen else chosen.split(":", 1)[0]
    raise MoseError(
        f"{REGISTRY_URL_ENV}: unsupported registry URL scheme {scheme!r}; use postgresql://user@host/db "
        "or sqlite:///path/to/registry.db (unset: SQLite in MOSE_HOME)"
    )


def node_home(home_root: str | Path) -> MoseHome:
    """The home an expert-serving replica uses on its node: ``$MOSE_NODE_HOME`` when this node sets
    it and the registry is a database (records and blobs then come from the database, so the
    folder only caches fetched blobs and converted base weights); otherwise ``home_root``, the
    application's home (with SQLite the registry *is* that home)."""
    from registry.store_postgres import is_postgres_url

    local = os.environ.get(NODE_HOME_ENV, "").strip()
    if local and is_postgres_url(registry_url() or "sqlite:"):
        return MoseHome.from_env(local)
    return MoseHome.from_env(home_root)
