"""Artifact blobs shared through the registry, for nodes that share no filesystem.

A store that is also :class:`SharedBlobs` (the PostgreSQL store) keeps every registered blob
itself. Registration uploads each blob once (content-addressed: a blob already there is only
touched); a node that lacks a blob in its own ``MOSE_HOME`` artifact store fetches it by sha256
(:func:`fetch_missing`), verifies the digest while writing, and keeps it there as its cache.
The local store's guarantees hold for fetched blobs: visible only complete and verified.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from registry.artifacts import ArtifactStore
from registry.errors import ArtifactError

logger = logging.getLogger("mose.registry")


class SharedBlobs(ABC):
    """Blobs kept by the registry's database, addressed by sha256."""

    @abstractmethod
    def has_blob(self, sha256: str) -> bool: ...

    @abstractmethod
    def put_blob(self, sha256: str, source: Path, chunk_hook: Callable[[], None] | None = None) -> bool:
        """Store the file ``source`` as blob ``sha256`` in one transaction (refused if it hashes
        otherwise); a blob already stored is only marked as used now. True when uploaded."""

    @abstractmethod
    def read_blob(self, sha256: str) -> Iterator[bytes]:
        """The blob's bytes in chunks (ArtifactError when it is not stored)."""

    @abstractmethod
    def blob_digests(self) -> set[str]:
        """Every stored blob."""

    @abstractmethod
    def gc_blobs(self, stale_after_s: float) -> list[str]:
        """Delete blobs no expert refers to, unused for ``stale_after_s``; return their digests."""


def upload(
    shared: SharedBlobs, artifacts: ArtifactStore, digests: Iterable[str], chunk_hook: Callable[[], None] | None = None
) -> list[str]:
    """Upload these local blobs (already verified in ``artifacts``); returns those uploaded now."""
    return [sha for sha in dict.fromkeys(digests) if shared.put_blob(sha, artifacts.path_for(sha), chunk_hook)]


def fetch_missing(shared: SharedBlobs, artifacts: ArtifactStore, digests: Iterable[str]) -> list[str]:
    """Fetch every blob of ``digests`` that the local store lacks; returns those fetched.

    A blob the database does not hold stays missing (the caller reports it, as for a local
    store); one whose bytes do not hash to their address is refused and stays missing too.
    """
    fetched = []
    for sha in dict.fromkeys(digests):
        if artifacts.has(sha) or not shared.has_blob(sha):
            continue
        try:
            artifacts.put_chunks(
                shared.read_blob(sha),
                sha,
                what=f"blob {sha} from the registry database",
                problem="does not hash to its address",
                hint="its copy in the database is damaged: register the expert again",
            )
        except ArtifactError as exc:
            logger.error("blob %s not fetched: %s", sha, exc)
            continue  # stays missing: the loader quarantines the expert and says which file
        fetched.append(sha)
    return fetched
