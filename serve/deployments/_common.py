"""What the deployment modules share: the registry, the logger, one
call through a handle retried when its replica died, and a completion or stream from a pool's
engine loop (the base-model pool and the full-weight experts decode alike)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from experts.types import GenerationRequest, GenerationResult
from registry.home import MoseHome

logger = logging.getLogger("mose.serve")

REGISTRY_REFRESH_S = 2.0
"""How often the cross-check replica looks for a new calibrator version. The active experts are
followed by catalog generation instead (:mod:`serve.catalog_sync`)."""

HANDLE_RETRY_DELAY_S = 0.5
"""Pause before the one retry of a call whose replica died under it (Ray Serve is replacing it)."""


def open_registry(home_root: str):
    from registry import Registry

    return Registry.open(MoseHome.from_env(home_root))


def replica_lost(exc: BaseException) -> bool:
    """The replica serving a call died or became unreachable (killed, OOM, node lost).

    Errors re-raised by a replica that called another one (CrossCheck -> pool) come wrapped in
    ``RayTaskError(cause)``, which is also an instance of the cause's class.
    """
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, (RayActorError, ReplicaUnavailableError))


async def call_with_retry(handle_method: Any, *args: Any) -> Any:
    """One call through a deployment handle, retried once when its replica died under it.

    Ray Serve replaces a dead replica and the handle waits for the new one, so the retry usually
    answers. When it fails too, the caller gets ``DeploymentUnavailableError``, which the API
    answers with 503 and ``Retry-After`` (never a bare 500).
    """
    from ray.serve.exceptions import DeploymentUnavailableError

    try:
        return await handle_method.remote(*args)
    except Exception as exc:
        if not replica_lost(exc):
            raise
        logger.warning("replica lost during a call, retrying once: %s", type(exc).__name__)
    await asyncio.sleep(HANDLE_RETRY_DELAY_S)
    try:
        return await handle_method.remote(*args)
    except Exception as exc:
        if not replica_lost(exc):
            raise
        logger.error("replica lost again on retry; answering 503: %s", type(exc).__name__)
        raise DeploymentUnavailableError(getattr(handle_method, "deployment_name", "deployment")) from exc


async def complete(pool: Any, request: GenerationRequest) -> tuple[GenerationResult, int]:
    """One completion from the pool's engine loop, and the most requests it was decoded with in one
    step. The event loop is not blocked while it decodes; if this call is cancelled (its client went
    away), so is the request's row."""
    handle = pool.submit(request)
    try:
        result = await handle.wait()
    finally:
        handle.cancel()  # nothing to stop once it finished
    return result, handle.batch_size


async def stream_pieces(pool: Any, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
    """Text pieces of one completion as the engine loop decodes them (in the same steps as every
    other request), then its GenerationResult. When the client goes away Ray Serve cancels this
    generator, which cancels the row: its decoding stops at the loop's next step."""
    handle = pool.stream(request)
    try:
        async for piece in handle:
            yield piece
        yield handle.result()
    finally:
        handle.cancel()
