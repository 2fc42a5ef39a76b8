"""One activation, whichever entry point asks for it.

``mose expert activate``, ``POST /v1/experts/{name}/activate`` (and an HTTP registration with
``activate: true``) and ``mose expert finetune --register`` call :func:`activate`; ``mose up``
calls its last two steps, :func:`teach_router`, once the demo build has activated its experts.

1. **Activate**: the registry makes the version active (retiring the version it supersedes)
   and bumps the catalog generation in the same transaction, so every server replica that
   answers at that generation or later serves the expert.
2. **Teach the router** a domain it does not know yet: the incremental update
   (:func:`router_model.update.update_router`: head rows fitted on frozen embeddings, seconds of
   torch) runs here, in the CLI's process or in a worker thread of the ingress, never in the
   Router replica, which runs ONNX Runtime only. It is skipped, without importing torch, when
   the router already knows every active expert's primary domain.
3. **Publish**: the update made the new version current; the catalog generation is bumped again
   (audited as ``router-update``), and the Router replicas load that version at their next poll
   of the generation (the ingress asks its router to load it before it answers).

Router updates are serialised by a lock file in the router folder, across processes, so two
activations at once each add their domain instead of the later one publishing over the earlier.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from registry.errors import MoseError
from registry.teams import Principal, as_principal

logger = logging.getLogger("mose.activation")

ROUTER_LOCK_FILE = ".update.lock"
"""In the router folder: held while a router update runs (``flock``)."""

ROUTER_UPDATE_ACTION = "router-update"
"""The audit action of a published router update (its subject is the new version)."""


@dataclass(frozen=True)
class RouterChange:
    """What :func:`teach_router` did."""

    version: str
    """The live router version afterwards."""
    previous: str
    """The version it started from (equal to ``version`` when nothing was new)."""
    added_domains: list[str] = field(default_factory=list)
    """Domains the router learned (empty: it already knew every active expert's)."""
    example_queries: int = 0
    """Example queries the new head rows were fitted on."""
    seconds: float = 0.0
    """Wall time of the update."""
    catalog_generation: int | None = None
    """The generation the new version was published at (None when nothing was published)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "previous": self.previous,
            "added_domains": list(self.added_domains),
            "example_queries": self.example_queries,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Activation:
    """An activated expert and what the router made of it."""

    record: Any
    """The expert's :class:`registry.ExpertRecord`, now active."""
    catalog_generation: int
    """The registry's catalog generation once every step was done."""
    router: RouterChange | None = None
    """The router step; None when there is no router yet (training one covers every active expert)."""
    router_error: str | None = None
    """Why the router could not learn the expert's domain (the expert is active and servable by
    name all the same; ``mose router update`` retries)."""

    def text(self) -> str:
        """What was done, for the CLI."""
        return f"{self.record.ref} is now {self.record.status}\n  {self.router_text()}"

    def router_text(self) -> str:
        """The router step in words."""
        if self.router_error is not None:
            return f"the router was not updated: {self.router_error}; `mose router update` retries"
        if self.router is None:
            return "no router yet: `mose router train` (or `mose up`) trains one that knows every active expert"
        if self.router.added_domains:
            return (
                f"router {self.router.version} learned {', '.join(self.router.added_domains)} "
                f"(from {self.router.previous}, {self.router.seconds:g} s): routable now"
            )
        return f"router {self.router.version} already routes {self.record.domains[0]}: routable now"

    def router_json(self) -> dict[str, Any] | None:
        """The router step as JSON (``error`` set when it failed)."""
        if self.router_error is not None:
            return {"error": self.router_error}
        return self.router.as_json() if self.router is not None else None


def activate(
    registry: Any, name: str, version: str | None = None, actor: str | Principal = "cli", progress: bool = False
) -> Activation:
    """Activate ``name`` (``version`` or the highest), then teach the router its domain if it
    does not know it yet, then publish the new router version. A failure of the router step
    leaves the expert active and is reported in :attr:`Activation.router_error`; a failure of
    the activation itself raises, as :meth:`registry.Registry.activate` does."""
    record = registry.activate(name, version, actor)
    change, error = None, None
    try:
        change = teach_router(registry.home, registry, actor, progress)
    except Exception as exc:  # the expert is active: report, so the caller can say what to retry
        logger.exception("router update after activating %s failed", record.ref)
        error = str(exc) if isinstance(exc, MoseError) else f"{type(exc).__name__}: {exc}"
    return Activation(record, registry.catalog_generation(), change, error)


def teach_router(
    home: Any, registry: Any, actor: str | Principal = "cli", progress: bool = False
) -> RouterChange | None:
    """Add the router's head rows for active experts' domains it does not know, and publish
    (steps 2 and 3 of :func:`activate`); None when there is no router artifact yet."""
    from router_model.artifact import CURRENT_FILE, current_dir, read_metadata

    if not (home.router_dir / CURRENT_FILE).is_file():
        return None
    with _router_lock(home.router_dir):
        current = read_metadata(current_dir(home.router_dir), verify=False)
        if not _unknown_domains(registry, current.labels):
            return RouterChange(version=current.version, previous=current.version)
        from router_model.update import update_router

        started = time.perf_counter()
        result = update_router(home, registry, progress=progress)
    if not result.added_domains:
        return RouterChange(version=result.version, previous=result.previous)
    generation = registry.publish(
        ROUTER_UPDATE_ACTION,
        result.version,
        {"previous": result.previous, "added_domains": result.added_domains, "example_queries": result.example_queries},
        as_principal(actor).actor,
    )
    return RouterChange(
        version=result.version,
        previous=result.previous,
        added_domains=list(result.added_domains),
        example_queries=result.example_queries,
        seconds=round(time.perf_counter() - started, 1),
        catalog_generation=generation,
    )


def _unknown_domains(registry: Any, labels: list[str]) -> list[str]:
    """Primary domains of active experts that are not router labels (what an update would add)."""
    known = set(labels)
    return sorted({r.domains[0] for r in registry.list(status="active") if r.domains and r.domains[0] not in known})


@contextmanager
def _router_lock(router_dir: Any) -> Iterator[None]:
    """One router update at a time on this router folder, across processes."""
    fd = os.open(router_dir / ROUTER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
