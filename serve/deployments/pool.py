"""The expert pool's deployment: one per base model, the base plus its LoRA experts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from experts.types import GenerationRequest, GenerationResult
from registry.errors import MoseError
from registry.stores import node_home
from serve.catalog_sync import CatalogFollower
from serve.config import LimitsConfig, PoolSettings
from serve.deployments._common import complete, logger, open_registry, stream_pieces


class ExpertPoolDeployment:
    """One base model and its experts. The pool's engine loop decodes every request in shared steps
    (continuous batching: a request joins the running batch at the next step); loading or
    unloading an expert waits for one decoding step at most."""

    def __init__(self, home_root: str, base_model: str, settings: PoolSettings, limits: LimitsConfig) -> None:
        import torch

        from experts.pool import ExpertPool

        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
        self.home = node_home(home_root)  # this node's own cache when the registry is a database
        self.registry = open_registry(str(self.home.root))
        config = settings.pool_config(limits.max_tokens, base_model=base_model)
        self.pool = ExpertPool(config, home=self.home)
        logger.info("expert pool for %s on %s in %s", base_model, self.pool.device, self.pool.dtype)
        self.load_errors: dict[str, str] = {}
        self._refused: dict[str, tuple[str, Any]] = {}
        self.catalog = CatalogFollower(self.registry, self._reload_experts)
        self.sync_experts(force=True)

    def sync_experts(self, force: bool = False) -> list[str]:
        """Blocking (call it from a thread): bring the loaded experts to the registry's catalog
        generation (re-read only when it moved, or ``force``); returns the loaded names."""
        self.catalog.sync_now(force=force)
        return sorted(self.pool.experts())

    def _reload_experts(self) -> int:
        """Load newly active experts and unload retired or quarantined ones; returns the catalog
        generation the active experts were read at."""
        generation, records = self.registry.active_snapshot()
        # Full-weight experts are the FullExperts deployment's (multiplexed, loaded on demand).
        wanted = {r.name: r for r in records if r.kind == "lora" and r.base_model == self.pool.config.base_model}
        loaded = self.pool.experts()
        for name in [n for n, kind in loaded.items() if kind != "base" and n not in wanted]:
            self.pool.remove(name)
        for name, record in wanted.items():
            # A refused expert is tried again only once it changed (re-activated or a new
            # version), so an operator's fix needs no restart and a bad file is not re-read.
            if name in loaded or self._refused.get(name) == (record.ref, record.updated_at):
                continue
            try:
                self.pool.add_registered(self.registry, record)
                self.load_errors.pop(name, None)
                self._refused.pop(name, None)
            except MoseError as exc:  # tampered or unloadable: refused (and quarantined), rest serves
                logger.error("expert %s refused: %s", name, exc)
                self.load_errors[name] = str(exc)
                self._refused[name] = (record.ref, record.updated_at)
        return generation

    async def generate(self, request: GenerationRequest, generation: int | None = None) -> tuple[GenerationResult, int]:
        """One completion; ``generation``: the caller's catalog generation, caught up to first."""
        await self.catalog.sync(generation)
        return await complete(self.pool, request)

    async def stream(
        self, request: GenerationRequest, generation: int | None = None
    ) -> AsyncIterator[str | GenerationResult]:
        """Text pieces of one completion as they are decoded, then its GenerationResult."""
        await self.catalog.sync(generation)
        async for item in stream_pieces(self.pool, request):
            yield item

    async def score(
        self,
        question: str,
        answer: str,
        experts: list[str],
        adapt_question: bool = True,
        state_layer: int | None = None,
    ) -> list[Any]:
        """Likelihood evidence of each expert about one answer (one batched pass); ``state_layer``:
        with the base model's answer state, for the jury's truthfulness probe."""
        await self.catalog.sync()
        return await asyncio.to_thread(self.pool.score, question, answer, experts, adapt_question, state_layer)

    async def experts(self) -> list[str]:
        """Names this replica can serve ('base' included)."""
        await self.catalog.sync()
        return sorted(self.pool.experts())

    def status(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {
            "base_model": self.pool.config.base_model,
            "experts": sorted(self.pool.experts()),
            "node_id": context.get_node_id(),
            "device": self.pool.device,
            # the GPUs Ray gave this replica (a fraction of one, with num_gpus < 1)
            "gpu_ids": context.get_accelerator_ids().get("GPU", []),
            "refused": self.load_errors,
            "catalog_generation": self.catalog.generation,
            "engine": self.pool.engine.stats(),
        }
