"""Training rows for the router: labelled JSONL files plus the active experts' example queries.

Splits are deterministic hashes, not random draws, so the same row is always held out:

* ``split_heldout`` keeps ``heldout_fraction`` of every labelled file out of training (by a hash
  of the row id); ``mose router split`` writes those rows to files, and the trainer copies them
  into the artifact, so evaluation on them is reproducible and honest.
* ``split_validation`` takes the validation rows (model choice, temperature, threshold) out of
  the remaining training rows with another salt.

Any training row whose normalised text equals a held-out query is dropped too (duplicated
questions with different ids, or expert example queries copied from the dev set).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from registry.artifacts import atomic_write
from registry.errors import MoseError

REGISTRY_SOURCE = "registry"


class LabelledQuery(BaseModel):
    """One labelled query."""

    query: str = Field(min_length=1)
    """The user query."""
    domain: str = Field(min_length=1)
    """Its domain (a vertical or any taxonomy domain)."""
    source: str = "unknown"
    """Where it comes from (dataset name, or ``registry`` for expert example queries)."""
    id: str = ""
    """Stable id; the held-out split hashes it (the text when empty)."""

    def key(self) -> str:
        """What the splits hash: the id, or the normalised text when the row has none."""
        return self.id or normalise(self.query)


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used to find duplicated queries."""
    return " ".join(text.lower().split())


def load_jsonl(path: str | os.PathLike) -> list[LabelledQuery]:
    """Read labelled rows (``query``, ``domain``, optional ``source`` and ``id``)."""
    path = Path(path)
    if not path.is_file():
        raise MoseError(f"labelled data file {path} not found: pass an existing JSONL file with --data")
    rows: list[LabelledQuery] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                rows.append(
                    LabelledQuery(
                        query=raw["query"],
                        domain=raw["domain"],
                        source=raw.get("source") or "unknown",
                        id=str(raw.get("id") or ""),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise MoseError(
                    f"{path}:{line_no}: not a labelled row ({exc.__class__.__name__}: {exc}); each line must be "
                    'a JSON object with "query" and "domain" (and optionally "source", "id")'
                ) from None
    if not rows:
        raise MoseError(f"{path} has no labelled rows")
    return rows


def write_jsonl(rows: Iterable[LabelledQuery], path: str | os.PathLike) -> str:
    """Write rows atomically (temp file, then rename); returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(row.model_dump(), ensure_ascii=False) + "\n" for row in rows).encode()
    atomic_write(path, payload)
    return hashlib.sha256(payload).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rows_sha256(rows: Sequence[LabelledQuery]) -> str:
    """Digest of a row list (order-sensitive), recorded in the artifact metadata."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row.model_dump(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def hash_fraction(key: str, salt: str) -> float:
    """A stable number in [0, 1) for a row key."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_hash(
    rows: Sequence[LabelledQuery], fraction: float, salt: str
) -> tuple[list[LabelledQuery], list[LabelledQuery]]:
    """(kept, taken): ``taken`` holds about ``fraction`` of the rows, chosen by hash of their key."""
    kept, taken = [], []
    for row in rows:
        (taken if hash_fraction(row.key(), salt) < fraction else kept).append(row)
    return kept, taken


def split_heldout(
    rows: Sequence[LabelledQuery], fraction: float, salt: str
) -> tuple[list[LabelledQuery], list[LabelledQuery]]:
    """(train, heldout) for a labelled file; train rows duplicating a held-out text are dropped."""
    train, heldout = split_by_hash(rows, fraction, salt + "/heldout")
    return drop_overlap(train, heldout), heldout


def split_validation(
    rows: Sequence[LabelledQuery], fraction: float, salt: str
) -> tuple[list[LabelledQuery], list[LabelledQuery]]:
    """(fit, validation) from the training rows, with every label present in ``fit``."""
    fit, validation = split_by_hash(rows, fraction, salt + "/validation")
    fit_labels = {row.domain for row in fit}
    # A label whose few rows all hashed into validation would be unlearnable: give them back.
    moved = [row for row in validation if row.domain not in fit_labels]
    return fit + moved, [row for row in validation if row.domain in fit_labels]


def drop_overlap(rows: Iterable[LabelledQuery], reference: Iterable[LabelledQuery]) -> list[LabelledQuery]:
    """``rows`` minus any row whose normalised text appears in ``reference``."""
    banned = {normalise(row.query) for row in reference}
    return [row for row in rows if normalise(row.query) not in banned]


def dedupe(rows: Iterable[LabelledQuery]) -> list[LabelledQuery]:
    """First occurrence of each (normalised text, domain)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for row in rows:
        key = (normalise(row.query), row.domain)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def cap_per_label(rows: Sequence[LabelledQuery], cap: int | None, salt: str) -> list[LabelledQuery]:
    """At most ``cap`` rows per label, the ones with the smallest hash (deterministic)."""
    if cap is None:
        return list(rows)
    by_label: dict[str, list[LabelledQuery]] = defaultdict(list)
    for row in rows:
        by_label[row.domain].append(row)
    keep: set[int] = set()
    for label_rows in by_label.values():
        ranked = sorted(label_rows, key=lambda r: hash_fraction(r.key(), salt + "/cap"))
        keep.update(id(r) for r in ranked[:cap])
    return [row for row in rows if id(row) in keep]


def registry_rows(registry) -> tuple[list[LabelledQuery], list[str]]:
    """Example queries of the active experts, labelled with each expert's primary (most specific)
    domain; returns (rows, ["name@version", ...])."""
    rows: list[LabelledQuery] = []
    experts: list[str] = []
    for record in registry.list(status="active"):
        experts.append(f"{record.name}@{record.version}")
        domain = record.domains[0]
        for i, query in enumerate(record.manifest.example_queries):
            rows.append(LabelledQuery(query=query, domain=domain, source=REGISTRY_SOURCE, id=f"{record.name}/{i}"))
    return rows, sorted(experts)


class TrainingData(BaseModel):
    """Everything the trainer needs, and what the artifact records about it."""

    train: list[LabelledQuery]
    """Rows the model is fitted on."""
    validation: list[LabelledQuery]
    """Rows for model choice, temperature and threshold (never fitted on)."""
    heldout: list[LabelledQuery]
    """Rows of the labelled files kept out for evaluation."""
    files: dict[str, str] = Field(default_factory=dict)
    """Labelled file path -> sha256."""
    experts: list[str] = Field(default_factory=list)
    """Active experts (name@version) whose example queries were used."""

    @property
    def labels(self) -> list[str]:
        return sorted({row.domain for row in self.train})


def assemble(
    files: Sequence[str | os.PathLike],
    registry=None,
    *,
    heldout_fraction: float,
    validation_fraction: float,
    salt: str,
    max_rows_per_label: int | None = None,
    exclude_domains: Sequence[str] = (),
) -> TrainingData:
    """Build the training, validation and held-out rows from files and the registry."""
    labelled: list[LabelledQuery] = []
    heldout: list[LabelledQuery] = []
    digests: dict[str, str] = {}
    for path in files:
        digests[str(Path(path).resolve())] = file_sha256(path)
        train_part, held_part = split_heldout(load_jsonl(path), heldout_fraction, salt)
        labelled += train_part
        heldout += held_part
    expert_rows, experts = registry_rows(registry) if registry is not None else ([], [])
    rows = dedupe(drop_overlap(labelled + expert_rows, heldout))
    rows = [row for row in rows if row.domain not in set(exclude_domains)]
    rows = cap_per_label(rows, max_rows_per_label, salt)
    if len({row.domain for row in rows}) < 2:
        raise MoseError(
            "the router needs training rows for at least two domains: activate experts with example "
            "queries or pass labelled files with --data (e.g. ../shared/data/routing_dev.jsonl)"
        )
    train, validation = split_validation(rows, validation_fraction, salt)
    return TrainingData(train=train, validation=validation, heldout=heldout, files=digests, experts=experts)
