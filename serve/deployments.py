"""Ray Serve deployments, one class per role.

* :class:`RouterDeployment` — the learned router on ONNX Runtime; concurrent queries are batched.
* :class:`ExpertPoolDeployment` — one per base model: the base plus its LoRA experts; concurrent
  requests for different adapters share forward passes (``@serve.batch``).
* :class:`FullExpertDeployment` — full-weight experts (their own weights, no shared base), loaded
  on demand through Ray Serve model multiplexing, least recently used unloaded per replica.
* :class:`CrossCheckDeployment` — the jury; it borrows the router and the pool through handles.
* :class:`Ingress` — the FastAPI app (:mod:`serve.api`), implementing :class:`~serve.backend.Backend`
  with handles to the others; it owns registry writes (admin endpoints).

Each class wraps a component that works without Ray (``router_model``, ``experts``, ``registry``);
nothing here decides *what* to answer, only *where* it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

from ray import serve

from experts.types import GenerationRequest, GenerationResult
from registry.errors import ArtifactError, MoseError
from registry.home import MoseHome
from registry.stores import node_home
from registry.teams import Principal
from router_model.runtime import RouteDecision
from serve.backend import Backend
from serve.catalog_sync import CATALOG_POLL_S, CatalogFollower
from serve.config import ServeConfig
from serve.metrics import IngressMetrics
from serve.upstream import UpstreamClient

logger = logging.getLogger("mose.serve")

REGISTRY_REFRESH_S = 2.0
"""How often the cross-check replica looks for a new calibrator version. The active experts are
followed by catalog generation instead (:mod:`serve.catalog_sync`)."""

HANDLE_RETRY_DELAY_S = 0.5
"""Pause before the one retry of a call whose replica died under it (Ray Serve is replacing it)."""


def _device_policy(cpu_dtype: str | None):
    """This node's device policy; ``cpu_dtype`` None: the node's MOSE_CPU_DTYPE, else auto."""
    from experts.policy import DevicePolicy

    return DevicePolicy() if cpu_dtype is None else DevicePolicy(cpu_dtype=cpu_dtype)


def _open_registry(home_root: str):
    from registry import Registry

    return Registry.open(MoseHome.from_env(home_root))


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
        self.registry = _open_registry(home_root)
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
        return {"version": version, "provider": provider, "fallback_only": self.error is not None,
                "error": self.error, "catalog_generation": getattr(experts, "generation", None)}


async def _complete(pool: Any, request: GenerationRequest) -> tuple[GenerationResult, int]:
    """One completion from the pool's engine loop, and the most requests it was decoded with in one
    step. The event loop is not blocked while it decodes; if this call is cancelled (its client went
    away), so is the request's row."""
    handle = pool.submit(request)
    try:
        result = await handle.wait()
    finally:
        handle.cancel()  # nothing to stop once it finished
    return result, handle.batch_size


async def _stream(pool: Any, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
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


class ExpertPoolDeployment:
    """One base model and its experts. The pool's engine loop decodes every request in shared steps
    (continuous batching: a request joins the running batch at the next step); loading or
    unloading an expert waits for one decoding step at most."""

    def __init__(self, home_root: str, base_model: str, max_batch_size: int, batch_wait_timeout_s: float,
                 max_new_tokens: int, torch_threads: int, cpu_dtype: str | None = None) -> None:
        import torch

        from experts.pool import ExpertPool, PoolConfig

        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        self.home = node_home(home_root)  # this node's own cache when the registry is a database
        self.registry = _open_registry(str(self.home.root))
        config = PoolConfig(base_model=base_model, max_new_tokens_limit=max_new_tokens, max_batch_size=max_batch_size,
                            batch_wait_s=batch_wait_timeout_s, policy=_device_policy(cpu_dtype))
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
        return await _complete(self.pool, request)

    async def stream(self, request: GenerationRequest,
                     generation: int | None = None) -> AsyncIterator[str | GenerationResult]:
        """Text pieces of one completion as they are decoded, then its GenerationResult."""
        await self.catalog.sync(generation)
        async for item in _stream(self.pool, request):
            yield item

    async def score(self, question: str, answer: str, experts: list[str], adapt_question: bool = True,
                    state_layer: int | None = None) -> list[Any]:
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
        return {"base_model": self.pool.config.base_model, "experts": sorted(self.pool.experts()),
                "node_id": context.get_node_id(), "device": self.pool.device,
                # the GPUs Ray gave this replica (a fraction of one, with num_gpus < 1)
                "gpu_ids": context.get_accelerator_ids().get("GPU", []),
                "refused": self.load_errors, "catalog_generation": self.catalog.generation,
                "engine": self.pool.engine.stats()}


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
    keeps at most ``max_models_per_replica`` loaded (see :func:`full_expert_deployment`)."""

    def __init__(self, home_root: str, max_new_tokens: int, torch_threads: int, cpu_dtype: str | None = None) -> None:
        import torch

        from experts.pool import ExpertPool, PoolConfig

        torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        home = node_home(home_root)  # this node's own cache when the registry is a database
        self.registry = _open_registry(str(home.root))
        # The LRU is Ray Serve's (per replica, by count); the pool's own byte budget only guards
        # against one expert too large for the machine.
        config = PoolConfig(load_base=False, max_new_tokens_limit=max_new_tokens, full_expert_budget_bytes=1 << 40,
                            policy=_device_policy(cpu_dtype))
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
        return await _complete(self.pool, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        await self._expert()
        async for item in _stream(self.pool, request):
            yield item

    def status(self) -> dict[str, Any]:
        return {"loaded": [n for n, kind in self.pool.experts().items() if kind == "full"],
                "refused": self.load_errors, "engine": self.pool.engine.stats()}


def full_expert_deployment(max_models_per_replica: int) -> type:
    """:class:`FullExpertDeployment` with Ray Serve's multiplexed LRU of the given size (the
    decorator takes the size when the class is made, so the class is made from the config)."""

    class FullExperts(FullExpertDeployment):
        load_expert = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(
            FullExpertDeployment.load_expert)

    FullExperts.__doc__ = FullExpertDeployment.__doc__
    return FullExperts


class CrossCheckDeployment:
    """The jury: asks the router for jurors and the expert pool for evidence, then calibrates.

    Holds no model of its own (the pool's base model is shared); the calibrator is reloaded when
    a new version is trained.
    """

    def __init__(self, home_root: str, router: Any, pool: Any) -> None:
        from jury.jury import Jury
        from router_model.embedder import MiniLMEmbedder

        self.home = MoseHome.from_env(home_root)
        self.registry = _open_registry(home_root)
        self.router, self.pool = router, pool
        # MiniLM loads on the first verdict with own answers
        self.jury = Jury(None, None, self.registry, self._load_calibrator(), embedder=MiniLMEmbedder())
        self._checked_at = time.monotonic()

    def _load_calibrator(self):
        from jury.calibrator import load_calibrator

        try:
            return load_calibrator(self.home.crosscheck_dir)
        except MoseError as exc:
            logger.warning("no calibrator, verdicts are uncalibrated: %s", exc)
            return None

    def _maybe_reload(self) -> None:
        if time.monotonic() - self._checked_at > REGISTRY_REFRESH_S:
            self._checked_at = time.monotonic()
            current = self._load_calibrator() if (self.home.crosscheck_dir / "current").is_file() else None
            if current is not None and current.version != self.jury.calibrator_version:
                self.jury.calibrator = current

    async def crosscheck(self, question: str, answer: str, k: int | None = None, own_answers: bool = False):
        from jury.jury import select_jurors

        self._maybe_reload()
        jury = self.jury
        question, answer = jury.prepare(question, answer)
        if not answer.strip():
            return jury.record(jury.empty_answer_verdict(question, answer))
        k = jury.config.k if k is None else k
        servable = set(await self.pool.experts.remote())
        top_k = (await self.router.route.remote(question)).top_k if k > 0 and len(servable) > 1 else []
        jurors_wanted = select_jurors(top_k, servable, k)
        scores = await self.pool.score.remote(question, answer, [name for name, _ in jurors_wanted],
                                              jury.adapters_read_question, jury.state_layer)
        jurors = await asyncio.to_thread(jury.weigh, jurors_wanted, scores)
        agreement = await self._agreement(question, answer, jurors) if own_answers else None
        return await asyncio.to_thread(lambda: jury.record(jury.verdict(question, answer, jurors, agreement)))

    async def _agreement(self, question: str, answer: str, jurors: list[Any]) -> bool:
        requests = self.jury.own_answer_requests(question, jurors)
        results = await asyncio.gather(*(self.pool.generate.remote(r) for r in requests))
        texts = [result.text for result, _ in results]
        vectors = await asyncio.to_thread(self.jury.embedder, [answer] + texts)
        return self.jury.agreement(jurors, texts, vectors)

    def feedback(self, verdict_id: str, correct: bool, actor: str) -> dict[str, float]:
        return self.jury.feedback(verdict_id, correct, actor=actor)

    def status(self) -> dict[str, Any]:
        return {"calibrator": self.jury.calibrator_version}


def _replica_lost(exc: BaseException) -> bool:
    """The replica serving a call died or became unreachable (killed, OOM, node lost).

    Errors re-raised by a replica that called another one (CrossCheck -> pool) come wrapped in
    ``RayTaskError(cause)``, which is also an instance of the cause's class.
    """
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, (RayActorError, ReplicaUnavailableError))


async def _call(handle_method: Any, *args: Any) -> Any:
    """One call through a deployment handle, retried once when its replica died under it.

    Ray Serve replaces a dead replica and the handle waits for the new one, so the retry usually
    answers. When it fails too, the caller gets ``DeploymentUnavailableError``, which the API
    answers with 503 and ``Retry-After`` (never a bare 500).
    """
    from ray.serve.exceptions import DeploymentUnavailableError

    try:
        return await handle_method.remote(*args)
    except Exception as exc:
        if not _replica_lost(exc):
            raise
        logger.warning("replica lost during a call, retrying once: %s", type(exc).__name__)
    await asyncio.sleep(HANDLE_RETRY_DELAY_S)
    try:
        return await handle_method.remote(*args)
    except Exception as exc:
        if not _replica_lost(exc):
            raise
        logger.error("replica lost again on retry; answering 503: %s", type(exc).__name__)
        raise DeploymentUnavailableError(getattr(handle_method, "deployment_name", "deployment")) from exc


@serve.ingress()
class Ingress(Backend):
    """The HTTP front door: parses, limits, authenticates; routes and generates through handles."""

    def __init__(self, config: ServeConfig, router: Any, pool: Any, full_experts: Any, crosscheck: Any) -> None:
        self.config = config
        self.home_root = str(config.home or MoseHome.from_env().root)
        self.registry = _open_registry(self.home_root)
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
        decision = await _call(self.router.route, query)
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
        return await _call(handle.generate, *self._at_generation(handle, request))

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
        self._cards = [{"name": r.name, "version": r.version, "kind": r.kind, "domains": r.domains,
                        "owner": r.manifest.owner, "description": r.manifest.description} for r in records]
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
            await _call(self.router.sync)
        await self.catalog.sync(fresh=True)
        return _record_json(activation.record) | {"router": activation.router_json()}

    async def crosscheck(self, question: str, answer: str, k: int, own_answers: bool) -> Any:
        return await _call(self.checker.crosscheck, question, answer, k, own_answers)

    async def upstream_chat(self, name: str, messages: list[dict[str, str]], max_tokens: int,
                            temperature: float) -> dict[str, Any]:
        model = self.config.upstreams[name].model
        return await self.upstream.chat(name, model, messages, max_tokens, temperature)

    async def feedback(self, verdict_id: str, correct: bool) -> dict[str, float]:
        return await self.checker.feedback.remote(verdict_id, correct, "feedback-api")

    async def health(self) -> dict[str, Any]:
        router, pool, full, checker = await asyncio.gather(
            _call(self.router.status), _call(self.pool.status), _call(self.full_experts.status),
            _call(self.checker.status))
        return {"router": router, "expert_pool": pool, "full_experts": full, "crosscheck": checker}


def _record_json(record: Any) -> dict[str, Any]:
    return {"name": record.name, "version": record.version, "status": record.status, "kind": record.kind,
            "domains": record.domains, "base_model": record.base_model}


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


def _register_upload(registry: Any, manifest_data: dict[str, Any], files: dict[str, bytes],
                     actor: str | Principal):
    """Write uploaded files to a private temp folder (paths checked first), then register them."""
    from registry.manifest import parse_manifest

    manifest = parse_manifest(manifest_data, source="manifest")  # the CLI's own messages, per field
    missing = sorted(set(manifest.files) - set(files))
    extra = sorted(set(files) - set(manifest.files))
    if missing or extra:
        raise ArtifactError(f"uploaded files do not match manifest.files (missing: {missing or 'none'}, "
                            f"not in the manifest: {extra or 'none'})")
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


__all__ = ["CrossCheckDeployment", "ExpertPoolDeployment", "FullExpertDeployment", "Ingress", "RouterDeployment",
           "full_expert_deployment"]
