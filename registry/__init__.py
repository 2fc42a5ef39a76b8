"""mose expert registry: manifests, provenance checks, content-addressed artifacts, statuses,
domain taxonomy, reputation, teams and a hash-chained audit log, on SQLite (WAL) or PostgreSQL.

Lowest layer of mose: imports nothing from ``experts``, ``router_model`` or ``serve``.
Public names are imported lazily so that ``import registry.errors`` (done by every CLI
command) stays cheap.

    from registry import Registry, MoseHome
    reg = Registry.open(MoseHome.from_env())
    record = reg.add("experts/law/manifest.yaml")      # -> ExpertRecord, status "pending"
    reg.activate(record.name)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Registry": "registry.service",
    "ExpertRecord": "registry.service",
    "FileCheck": "registry.service",
    "Reputation": "registry.service",
    "STATUSES": "registry.service",
    "split_ref": "registry.service",
    "ExpertManifest": "registry.manifest",
    "load_manifest": "registry.manifest",
    "parse_manifest": "registry.manifest",
    "dump_manifest": "registry.manifest",
    "canonical_bytes": "registry.manifest",
    "manifest_json_schema": "registry.manifest",
    "MIN_EXAMPLE_QUERIES": "registry.manifest",
    "Taxonomy": "registry.taxonomy",
    "DEFAULT_TAXONOMY": "registry.taxonomy",
    "MoseHome": "registry.home",
    "AuditReport": "registry.audit",
    "AuditEntry": "registry.audit",
    "RegistrySettings": "registry.settings",
    "RegistryStore": "registry.store",
    "SQLiteStore": "registry.store",
    "ArtifactStore": "registry.artifacts",
    "MoseError": "registry.errors",
    "ManifestError": "registry.errors",
    "ArtifactError": "registry.errors",
    "SignatureError": "registry.errors",
    "NotFoundError": "registry.errors",
    "ConflictError": "registry.errors",
    "StatusError": "registry.errors",
    "AccessDeniedError": "registry.errors",
    "Team": "registry.teams",
    "Principal": "registry.teams",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from registry.artifacts import ArtifactStore
    from registry.audit import AuditEntry, AuditReport
    from registry.errors import (
        AccessDeniedError,
        ArtifactError,
        ConflictError,
        ManifestError,
        MoseError,
        NotFoundError,
        SignatureError,
        StatusError,
    )
    from registry.home import MoseHome
    from registry.manifest import (
        MIN_EXAMPLE_QUERIES,
        ExpertManifest,
        canonical_bytes,
        dump_manifest,
        load_manifest,
        manifest_json_schema,
        parse_manifest,
    )
    from registry.service import STATUSES, ExpertRecord, FileCheck, Registry, Reputation, split_ref
    from registry.settings import RegistrySettings
    from registry.store import RegistryStore, SQLiteStore
    from registry.taxonomy import DEFAULT_TAXONOMY, Taxonomy
    from registry.teams import Principal, Team


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
