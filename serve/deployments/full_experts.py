"""Full-weight experts' deployment, loaded on demand through Ray Serve model multiplexing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from experts.types import GenerationRequest, GenerationResult
from registry.errors import MoseError
from registry.stores import node_home
from serve.config import LimitsConfig, PoolSettings
from serve.deployments._common import complete, logger, open_registry, stream_pieces


class _LoadedFullExpert:
    """What the multiplexed loader caches: a full expert loaded in this replica's pool. Ray Serve
    calls ``__del__`` when it evicts the expert (least recently used), which unloads the weights."""

    def __init__(self, pool: Any, name: str) -> None:
        self.pool, self.name = pool, name

    def __del__(self) -> None:
        if self.name in self.pool.experts():
            self.pool.remove(self.name)
        self.name = ""  # Ray may call __del__ again when it drops its reference


class FullExpertDeployment:
    """Full-weight experts. A request carries its expert's name as the multiplexed model id; Ray
    Serve sends it to a replica that already holds that expert when one does, and each replica
    keeps at most ``pool.max_full_experts_per_replica`` loaded (see :func:`full_expert_deployment`)."""

    def __init__(self, home_root: str, settings: PoolSettings, limits: LimitsConfig) -> None:
        import torch

        from experts.pool import ExpertPool

        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
        home = node_home(home_root)  # this node's own cache when the registry is a database
        self.registry = open_registry(str(home.root))
        # The LRU is Ray Serve's (per replica, by count); the pool's own byte budget only guards
        # against one expert too large for the machine.
        config = settings.pool_config(limits.max_tokens, load_base=False, full_expert_budget_bytes=1 << 40)
        self.pool = ExpertPool(config, home=home)
        self.load_errors: dict[str, str] = {}

    async def load_expert(self, name: str) -> _LoadedFullExpert:
        """Verify and load one active full-weight expert (a tampered one is refused and quarantined)."""
        from registry.errors import NotFoundError

        record = await asyncio.to_thread(self.registry.active, name)
        if record is None or record.kind != "full":
            raise NotFoundError(f"unknown model {name!r}: no active full-weight expert of that name")
        try:
            await asyncio.to_thread(self.pool.add_registered, self.registry, record, True)
        except MoseError as exc:
            self.load_errors[name] = str(exc)
            logger.error("full expert %s refused: %s", name, exc)
            raise
        self.load_errors.pop(name, None)
        return _LoadedFullExpert(self.pool, name)

    async def _expert(self) -> str:
        name = serve.get_multiplexed_model_id()
        await self.load_expert(name)
        return name

    async def generate(self, request: GenerationRequest) -> tuple[GenerationResult, int]:
        """One completion; requests for the same expert decode in shared steps (engine loop)."""
        await self._expert()
        return await complete(self.pool, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        await self._expert()
        async for item in stream_pieces(self.pool, request):
            yield item

    def status(self) -> dict[str, Any]:
        return {
            "loaded": [n for n, kind in self.pool.experts().items() if kind == "full"],
            "refused": self.load_errors,
            "engine": self.pool.engine.stats(),
        }


def full_expert_deployment(settings: PoolSettings) -> type:
    """:class:`FullExpertDeployment` with Ray Serve's multiplexed LRU of
    ``settings.max_full_experts_per_replica`` (the decorator takes the size when the class is
    made, so the class is made from the config)."""

    class FullExperts(FullExpertDeployment):
        load_expert = serve.multiplexed(max_num_models_per_replica=settings.max_full_experts_per_replica)(
            FullExpertDeployment.load_expert
        )

    FullExperts.__doc__ = FullExpertDeployment.__doc__
    return FullExperts
