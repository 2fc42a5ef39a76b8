"""A server replica's view of the registry's active experts, kept at the catalog generation.

The registry bumps one integer, the catalog generation, in the same transaction as every
registration, status change, removal and added domain, and when a new router version is
published (:meth:`registry.Registry.catalog_generation`). Each replica that holds a view of the
active experts (the router's expert mapping, the ingress's model list, the pool's loaded
adapters) keeps a :class:`CatalogFollower`: it polls the generation with one tiny query at most
every :data:`CATALOG_POLL_S` seconds and re-reads its view, in a worker thread, only when the
generation moved.

A caller that knows a newer generation than a replica's passes it along, and the replica
catches up before it answers: the router tags each decision with the generation its mapping
was read at, the ingress catches up to it and hands its own generation to the pool with the
request, so an expert the router chose is never unknown to the pool that serves it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

CATALOG_POLL_S = 0.1
"""Longest a replica goes between two polls of the catalog generation while it is serving."""


class CatalogFollower:
    """Keeps one replica's view at the registry's catalog generation.

    ``reload`` re-reads the replica's view (blocking: it may load adapters) and returns the
    generation it read, which it must read *before* the experts (see
    :meth:`registry.Registry.active_snapshot`), so the view is at least that new. Reloads run
    one at a time; :meth:`sync` runs them in a worker thread, so the event loop never waits on
    the registry or on a load.
    """

    def __init__(self, registry: Any, reload: Callable[[], int], poll_s: float = CATALOG_POLL_S) -> None:
        self.registry, self.reload, self.poll_s = registry, reload, poll_s
        self.generation = -1
        """The generation the view was read at (-1 before the first read)."""
        self._polled_at = float("-inf")
        self._lock = threading.Lock()

    def sync_now(self, at_least: int | None = None, force: bool = False) -> int:
        """Blocking: poll the generation and reload when it moved (always with ``force``); with
        ``at_least``, nothing to do once the view is that new. Returns the view's generation."""
        with self._lock:
            if at_least is not None and not force and self.generation >= at_least:
                return self.generation
            self._polled_at = time.monotonic()
            if force or self.registry.catalog_generation() != self.generation:
                self.generation = max(self.generation, self.reload())
            return self.generation

    async def sync(self, at_least: int | None = None, fresh: bool = False) -> int:
        """The view's generation after catching up: at once when the caller knows a newer one
        (``at_least``) or asks for a ``fresh`` poll, else when :data:`CATALOG_POLL_S` passed since
        the last poll; a reload runs in a worker thread."""
        if at_least is not None and self.generation >= at_least:
            return self.generation
        if at_least is None and not fresh:
            if time.monotonic() - self._polled_at < self.poll_s:
                return self.generation
            self._polled_at = time.monotonic()  # one poll per interval, not one per waiting request
        return await asyncio.to_thread(self.sync_now, at_least)
