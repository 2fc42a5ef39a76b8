"""The learned router's deployment."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve

from registry.errors import MoseError
from registry.home import MoseHome
from router_model.runtime import RouteDecision
from serve.catalog_sync import CATALOG_POLL_S
from serve.deployments._common import logger, open_registry


class RouterDeployment:
    """The router: ONNX Runtime session, reloaded when a new router version is published.

    Every :data:`~serve.catalog_sync.CATALOG_POLL_S` seconds while it routes, it polls the
    registry's catalog generation (re-reading its expert mapping when it moved) and the router
    pointer. A new version is loaded in a worker thread while the old one keeps routing. Router
    training never runs here (ONNX Runtime only): activations teach the router where they run
    (:mod:`serve.activation`). Each decision carries the catalog generation of the mapping that
    chose its expert.

    A missing or corrupted router artifact does not stop the server: every query then goes to
    the fallback (the base model) and ``status`` reports why.
    """

    def __init__(self, home_root: str) -> None:
        self.home = MoseHome.from_env(home_root)
        self.registry = open_registry(home_root)
        self._polled_at = float("-inf")
        self._generation = -1
        self._reloading: asyncio.Task | None = None
        self._install(self._load())

    def _pointer(self) -> str | None:
        pointer = self.home.router_dir / "current"
        return pointer.read_text().strip() if pointer.is_file() else None

    def _load(self) -> tuple[Any, str | None, str | None]:
        """(router, the pointer it was loaded from, error); blocking."""
        from router_model.runtime import FallbackRouter, load_router

        pointer = self._pointer()
        try:
            # One ONNX Runtime thread: routing one query takes ~2 ms, and a second thread would
            # spin-wait between queries on the cores the expert pool decodes on.
            return load_router(self.home, self.registry, strict=True, threads=1), pointer, None
        except MoseError as exc:
            logger.warning("router unavailable, answering with the fallback: %s", exc)
            return FallbackRouter(), pointer, str(exc)

    def _install(self, loaded: tuple[Any, str | None, str | None]) -> None:
        self.router, self._loaded_pointer, self.error = loaded

    def _follow(self) -> None:
        """Poll the catalog generation and the router pointer (at most every CATALOG_POLL_S)."""
        if time.monotonic() - self._polled_at < CATALOG_POLL_S:
            return
        self._polled_at = time.monotonic()
        generation = self.registry.catalog_generation()
        if generation != self._generation:
            self._generation = generation
            experts = getattr(self.router, "experts", None)
            if experts is not None:
                experts.refresh(force=True)
        if self._reloading is None and self._pointer() != self._loaded_pointer:
            self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            self._install(await asyncio.to_thread(self._load))
        finally:
            self._reloading = None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def route(self, queries: list[str]) -> list[RouteDecision]:
        self._follow()
        return self.router.route_batch(queries)

    async def sync(self) -> dict[str, Any]:
        """Catch up now (the ingress calls it after an activation published a router version):
        the expert mapping at the registry's generation, and the current router version loaded."""
        self._polled_at = float("-inf")
        self._follow()
        if (reloading := self._reloading) is not None:
            await asyncio.shield(reloading)
        return self.status()

    def status(self) -> dict[str, Any]:
        version = getattr(self.router, "version", None)
        provider = getattr(self.router, "provider", None)
        experts = getattr(self.router, "experts", None)
        return {
            "version": version,
            "provider": provider,
            "fallback_only": self.error is not None,
            "error": self.error,
            "catalog_generation": getattr(experts, "generation", None),
        }
