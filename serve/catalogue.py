"""What the catalogue pages (``/ui``) show, read from the registry and the ingress's own metrics.

Read-only: nothing here writes to the registry. The figures and where they come from:

* **reputation**: the expert's expected balanced accuracy as a juror (``Reputation.mean`` with the
  jury's prior; 0.5 is a coin), from the registry's reputation table;
* **verdict agreement**: the share of its juror votes that matched the feedback given on a
  verdict, summed over the audit log's ``reputation`` entries (None before any feedback);
* **signature**: who signed the manifest and in which format, and what the registry found when it
  registered it (the ``signature`` fact of the ``register`` audit entry);
* **share of routed traffic**: its share of the routing decisions this ingress replica made since
  it started (:meth:`serve.metrics.IngressMetrics.routed_counts`);
* **flag rate**: flagged cross-check verdicts over all verdicts of this replica since it started.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jury.jury import JuryConfig
from registry.audit import AuditEntry
from registry.service import ExpertRecord, Registry, split_ref, version_key
from registry.store import StoredFile
from serve.metrics import IngressMetrics, RoutedDecision

HISTORY_KEPT = 200
"""Audit entries kept in memory per expert name (newest); the page says how many there are in all."""


@dataclass(frozen=True)
class SignatureInfo:
    """Who signed a manifest, in which format, and the registry's finding at registration."""

    signer: str | None
    """The signing team, None when unsigned."""
    format: str | None
    """Signature format, e.g. ``mose-ed25519``."""
    status: str
    """``verified``, ``unsigned``, ``untrusted-team`` (as recorded at registration) or ``unknown``."""


@dataclass(frozen=True)
class ExpertRow:
    """One registered ``name@version`` as the catalogue lists it."""

    record: ExpertRecord
    signature: SignatureInfo
    reputation: float
    """Expected balanced accuracy as a juror (0.5 with no feedback)."""
    agreement: float | None
    """Share of its juror votes that matched feedback; None before any feedback."""
    votes: int
    """Juror votes that got feedback."""
    traffic_share: float | None
    """Share of this replica's routing decisions (by name, any version); None before any decision."""

    @property
    def manifest(self) -> Any:
        return self.record.manifest


@dataclass(frozen=True)
class ExpertPage:
    """Everything the page of one expert version shows."""

    row: ExpertRow
    files: list[StoredFile]
    history: list[AuditEntry]
    """Newest first, at most :data:`HISTORY_KEPT`."""
    history_total: int
    versions: list[tuple[str, str]]
    """(version, status) of every registered version of the name, newest first."""
    manifest_json: str
    """The manifest as registered, pretty-printed JSON."""


@dataclass(frozen=True)
class LivePanel:
    """This ingress replica's own figures since it started."""

    recent: list[RoutedDecision]
    """Newest first."""
    routed: int
    abstained_recent: int
    flagged: int
    crosschecks: int

    @property
    def flag_rate(self) -> float | None:
        return self.flagged / self.crosschecks if self.crosschecks else None


@dataclass
class _AuditFacts:
    """Per-expert facts folded from the audit log."""

    seq: int = 0
    signatures: dict[str, Any] = field(default_factory=dict)
    votes: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    history: dict[str, deque] = field(default_factory=lambda: defaultdict(lambda: deque(maxlen=HISTORY_KEPT)))
    totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def expert_of(entry: AuditEntry) -> str | None:
    """The expert name an audit entry is about: subjects ``name@version``, and ``name`` for
    reputation updates; None for other entries (domains, verdict feedback, ...)."""
    if "@" in entry.subject:
        return split_ref(entry.subject)[0]
    return entry.subject if entry.action == "reputation" else None


class Catalogue:
    """Read-only views of one registry for the catalogue pages; safe to share between threads."""

    def __init__(self, registry: Registry, prior: tuple[float, float] | None = None) -> None:
        self.registry = registry
        self.prior = prior if prior is not None else JuryConfig().reputation_prior
        self._facts = _AuditFacts()
        self._lock = threading.Lock()

    def rows(self, routed: dict[str, int]) -> list[ExpertRow]:
        """Every registered version: by name, newest version first."""
        records = sorted(self.registry.list(), key=lambda r: version_key(r.version), reverse=True)
        records.sort(key=lambda r: r.name)
        with self._lock:
            facts = self._refresh()
            return [self._row(record, facts, routed) for record in records]

    def page(self, name: str, version: str | None, routed: dict[str, int]) -> ExpertPage:
        """One version (default: the active one, else the highest); NotFoundError when unknown."""
        record = (
            self.registry.get(name, version)
            if version is not None
            else self.registry.active(name) or self.registry.get(name)
        )
        versions = sorted(self.registry.list(name=name), key=lambda r: version_key(r.version), reverse=True)
        manifest = record.manifest.model_dump(mode="json", exclude_none=True)
        with self._lock:
            facts = self._refresh()
            return ExpertPage(
                row=self._row(record, facts, routed),
                files=self.registry.store.expert_files(record.name, record.version),
                history=list(reversed(facts.history.get(name, ()))),
                history_total=facts.totals.get(name, 0),
                versions=[(r.version, r.status) for r in versions],
                manifest_json=json.dumps(manifest, indent=2, ensure_ascii=False),
            )

    def _row(self, record: ExpertRecord, facts: _AuditFacts, routed: dict[str, int]) -> ExpertRow:
        agreed, votes = facts.votes.get(record.name, (0.0, 0.0))
        total_routed = sum(routed.values())
        return ExpertRow(
            record=record,
            signature=signature_info(record, facts.signatures.get(record.ref)),
            reputation=self.registry.reputation(record.name, prior=self.prior).mean,
            agreement=agreed / votes if votes else None,
            votes=round(votes),
            traffic_share=routed.get(record.name, 0) / total_routed if total_routed else None,
        )

    def _refresh(self) -> _AuditFacts:
        """Fold in the audit entries appended since the last call (only those are parsed); the
        caller holds the lock."""
        facts = self._facts
        last = self.registry.store.last_audit()
        if last is None or last.seq <= facts.seq:
            return facts
        for row in self.registry.store.audit_rows():
            if facts.seq < row.seq <= last.seq:
                _fold(facts, AuditEntry.from_row(row))
        facts.seq = last.seq
        return facts


def _fold(facts: _AuditFacts, entry: AuditEntry) -> None:
    name = expert_of(entry)
    if name is None:
        return
    facts.history[name].append(entry)
    facts.totals[name] += 1
    if entry.action == "register":
        facts.signatures[entry.subject] = entry.details.get("oms") or entry.details.get("signature")
    elif entry.action == "reputation":
        successes, failures = (float(entry.details.get(k) or 0.0) for k in ("successes", "failures"))
        facts.votes[name][0] += successes
        facts.votes[name][1] += successes + failures


def signature_info(record: ExpertRecord, registered: Any) -> SignatureInfo:
    """The signature of a version as the registry found it at registration. ``registered`` is the
    ``register`` audit entry's fact: a status string for the manifest's own (mose ed25519)
    signature, or a mapping with ``format``, ``status`` and the label of the key that verified it
    (an OMS bundle); None when the entry is not known."""
    signature = record.manifest.signature
    if isinstance(registered, dict):
        signer = registered.get("key") or registered.get("team") or (signature.team if signature else None)
        return SignatureInfo(
            signer=str(signer) if signer else None,
            format=str(registered.get("format") or "unknown"),
            status=str(registered.get("status") or "unknown"),
        )
    status = str(registered or ("unsigned" if signature is None else "unknown"))
    if signature is None:
        return SignatureInfo(signer=None, format=None, status=status)
    return SignatureInfo(signer=signature.team, format=f"mose-{signature.algorithm}", status=status)


def live_panel(metrics: IngressMetrics) -> LivePanel:
    """Recent routing decisions and the flag rate, from this replica's metrics."""
    recent = list(reversed(metrics.recent))
    flagged, crosschecks = metrics.crosscheck_counts()
    return LivePanel(
        recent=recent,
        routed=sum(metrics.routed_counts().values()),
        abstained_recent=sum(d.abstained for d in recent),
        flagged=flagged,
        crosschecks=crosschecks,
    )


def utc_time(seconds: float) -> str:
    """``time.time()`` -> ``YYYY-MM-DD HH:MM:SS`` UTC."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
