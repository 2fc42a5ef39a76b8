"""The HTTP front door's deployment: the FastAPI app over handles to the others, and the
registry writes of the admin endpoints."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

from ray import serve

from experts.types import GenerationRequest, GenerationResult
from registry.errors import ArtifactError
from registry.home import MoseHome
from registry.teams import Principal
from router_model.runtime import RouteDecision
from serve.backend import Backend
from serve.catalog_sync import CatalogFollower
from serve.config import ServeConfig
from serve.deployments._common import call_with_retry, logger, open_registry
from serve.metrics import IngressMetrics
from serve.upstream import UpstreamClient


@serve.ingress()
class Ingress(Backend):
    """The HTTP front door: parses, limits, authenticates; routes and generates through handles."""

    def __init__(self, config: ServeConfig, router: Any, pool: Any, full_experts: Any, crosscheck: Any) -> None:
        self.config = config
        self.home_root = str(config.home or MoseHome.from_env().root)
        self.registry = open_registry(self.home_root)
        self.router, self.pool, self.full_experts, self.checker = router, pool, full_experts, crosscheck
        self.upstream = UpstreamClient(config.upstreams)
        self.metrics = IngressMetrics()
        self._catalogue: Any = None
        self._cards: list[dict[str, Any]] = []
        self.catalog = CatalogFollower(self.registry, self._reload_cards)
        if config.auth.admin_mode == "insecure":
            logger.warning("INSECURE: admin endpoints are open without a token (auth.insecure_local)")

    def __serve_build_asgi_app__(self):
        from serve.api import build_api

        return build_api(self.config, self, self.metrics)

    async def route(self, query: str) -> RouteDecision:
        decision = await call_with_retry(self.router.route, query)
        # The router may have read a newer catalog than this replica: catch up, so the pool is
        # asked (at this replica's generation) for an expert it has loaded.
        await self.catalog.sync(decision.catalog_generation)
        self.metrics.observe_decision(decision.expert, decision.domain, decision.confidence, decision.abstained)
        return decision

    def catalogue(self) -> Any:
        """The read-only registry view of the ``/ui`` pages (one per replica)."""
        from serve.catalogue import Catalogue

        if self._catalogue is None:
            self._catalogue = Catalogue(self.registry)
        return self._catalogue

    async def _serving(self, expert: str) -> Any:
        """The handle that serves ``expert``: the multiplexed full-expert deployment, or the pool."""
        if any(card["name"] == expert and card["kind"] == "full" for card in await self.experts()):
            return self.full_experts.options(multiplexed_model_id=expert)
        return self.pool

    def _at_generation(self, handle: Any, request: GenerationRequest) -> tuple[Any, ...]:
        """The call's arguments: the pool also gets this replica's catalog generation, and catches
        up to it before it answers (full experts are looked up in the registry when loaded)."""
        return (request, self.catalog.generation) if handle is self.pool else (request,)

    async def generate(self, request: GenerationRequest) -> tuple[GenerationResult, int]:
        handle = await self._serving(request.expert)
        return await call_with_retry(handle.generate, *self._at_generation(handle, request))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        handle = await self._serving(request.expert)
        responses = handle.options(stream=True).stream.remote(*self._at_generation(handle, request))
        finished = False
        try:
            async for item in responses:
                yield item
            finished = True
        finally:
            if not finished:  # the client went away (or the stream failed): stop the replica's generator
                responses.cancel()

    def _reload_cards(self) -> int:
        generation, records = self.registry.active_snapshot()
        self._cards = [
            {
                "name": r.name,
                "version": r.version,
                "kind": r.kind,
                "domains": r.domains,
                "owner": r.manifest.owner,
                "description": r.manifest.description,
            }
            for r in records
        ]
        return generation

    async def experts(self) -> list[dict[str, Any]]:
        await self.catalog.sync()
        return self._cards

    async def has_expert(self, name: str) -> bool:
        if any(card["name"] == name for card in await self.experts()):
            return True
        await self.catalog.sync(fresh=True)  # activated since the last poll?
        return any(card["name"] == name for card in self._cards)

    async def authenticate_team(self, token: str) -> str:
        return (await asyncio.to_thread(self.registry.authenticate_team, token)).name

    async def register(self, manifest: dict[str, Any], files: dict[str, bytes], actor: Principal) -> dict[str, Any]:
        record = await asyncio.to_thread(_register_upload, self.registry, manifest, files, actor)
        return _record_json(record)

    async def set_status(self, name: str, action: str, actor: Principal, reason: str | None = None) -> dict[str, Any]:
        if action != "activate":
            record = await asyncio.to_thread(_change_status, self.registry, name, action, actor, reason)
            await self.catalog.sync(fresh=True)
            return _record_json(record)
        from serve.activation import activate

        # Activate, teach the router (torch, in a worker thread of this replica: never in the
        # Router replica), publish; then this replica's router loads the new version before the
        # answer (the others at their next poll).
        activation = await asyncio.to_thread(activate, self.registry, name, None, actor)
        if activation.router is not None and activation.router.catalog_generation is not None:
            await call_with_retry(self.router.sync)
        await self.catalog.sync(fresh=True)
        return _record_json(activation.record) | {"router": activation.router_json()}

    async def crosscheck(self, question: str, answer: str, k: int, own_answers: bool) -> Any:
        return await call_with_retry(self.checker.crosscheck, question, answer, k, own_answers)

    async def upstream_chat(
        self, name: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
    ) -> dict[str, Any]:
        model = self.config.upstreams[name].model
        return await self.upstream.chat(name, model, messages, max_tokens, temperature)

    async def feedback(self, verdict_id: str, correct: bool) -> dict[str, float]:
        return await self.checker.feedback.remote(verdict_id, correct, "feedback-api")

    async def health(self) -> dict[str, Any]:
        router, pool, full, checker = await asyncio.gather(
            call_with_retry(self.router.status),
            call_with_retry(self.pool.status),
            call_with_retry(self.full_experts.status),
            call_with_retry(self.checker.status),
        )
        return {"router": router, "expert_pool": pool, "full_experts": full, "crosscheck": checker}


def _record_json(record: Any) -> dict[str, Any]:
    return {
        "name": record.name,
        "version": record.version,
        "status": record.status,
        "kind": record.kind,
        "domains": record.domains,
        "base_model": record.base_model,
    }


def _change_status(registry: Any, name: str, action: str, actor: str | Principal, reason: str | None):
    """``activate`` (:func:`serve.activation.activate`: the router learns the expert's domain if it
    did not know it), ``retire`` or ``quarantine`` the expert (the registry checks what ``actor`` may
    do); returns its record."""
    if action == "activate":
        from serve.activation import activate

        return activate(registry, name, None, actor).record
    if action == "retire":
        return registry.retire(name, None, actor)
    if action == "quarantine":
        return registry.quarantine(name, None, reason or "quarantined over HTTP", actor)
    raise ValueError(f"unknown status action {action!r}")


def _register_upload(registry: Any, manifest_data: dict[str, Any], files: dict[str, bytes], actor: str | Principal):
    """Write uploaded files to a private temp folder (paths checked first), then register them."""
    from registry.manifest import parse_manifest

    manifest = parse_manifest(manifest_data, source="manifest")  # the CLI's own messages, per field
    missing = sorted(set(manifest.files) - set(files))
    extra = sorted(set(files) - set(manifest.files))
    if missing or extra:
        raise ArtifactError(
            f"uploaded files do not match manifest.files (missing: {missing or 'none'}, "
            f"not in the manifest: {extra or 'none'})"
        )
    folder = Path(tempfile.mkdtemp(prefix="mose-upload-"))
    try:
        for relpath, data in files.items():
            target = folder / _safe_relpath(relpath)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return registry.add(manifest, folder, actor=actor)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _safe_relpath(relpath: str) -> PurePosixPath:
    path = PurePosixPath(relpath)
    if path.is_absolute() or ".." in path.parts or "\\" in relpath or not path.parts:
        raise ArtifactError(f"file path {relpath!r} must be relative and stay inside the upload")
    return path
