"""The registry service: register experts, move them through their statuses, answer look-ups.

:class:`Registry` ties the parts together: manifest validation, the taxonomy, signatures,
file safety and digests, the artifact store, the SQLite store and the audit log. Each change
and its audit entry commit in one transaction; blobs are copied (atomically) *before* that
transaction, so a crash at any point leaves the whole expert or nothing visible.

Statuses: ``pending`` (registered, not yet served) -> ``active`` (served; at most one version
per name) -> ``retired``; ``quarantined`` takes an expert out of service pending review.

Every write takes an ``actor``: a plain string is an operator action under that name; a
:class:`~registry.teams.Principal` of a team may only register and retire the experts it owns
(see :mod:`registry.teams`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from registry.artifacts import ArtifactStore, sha256_file
from registry.audit import AuditEntry, AuditReport, append_entry, verify_chain
from registry.blobs import SharedBlobs, fetch_missing, upload
from registry.errors import (
    AccessDeniedError,
    ArtifactError,
    ConflictError,
    ManifestError,
    NotFoundError,
    StatusError,
)
from registry.home import MoseHome
from registry.manifest import VERSION_PATTERN, ExpertManifest, check_layout, load_manifest
from registry.safety import check_expert_file
from registry.settings import RegistrySettings
from registry.signing import normalise_public_key, verify_manifest, verify_owned_manifest
from registry.store import RegistryStore, ReputationRow, StoredExpert, StoredFile, StoredTeam, utc_now
from registry.stores import open_store
from registry.taxonomy import Taxonomy
from registry.teams import (
    OPERATOR,
    Principal,
    Team,
    as_principal,
    check_team_name,
    hash_token,
    new_salt,
    new_token,
    team_of_token,
    token_matches,
)

Status = Literal["pending", "active", "quarantined", "retired"]
STATUSES: tuple[str, ...] = ("pending", "active", "quarantined", "retired")
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"active", "quarantined", "retired"}),
    "active": frozenset({"retired", "quarantined"}),
    "quarantined": frozenset({"active", "retired"}),
    "retired": frozenset({"active"}),
}
_ACTION_FOR_STATUS = {"active": "activate", "retired": "retire", "quarantined": "quarantine"}


class ExpertRecord(BaseModel):
    """One registered ``name@version`` and where it stands."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    name: str
    """Expert name."""
    version: str
    """Expert version."""
    kind: Literal["lora", "full"]
    """``lora`` adapter or ``full`` model."""
    base_model: str | None
    """Base model id of a LoRA adapter."""
    status: Status
    """``pending``, ``active``, ``quarantined`` or ``retired``."""
    domains: list[str]
    """Taxonomy domains the expert serves."""
    manifest: ExpertManifest
    """The manifest as registered."""
    created_at: datetime
    """When it was registered (UTC)."""
    updated_at: datetime
    """Last status change (UTC)."""

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @classmethod
    def from_stored(cls, row: StoredExpert) -> ExpertRecord:
        manifest = ExpertManifest.model_validate_json(row.manifest_json)
        return cls(
            name=row.name,
            version=row.version,
            kind=row.kind,
            base_model=row.base_model,
            status=row.status,
            domains=list(manifest.domains),
            manifest=manifest,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class FileCheck(BaseModel):
    """Result of re-hashing an expert's stored blobs (``mose expert verify``)."""

    ref: str
    """``name@version`` checked."""
    ok: bool
    """True when every blob is present and matches its digest."""
    files: int
    """Number of files checked."""
    problems: list[str]
    """One line per missing or corrupted file."""


class Reputation(BaseModel):
    """Two-coin belief in an expert's votes (Dawid & Skene): how often it said "correct" about
    answers that were correct, Beta(``alpha``, ``beta``), and "wrong" about answers that were
    wrong, Beta(``alpha_wrong``, ``beta_wrong``). Kept apart so that a juror who always says the
    same thing scores 0.5 however many of the answers it sees are right."""

    expert: str
    """Expert name."""
    alpha: float
    """Prior + successes on answers that turned out correct."""
    beta: float
    """Prior + failures on answers that turned out correct."""
    alpha_wrong: float
    """Prior + successes on answers that turned out wrong."""
    beta_wrong: float
    """Prior + failures on answers that turned out wrong."""
    updated_at: str | None = None
    """Last update (UTC), None while only the prior is known."""

    @property
    def sensitivity(self) -> float:
        """Expected share of correct answers it calls correct."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def specificity(self) -> float:
        """Expected share of wrong answers it calls wrong."""
        return self.alpha_wrong / (self.alpha_wrong + self.beta_wrong)

    @property
    def mean(self) -> float:
        """Expected balanced accuracy: 0.5 for a coin or a constant, 1 for a perfect judge."""
        return (self.sensitivity + self.specificity) / 2


def version_key(version: str) -> tuple:
    """Semantic-version ordering: numeric parts, then a release above its pre-releases."""
    match = re.match(VERSION_PATTERN, version)
    if not match:
        return (0, 0, 0, 0, ((1, version),))
    major, minor, patch, pre = match.groups()
    pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre_key)


_DUMMY_SALT = "00" * 16
_DUMMY_HASH = hash_token("", _DUMMY_SALT)


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def _oms_verified(oms_check: dict[str, Any] | None) -> bool:
    """A verified OMS bundle is the expert's signature: an ed25519 one is then optional."""
    return oms_check is not None and oms_check.get("status") == "verified"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name@version`` or ``name`` -> ``(name, version or None)``."""
    name, _, version = ref.partition("@")
    return name, (version or None)


class Registry:
    """The expert registry on one mose home (see :mod:`registry` for the contract)."""

    def __init__(self, home: MoseHome, store: RegistryStore, settings: RegistrySettings) -> None:
        self.home = home
        self.store = store
        self.settings = settings
        delay = settings.copy_chunk_delay_s
        self._chunk_hook = functools.partial(time.sleep, delay) if delay else None
        self.artifacts = ArtifactStore(home.artifacts_dir, self._chunk_hook)
        # A database store keeps every blob too; this home's artifacts are then this node's cache.
        self.shared_blobs = store if isinstance(store, SharedBlobs) else None
        self._taxonomy: tuple[int, Taxonomy] | None = None  # (added-domain count, taxonomy)

    @classmethod
    def open(
        cls, home: MoseHome | str | Path | None = None, settings: RegistrySettings | None = None, url: str | None = None
    ) -> Registry:
        """Open (creating if needed) the registry of ``home`` (default: ``$MOSE_HOME`` or ``./.mose``);
        its records live where ``url`` or ``$MOSE_REGISTRY_URL`` says (default: SQLite in the home,
        see :mod:`registry.stores`)."""
        home = home if isinstance(home, MoseHome) else MoseHome.from_env(home)
        settings = settings if settings is not None else RegistrySettings.load(home)
        return cls(home, open_store(home, url), settings)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- taxonomy
    @property
    def taxonomy(self) -> Taxonomy:
        """Default verticals and sub-domains plus the domains added to this registry (by any process)."""
        added = self.store.domain_count()
        if self._taxonomy is None or self._taxonomy[0] != added:
            self._taxonomy = (added, Taxonomy.default(extra=self.store.list_domains()))
        return self._taxonomy[1]

    def refresh_taxonomy(self) -> Taxonomy:
        """Re-read the added domains now."""
        self._taxonomy = None
        return self.taxonomy

    def add_domain(self, name: str, parent: str | None = None, actor: str = "cli") -> Taxonomy:
        """Add a domain to the taxonomy (persisted and audited); same name and parent again is a no-op."""
        with self.store.transaction():
            taxonomy = self.refresh_taxonomy()
            if name in taxonomy and taxonomy.parent(name) == parent:
                return taxonomy
            taxonomy.add(name, parent=parent)
            self.store.insert_domain(name, parent, utc_now())
            append_entry(self.store, "add-domain", name, {"parent": parent}, actor)
        return self.taxonomy

    # ------------------------------------------------------------- registration
    def add(
        self,
        manifest_or_path: ExpertManifest | str | Path,
        files_dir: str | Path | None = None,
        actor: str | Principal = "cli",
        bundle: str | Path | None = None,
    ) -> ExpertRecord:
        """Register an expert as ``pending``; the same ``name@version`` with the same files is a no-op.

        ``bundle``: an OMS bundle of the files folder (default: its ``model.sig``, when present),
        checked with the owner's P-256 keys (:meth:`_verify_oms`); a verified bundle stands in for
        the manifest's ed25519 signature when signatures are required.

        Raises :class:`ManifestError` (manifest or domain), :class:`SignatureError`,
        :class:`ArtifactError` (unsafe file, digest mismatch), :class:`ConflictError`
        (``name@version`` already registered with other files) or :class:`AccessDeniedError`
        (a team registering an expert it does not own).
        """
        who = as_principal(actor)
        manifest, source, folder = self._resolve_input(manifest_or_path, files_dir)
        if who.team is not None:
            self._check_team_may_publish(who.team, manifest)
        self.refresh_taxonomy().require_known(manifest.domains, source)
        oms_check = self._verify_oms(manifest, folder, bundle)
        signature = self._verify_signature(manifest, self.settings.require_signatures and not _oms_verified(oms_check))
        files = self._check_files(manifest, folder)
        check_layout(manifest, source)
        if (existing := self._existing_same(manifest, files)) is not None:
            return existing
        for stored in files:
            self.artifacts.put_file(folder / stored.relpath, stored.sha256)
        if self.shared_blobs is not None:  # in the database before the record: any node can fetch them
            upload(self.shared_blobs, self.artifacts, [f.sha256 for f in files], self._chunk_hook)
        with self.store.transaction():
            if who.team is not None:  # another team may have taken the name (or the token been revoked) meanwhile
                self._check_team_may_publish(who.team, manifest)
            # Another process may have registered the same version while we copied.
            if (existing := self._existing_same(manifest, files)) is not None:
                return existing
            now = utc_now()
            row = StoredExpert(
                manifest.name,
                manifest.version,
                manifest.kind,
                manifest.base_model,
                "pending",
                manifest.model_dump_json(),
                now,
                now,
            )
            self.store.insert_expert(row, files)
            details = {
                "kind": manifest.kind,
                "base_model": manifest.base_model,
                "domains": list(manifest.domains),
                "owner": manifest.owner,
                "files": dict(sorted(manifest.files.items())),
                "signature": signature,
            }
            if oms_check is not None:
                details["oms"] = oms_check
            append_entry(self.store, "register", manifest.ref, details, who.actor)
        return ExpertRecord.from_stored(row)

    def _verify_oms(self, manifest: ExpertManifest, folder: Path, bundle: str | Path | None) -> dict[str, Any] | None:
        """Check the folder's OMS bundle, if any, with the owner's P-256 keys; its audit details.

        The owner's keys are those of :meth:`team_keys`: a registered team's keys and its entry in
        ``trusted_keys``. A bundle that the owner's keys do not verify is refused, naming the file at
        fault; when the owner is a registered team and the bundle was signed with another team's key,
        the refusal names both teams. With no P-256 key for the owner it is recorded as
        ``untrusted-team``, and refused when signatures are required and the manifest has no ed25519
        signature either.
        """
        from registry import oms
        from registry.errors import SignatureError

        path = Path(bundle) if bundle is not None else folder / oms.BUNDLE_NAME
        if not path.is_file():
            if bundle is None:
                return None
            raise SignatureError(f"{manifest.ref}: OMS bundle {path} not found")
        keys = {label: key for label, key in self._owner_keys(manifest.owner).items() if oms.is_p256_public_key(key)}
        team_owner = self.store.get_team(manifest.owner) is not None
        try:
            verified = oms.verify_folder(folder, path, keys) if keys else None
        except SignatureError as exc:
            if team_owner:
                self._refuse_other_teams_bundle(manifest, folder, path)
            raise SignatureError(f"{manifest.ref}: {exc}") from None
        if verified is None:
            if team_owner:
                self._refuse_other_teams_bundle(manifest, folder, path)
            if self.settings.require_signatures and manifest.signature is None:
                if team_owner:
                    raise SignatureError(
                        f"{manifest.ref}: comes with an OMS bundle ({path.name}) but its owner, team "
                        f"{manifest.owner!r}, has no ECDSA P-256 key registered to check it with; ask the operator "
                        f"to add one (`mose team add-key {manifest.owner} --key {manifest.owner}.p256.pub`)"
                    )
                trusted = ", ".join(sorted(self.settings.trusted_keys)) or "none"
                raise SignatureError(
                    f"{manifest.ref}: comes with an OMS bundle ({path.name}) but its owner {manifest.owner!r} has no "
                    f"trusted key in this registry (trusted teams: {trusted}); ask the operator to add the team's "
                    "P-256 public key to trusted_keys in registry.yaml"
                )
            return {"format": "oms-v1", "status": "untrusted-team", "bundle": path.name}
        try:
            oms.check_covers_expert(verified, folder, manifest)
        except SignatureError as exc:
            raise SignatureError(f"{manifest.ref}: {exc}") from None
        return verified.details()

    def _refuse_other_teams_bundle(self, manifest: ExpertManifest, folder: Path, bundle: Path) -> None:
        """Refuse, naming both teams, a bundle on a registered team's expert that another team's key signed."""
        from registry import oms
        from registry.errors import SignatureError

        all_keys = self.team_keys()
        owners = {oms.p256_fingerprint(key) for key in all_keys.get(manifest.owner, [])} - {None}
        for team, keys in sorted(all_keys.items()):
            others = {f"{team}#{i}": key for i, key in enumerate(keys) if oms.p256_fingerprint(key) not in owners}
            if team != manifest.owner and oms.bundle_signer(folder, bundle, others) is not None:
                raise SignatureError(
                    f"{manifest.ref}: the OMS bundle {bundle.name} has a valid signature made with a key of team "
                    f"{team!r}, and {manifest.ref} is owned by team {manifest.owner!r}; only a key registered to "
                    f"team {manifest.owner!r} may sign its experts"
                )

    def _owner_keys(self, owner: str) -> dict[str, str]:
        """Public keys that may sign for ``owner``, by label (``owner``, ``owner#2``, ...): a team's
        registered keys and its entry in ``trusted_keys`` (:meth:`team_keys`)."""
        keys = self.team_keys().get(owner, [])
        return {owner if i == 0 else f"{owner}#{i + 1}": key for i, key in enumerate(keys)}

    def _verify_signature(self, manifest: ExpertManifest, required: bool) -> str:
        """An owner that is a registered team: only its keys may sign; otherwise ``trusted_keys`` decides."""
        if self.store.get_team(manifest.owner) is None:
            return verify_manifest(manifest, self.settings.trusted_keys, required)
        return verify_owned_manifest(manifest, manifest.owner, self.team_keys(), required)

    def _check_team_may_publish(self, team: str, manifest: ExpertManifest) -> None:
        self._team_in_good_standing(team)
        if manifest.owner != team:
            raise AccessDeniedError(
                f"team {team!r} may only register experts it owns, and {manifest.ref} names owner "
                f"{manifest.owner!r}; set `owner: {team}` in the manifest"
            )
        others = sorted({r.manifest.owner for r in self.list(name=manifest.name)} - {team})
        if others:
            raise AccessDeniedError(
                f"expert {manifest.name!r} is owned by team {others[0]!r} (the owner of its registered versions); "
                f"team {team!r} may not publish versions of it: choose another name"
            )

    def _resolve_input(
        self, manifest_or_path: ExpertManifest | str | Path, files_dir: str | Path | None
    ) -> tuple[ExpertManifest, str, Path]:
        if isinstance(manifest_or_path, ExpertManifest):
            if files_dir is None:
                raise ManifestError("files_dir is needed to register a manifest object (the folder holding its files)")
            manifest, source, folder = manifest_or_path, "manifest", Path(files_dir)
        else:
            path = Path(manifest_or_path)
            manifest, source = load_manifest(path), path.name
            folder = Path(files_dir) if files_dir is not None else path.parent
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: the expert's files folder does not exist")
        return manifest, source, folder

    def _check_files(self, manifest: ExpertManifest, folder: Path) -> list[StoredFile]:
        """Every file safe, inside the folder, and matching its digest; nothing copied yet."""
        root = folder.resolve()
        checked = []
        for relpath, expected in sorted(manifest.files.items()):
            path = folder / relpath
            size = check_expert_file(relpath, path)
            if not path.resolve().is_relative_to(root):
                raise ArtifactError(f"{relpath}: resolves outside the expert folder (through a symbolic link)")
            actual = sha256_file(path)
            if actual != expected:
                raise ArtifactError(
                    f"{relpath}: sha256 mismatch: the manifest says {expected}, the file has {actual}; "
                    "fix the file or put its real digest in the manifest"
                )
            checked.append(StoredFile(relpath, expected, size))
        return checked

    def _existing_same(self, manifest: ExpertManifest, files: list[StoredFile]) -> ExpertRecord | None:
        """The stored record when ``name@version`` exists with these digests; conflict if other digests."""
        row = self.store.get_expert(manifest.name, manifest.version)
        if row is None:
            return None
        stored = {f.relpath: f.sha256 for f in self.store.expert_files(manifest.name, manifest.version)}
        new = {f.relpath: f.sha256 for f in files}
        if stored == new:
            return ExpertRecord.from_stored(row)
        diffs = "; ".join(
            f"{rel}: registered {(stored.get(rel) or 'absent')[:12]}, new {(new.get(rel) or 'absent')[:12]}"
            for rel in sorted(stored.keys() | new.keys())
            if stored.get(rel) != new.get(rel)
        )
        raise ConflictError(
            f"{manifest.ref} is already registered with other files ({diffs}); a registered version never "
            "changes: publish these files under a new version"
        )

    # ------------------------------------------------------------------ look-up
    def list(self, status: str | None = None, domain: str | None = None, name: str | None = None) -> list[ExpertRecord]:
        """Registered experts (every version), by name then registration time; optionally filtered."""
        if status is not None and status not in STATUSES:
            raise StatusError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
        records = [ExpertRecord.from_stored(row) for row in self.store.list_experts(status=status, name=name)]
        if domain is not None:
            records = [r for r in records if domain in r.domains]
        return records

    def get(self, name: str, version: str | None = None) -> ExpertRecord:
        """One version (``version=None``: the highest registered version)."""
        if version is not None:
            row = self.store.get_expert(name, version)
            if row is None:
                known = [r.version for r in self.store.list_experts(name=name)]
                hint = (
                    f"registered versions: {', '.join(sorted(known, key=version_key))}"
                    if known
                    else "see `mose expert list`"
                )
                raise NotFoundError(f"{name}@{version} is not registered ({hint})")
            return ExpertRecord.from_stored(row)
        rows = self.store.list_experts(name=name)
        if not rows:
            raise NotFoundError(f"expert {name!r} is not registered (see `mose expert list`)")
        return ExpertRecord.from_stored(max(rows, key=lambda r: version_key(r.version)))

    def active(self, name: str) -> ExpertRecord | None:
        """The active version of ``name``, if any."""
        rows = self.store.list_experts(status="active", name=name)
        return ExpertRecord.from_stored(rows[0]) if rows else None

    def blob_paths(self, record: ExpertRecord) -> dict[str, Path]:
        """Manifest relative path -> content-addressed blob file (read-only); blobs this node lacks
        are fetched from the registry database first, when it keeps them."""
        self.fetch_blobs(record.manifest.files.values())
        return {rel: self.artifacts.path_for(sha) for rel, sha in sorted(record.manifest.files.items())}

    def verify_files(self, name: str, version: str | None = None) -> FileCheck:
        """Re-hash the stored blobs of one version (default: the highest)."""
        record = self.get(name, version)
        files = self.store.expert_files(record.name, record.version)
        problems = []
        if self.shared_blobs is not None:
            self.fetch_blobs(f.sha256 for f in files)
            problems = [
                f"{f.relpath}: blob {f.sha256} is missing from the registry database"
                for f in files
                if not self.shared_blobs.has_blob(f.sha256)
            ]
        problems += [f"{f.relpath}: {problem}" for f in files if (problem := self.artifacts.verify(f.sha256))]
        return FileCheck(ref=record.ref, ok=not problems, files=len(files), problems=problems)

    # ----------------------------------------------------------------- statuses
    def activate(self, name: str, version: str | None = None, actor: str | Principal = "cli") -> ExpertRecord:
        """Make a version active (default: the highest); the previously active version is retired.
        Operator only."""
        who = as_principal(actor)
        self._operator_only(who, "activating an expert", name)
        with self.store.transaction():
            record = self.get(name, version)
            if record.status == "active":
                return record
            self._check_transition(record, "active")
            for other in self.store.list_experts(status="active", name=name):
                self._set_status(
                    ExpertRecord.from_stored(other), "retired", who.actor, {"reason": f"superseded by {record.ref}"}
                )
            self._set_status(record, "active", who.actor, {})
        return self.get(name, record.version)

    def retire(
        self, name: str, version: str | None = None, actor: str | Principal = "cli", reason: str | None = None
    ) -> ExpertRecord:
        """Take a version out of service for good (default: the active one, else the highest).
        A team may retire the experts it owns."""
        return self._transition(name, version, "retired", as_principal(actor), {"reason": reason} if reason else {})

    def quarantine(self, name: str, version: str | None, reason: str, actor: str | Principal = "cli") -> ExpertRecord:
        """Take a version out of service pending review (default: the active one, else the highest).
        Operator only."""
        who = as_principal(actor)
        self._operator_only(who, "quarantining an expert", name)
        return self._transition(name, version, "quarantined", who, {"reason": reason})

    def remove(self, name: str, version: str, actor: str | Principal = "cli") -> None:
        """Delete a non-active version's record (its blobs go at the next :meth:`gc`). Operator only."""
        who = as_principal(actor)
        self._operator_only(who, "removing an expert's record", name)
        actor = who.actor
        with self.store.transaction():
            record = self.get(name, version)
            if record.status == "active":
                raise StatusError(f"{record.ref} is active; retire it first (`mose expert retire {record.ref}`)")
            self.store.delete_expert(name, version)
            append_entry(
                self.store, "remove", record.ref, {"status": record.status, "files": dict(record.manifest.files)}, actor
            )

    def gc(self, min_age_s: float = 3600.0) -> list[str]:
        """Delete blobs no record refers to and stale temp files, older than ``min_age_s`` (here,
        and in the registry database when it keeps blobs)."""
        removed = self.artifacts.gc(self.store.referenced_blobs(), stale_after_s=min_age_s)
        if self.shared_blobs is not None:
            removed += self.shared_blobs.gc_blobs(min_age_s)
        return removed

    def fetch_blobs(self, digests) -> list[str]:
        """Copy into this home's artifact store the blobs of ``digests`` it lacks, from the registry
        database (verified; none without a database store). Returns those fetched."""
        if self.shared_blobs is None:
            return []
        return fetch_missing(self.shared_blobs, self.artifacts, digests)

    # ------------------------------------------------------------------ catalog
    def catalog_generation(self) -> int:
        """The catalog generation: bumped in the same transaction as every registration, status
        change, removal and added domain, and by :meth:`publish`. One tiny read: servers poll it
        and re-read the active experts only when it moved."""
        return self.store.catalog_generation()

    def active_snapshot(self) -> tuple[int, list[ExpertRecord]]:
        """``(generation, active experts)``: the experts as they were at that generation or later
        (the generation is read first), so a reader that asked for at least ``generation`` has it."""
        generation = self.store.catalog_generation()
        return generation, self.list(status="active")

    def publish(self, action: str, subject: str, details: dict[str, Any], actor: str = "cli") -> int:
        """Bump the catalog generation for a change made outside the registry that servers must
        pick up (a new router version), with its audit entry, in one transaction; returns the
        new generation."""
        with self.store.transaction():
            generation = self.store.bump_catalog_generation()
            append_entry(self.store, action, subject, {**details, "catalog_generation": generation}, actor)
        return generation

    def _transition(
        self, name: str, version: str | None, target: str, who: Principal, details: dict[str, Any]
    ) -> ExpertRecord:
        with self.store.transaction():
            record = self.get(name, version) if version is not None else (self.active(name) or self.get(name))
            if who.team is not None:
                self._team_in_good_standing(who.team)
                if record.manifest.owner != who.team:
                    raise AccessDeniedError(
                        f"{record.ref} is owned by {record.manifest.owner!r}; team {who.team!r} may only change "
                        "the experts it owns"
                    )
            if record.status == target:
                return record
            self._check_transition(record, target)
            self._set_status(record, target, who.actor, details)
        return self.get(name, record.version)

    @staticmethod
    def _operator_only(who: Principal, what: str, subject: str) -> None:
        if who.team is not None:
            raise AccessDeniedError(
                f"{what} is for the registry operator; team {who.team!r} may register, update and retire the "
                f"experts it owns (ask the operator about {subject!r})"
            )

    @staticmethod
    def _check_transition(record: ExpertRecord, target: str) -> None:
        if target not in ALLOWED_TRANSITIONS[record.status]:
            allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[record.status]))
            raise StatusError(f"{record.ref} is {record.status}; it can only become {allowed}")

    def _set_status(self, record: ExpertRecord, target: str, actor: str, details: dict[str, Any]) -> None:
        self.store.set_status(record.name, record.version, target, utc_now())
        append_entry(
            self.store, _ACTION_FOR_STATUS[target], record.ref, {"from": record.status, "to": target, **details}, actor
        )

    # -------------------------------------------------------------------- teams
    def create_team(
        self, name: str, public_keys: list[str] | tuple[str, ...] = (), actor: str | Principal = OPERATOR
    ) -> tuple[Team, str]:
        """Create a team with its public keys (ed25519: PEM or base64; ECDSA P-256: PEM); returns the
        team and its token, which is stored only as a salted hash: the caller must hand it over now."""
        who = as_principal(actor)
        self._operator_only(who, "creating a team", name)
        check_team_name(name)
        keys = _unique(self._normalise_key(key, name) for key in public_keys)
        with self.store.transaction():
            if self.store.get_team(name) is not None:
                raise ConflictError(f"team {name!r} already exists; give it a new token with `mose team rotate {name}`")
            token, salt = new_token(name), new_salt()
            row = StoredTeam(name, salt, hash_token(token, salt), json.dumps(keys), utc_now())
            self.store.insert_team(row)
            append_entry(self.store, "team-create", name, {"public_keys": keys}, who.actor)
        return Team.from_stored(row), token

    def rotate_team_token(self, name: str, actor: str | Principal = OPERATOR) -> tuple[Team, str]:
        """Replace a team's token (the old one stops working at once; a revoked team is reinstated)."""
        who = as_principal(actor)
        self._operator_only(who, "rotating a team's token", name)
        with self.store.transaction():
            current = self._stored_team(name)
            token, salt = new_token(name), new_salt()
            row = StoredTeam(
                name,
                salt,
                hash_token(token, salt),
                current.public_keys_json,
                current.created_at,
                rotated_at=utc_now(),
                revoked_at=None,
            )
            self.store.update_team(row)
            append_entry(self.store, "team-rotate", name, {"reinstated": current.revoked_at is not None}, who.actor)
        return Team.from_stored(row), token

    def revoke_team(self, name: str, actor: str | Principal = OPERATOR, reason: str | None = None) -> Team:
        """Make a team's token stop working (its experts and keys stay); `rotate_team_token` reinstates it."""
        who = as_principal(actor)
        self._operator_only(who, "revoking a team's token", name)
        with self.store.transaction():
            current = self._stored_team(name)
            if current.revoked_at is not None:
                return Team.from_stored(current)
            row = dataclasses.replace(current, revoked_at=utc_now())
            self.store.update_team(row)
            append_entry(self.store, "team-revoke", name, {"reason": reason} if reason else {}, who.actor)
        return Team.from_stored(row)

    def add_team_key(self, name: str, public_key: str, actor: str | Principal = OPERATOR) -> Team:
        """Register another public key that may sign the team's experts: ed25519 (PEM or base64) for
        manifest signatures, ECDSA P-256 (PEM) for OMS bundles."""
        return self._change_team_keys(name, public_key, True, as_principal(actor))

    def remove_team_key(self, name: str, public_key: str, actor: str | Principal = OPERATOR) -> Team:
        """Stop accepting signatures by this key on the team's experts (those registered stay)."""
        return self._change_team_keys(name, public_key, False, as_principal(actor))

    def _change_team_keys(self, name: str, public_key: str, add: bool, who: Principal) -> Team:
        self._operator_only(who, "changing a team's keys", name)
        key = self._normalise_key(public_key, name)
        with self.store.transaction():
            current = self._stored_team(name)
            keys = json.loads(current.public_keys_json)
            if add and key in keys:
                return Team.from_stored(current)
            if not add and key not in keys:
                raise NotFoundError(f"team {name!r} has no key {key}")
            keys = keys + [key] if add else [k for k in keys if k != key]
            row = dataclasses.replace(current, public_keys_json=json.dumps(keys))
            self.store.update_team(row)
            append_entry(self.store, "team-add-key" if add else "team-remove-key", name, {"public_key": key}, who.actor)
        return Team.from_stored(row)

    def teams(self) -> list[Team]:
        """Every team, by name (tokens are never part of it)."""
        return [Team.from_stored(row) for row in self.store.list_teams()]

    def team(self, name: str) -> Team:
        return Team.from_stored(self._stored_team(name))

    def team_keys(self) -> dict[str, list[str]]:
        """Team -> the public keys that may sign its experts: its registered keys, plus its entry in
        ``trusted_keys`` (registry.yaml) if it has one."""
        keys: dict[str, list[str]] = {row.name: json.loads(row.public_keys_json) for row in self.store.list_teams()}
        for team, text in self.settings.trusted_keys.items():
            keys.setdefault(team, []).append(text)
        return keys

    def authenticate_team(self, token: str) -> Team:
        """The team a token belongs to. Raises :class:`AccessDeniedError` for an unknown, wrong,
        rotated or revoked token; the message never contains the token."""
        name = team_of_token(token)
        row = self.store.get_team(name) if name is not None else None
        if row is None:
            token_matches(token, _DUMMY_SALT, _DUMMY_HASH)  # the same work as for a known team
            raise AccessDeniedError(
                "not a valid team token (no such team, or a mistyped token); "
                "team tokens come from `mose team create` or `mose team rotate`"
            )
        if not token_matches(token, row.token_salt, row.token_hash):
            raise AccessDeniedError(
                f"the token is not valid for team {name!r} (a wrong token, or one replaced by "
                "`mose team rotate`); ask the operator for the current one"
            )
        if row.revoked_at is not None:
            raise AccessDeniedError(
                f"the token of team {name!r} was revoked at {row.revoked_at}; ask the operator "
                f"for a new one (`mose team rotate {name}`)"
            )
        return Team.from_stored(row)

    def _stored_team(self, name: str) -> StoredTeam:
        row = self.store.get_team(name)
        if row is None:
            known = ", ".join(row.name for row in self.store.list_teams()) or "none"
            raise NotFoundError(f"no team {name!r} (teams: {known}); create it with `mose team create {name}`")
        return row

    def _team_in_good_standing(self, team: str) -> None:
        row = self.store.get_team(team)
        if row is None or row.revoked_at is not None:
            raise AccessDeniedError(
                f"team {team!r} {'does not exist' if row is None else 'was revoked'}; it may not change the registry"
            )

    @staticmethod
    def _normalise_key(text: str, team: str) -> str:
        """ed25519 keys as base64 of their raw bytes, P-256 keys as PEM (:func:`normalise_public_key`)."""
        return normalise_public_key(text, team)

    # -------------------------------------------------------------------- audit
    def audit_verify(self) -> AuditReport:
        """Recompute the audit chain; the report names the first altered entry."""
        return verify_chain(self.store)

    def append_audit(self, action: str, subject: str, details: dict[str, Any], actor: str) -> AuditEntry:
        """Append an entry for a change made by another component (in its own transaction)."""
        return append_entry(self.store, action, subject, details, actor)

    def audit_entries(self, limit: int | None = None) -> list[AuditEntry]:
        """Audit entries, oldest first (the last ``limit`` when given)."""
        entries = [AuditEntry.from_row(row) for row in self.store.audit_rows()]
        return entries[-limit:] if limit else entries

    def provenance(self, name: str, version: str) -> dict[str, Any]:
        """How ``name@version``'s signatures checked out when it was registered (its ``register``
        audit entry): ``signature`` (the manifest's ed25519 signature: ``verified``, ``unsigned`` or
        ``untrusted-team``) and, when it came with an OMS bundle, ``oms`` (status, key, fingerprint)."""
        ref = f"{name}@{version}"
        for entry in reversed(self.audit_entries()):
            if entry.action == "register" and entry.subject == ref:
                return {key: entry.details[key] for key in ("signature", "oms") if key in entry.details}
        return {}

    # --------------------------------------------------------------- reputation
    def reputation(self, name: str, prior: tuple[float, float] = (1.0, 1.0)) -> Reputation:
        """The expert's reputation (``prior`` for each half until feedback reaches it)."""
        row = self.store.get_reputation(name)
        if row is None:
            return Reputation(expert=name, alpha=prior[0], beta=prior[1], alpha_wrong=prior[0], beta_wrong=prior[1])
        wrong = (row.alpha_wrong, row.beta_wrong) if row.alpha_wrong is not None else prior
        return Reputation(
            expert=row.expert,
            alpha=row.alpha,
            beta=row.beta,
            alpha_wrong=wrong[0],
            beta_wrong=wrong[1],
            updated_at=row.updated_at,
        )

    # --------------------------------------------------------------- verdicts
    def record_verdict(self, verdict_id: str, payload: dict[str, Any]) -> None:
        """Keep a cross-check verdict so feedback on it can update its jurors' reputations."""
        with self.store.transaction():
            self.store.insert_verdict(verdict_id, json.dumps(payload, sort_keys=True), utc_now())

    def verdict(self, verdict_id: str) -> tuple[dict[str, Any], bool | None]:
        """A stored verdict and its feedback (None until given); NotFoundError when unknown."""
        found = self.store.get_verdict(verdict_id)
        if found is None:
            raise NotFoundError(f"no verdict {verdict_id!r}: feedback needs the id of a verdict this server returned")
        return json.loads(found[0]), found[1]

    def record_feedback(
        self,
        verdict_id: str,
        correct: bool,
        updates: dict[str, tuple[float, float]],
        actor: str = "feedback",
        prior: tuple[float, float] = (1.0, 1.0),
    ) -> dict[str, Reputation]:
        """Mark a verdict's outcome once and add each juror's (successes, failures) to the half of
        its reputation for answers like this one (correct or wrong), in one transaction."""
        with self.store.transaction():
            _, given = self.verdict(verdict_id)
            if given is not None:
                raise ConflictError(
                    f"feedback for verdict {verdict_id!r} was already recorded "
                    f"(correct={str(given).lower()}); each verdict counts once"
                )
            self.store.set_verdict_feedback(verdict_id, correct, utc_now())
            reputations = {
                name: self.update_reputation(name, s, f, actor=actor, prior=prior, answer_correct=correct)
                for name, (s, f) in updates.items()
            }
            append_entry(self.store, "feedback", verdict_id, {"correct": correct}, actor)
        return reputations

    def update_reputation(
        self,
        name: str,
        successes: float = 0.0,
        failures: float = 0.0,
        actor: str = "feedback",
        prior: tuple[float, float] = (1.0, 1.0),
        audit: bool = True,
        answer_correct: bool = True,
    ) -> Reputation:
        """Add observed successes/failures atomically (safe against concurrent updaters) to the
        half of the reputation for correct answers (``answer_correct``) or for wrong ones."""
        if successes < 0 or failures < 0:
            raise ValueError("successes and failures must be >= 0")
        with self.store.transaction():
            current = self.reputation(name, prior)
            if answer_correct:
                current = current.model_copy(
                    update={"alpha": current.alpha + successes, "beta": current.beta + failures}
                )
            else:
                current = current.model_copy(
                    update={"alpha_wrong": current.alpha_wrong + successes, "beta_wrong": current.beta_wrong + failures}
                )
            row = ReputationRow(name, current.alpha, current.beta, utc_now(), current.alpha_wrong, current.beta_wrong)
            self.store.put_reputation(row)
            if audit:
                append_entry(
                    self.store,
                    "reputation",
                    name,
                    {
                        "successes": successes,
                        "failures": failures,
                        "answer_correct": answer_correct,
                        "alpha": row.alpha,
                        "beta": row.beta,
                        "alpha_wrong": row.alpha_wrong,
                        "beta_wrong": row.beta_wrong,
                    },
                    actor,
                )
        return current.model_copy(update={"updated_at": row.updated_at})
