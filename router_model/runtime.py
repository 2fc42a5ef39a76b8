"""Route queries with the current router artifact (ONNX Runtime; no torch needed).

``BaseRouter`` is the interface the server codes against (one method, ``route_batch``);
``OnnxRouter`` is the learned router and ``FallbackRouter`` sends everything to the fallback
(what the server uses when no router artifact can be loaded); :func:`load_router` picks one.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from registry.errors import MoseError, ServerError
from router_model.artifact import ONNX_FP32, RouterMetadata, current_dir, read_metadata
from router_model.config import RouterConfig
from router_model.tokens import length_sorted_batches, load_tokenizer, pad


class DomainScore(BaseModel):
    """One alternative in a routing decision."""

    domain: str
    """Predicted domain."""
    expert: str
    """Expert that would serve it (after taxonomy fallback)."""
    p: float
    """Calibrated probability."""


class RouteDecision(BaseModel):
    """Where a query goes and how sure the router is."""

    domain: str
    """Most probable domain (also set when abstaining, for the record)."""
    expert: str
    """Expert chosen; the fallback name when abstaining or when no expert covers the domain."""
    confidence: float
    """Calibrated probability of ``domain``."""
    top_k: list[DomainScore] = Field(default_factory=list)
    """The k most probable domains, best first."""
    abstained: bool = False
    """True when ``confidence`` is below the router's threshold, or ``support`` below its
    minimum (text unlike the training data): the fallback answers."""
    support: float = 1.0
    """Best cosine similarity of the query's embedding to a domain centroid."""
    catalog_generation: int | None = Field(default=None, exclude=True)
    """The registry's catalog generation the expert was chosen at (None without a registry): a
    server serves the decision from a snapshot at least this new. Not part of the JSON."""


class BaseRouter(ABC):
    """A router: queries in, one decision per query out."""

    @abstractmethod
    def route_batch(self, queries: Sequence[str]) -> list[RouteDecision]:
        """Decide for every query (same order)."""

    def route(self, query: str) -> RouteDecision:
        """Decide for one query."""
        return self.route_batch([query])[0]


class ExpertDirectory:
    """Domain -> expert from the registry's active experts, with taxonomy fallback.

    A domain is served by the active experts that list it; among several, the most recently
    activated wins (reputation can refine this later). A domain with none falls back along
    ``taxonomy.chain(domain)`` to the nearest ancestor that has one, then to ``fallback``.
    The registry's catalog generation is polled at most every ``refresh_s`` seconds (one tiny
    query) and the mapping re-read only when it moved; :attr:`generation` is the one it was
    read at.
    """

    def __init__(self, registry=None, fallback: str = "base", refresh_s: float = 2.0) -> None:
        self.registry = registry
        self.fallback = fallback
        self.refresh_s = refresh_s
        self.generation: int | None = None
        """Catalog generation of the mapping (None before the first read, or without a registry)."""
        self._owners: dict[str, str] = {}
        self._chains: dict[str, list[str]] = {}
        self._polled_at = float("-inf")

    def refresh(self, force: bool = False) -> int | None:
        """Re-read the mapping if the catalog generation moved (polled at most every ``refresh_s``
        seconds unless ``force``); returns the generation of the mapping."""
        if self.registry is None or (not force and time.monotonic() - self._polled_at < self.refresh_s):
            return self.generation
        self._polled_at = time.monotonic()
        if self.registry.catalog_generation() == self.generation:
            return self.generation
        generation, records = self.registry.active_snapshot()
        owners: dict[str, tuple[str, str]] = {}
        for record in records:
            stamp = str(record.updated_at)
            for domain in record.domains:
                if domain not in owners or stamp > owners[domain][0]:
                    owners[domain] = (stamp, record.name)
        self._owners = {domain: name for domain, (_, name) in owners.items()}
        self._chains = {}
        self.generation = generation
        return generation

    def chain(self, domain: str) -> list[str]:
        if domain not in self._chains:
            taxonomy = self.registry.taxonomy if self.registry is not None else None
            self._chains[domain] = taxonomy.chain(domain) if taxonomy is not None and domain in taxonomy else [domain]
        return self._chains[domain]

    def expert_for(self, domain: str) -> str:
        self.refresh()
        for candidate in self.chain(domain):
            if candidate in self._owners:
                return self._owners[candidate]
        return self.fallback

    def vertical(self, domain: str) -> str:
        """The top of ``domain``'s taxonomy chain (the domain itself when unknown)."""
        return self.chain(domain)[-1]


def cuda_device_present() -> bool:
    """Whether the NVIDIA driver sees a GPU. onnxruntime-gpu lists its CUDA provider on every
    machine, GPU or not, so that list alone cannot tell."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def choose_providers(use_cuda: bool) -> list[str]:
    """CUDA first when asked, ONNX Runtime lists it and a GPU is there (it falls back to CPU if
    the provider then cannot load)."""
    import onnxruntime as ort

    cuda = use_cuda and "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_present()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def choose_graph(metadata: RouterMetadata, on_cuda: bool) -> str:
    """The graph file to load. On CPU, the artifact's choice (int8 when it kept accuracy and ran
    faster at training time). On the CUDA provider the fp32 graph, which every artifact keeps:
    ONNX Runtime runs int8 dynamic quantisation on a GPU far slower than fp32 (H100, three runs:
    ~2x per query, 11-15x per batch of 64; docs/benchmarks.md, benchmarks/router_gpu.py)."""
    return ONNX_FP32 if on_cuda and ONNX_FP32 in metadata.files else metadata.onnx_file


def open_session(path: Path, providers: Sequence[str], threads: int = 0):
    """An ONNX Runtime session on ``providers`` (from :func:`choose_providers`; ``threads``:
    intra-op threads, 0 = ONNX Runtime's default). A graph that cannot load is a MoseError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        # A CUDA provider that cannot load logs an error and falls back to CPU; callers report
        # the provider actually used (``session.get_providers()[0]``) instead of that log.
        ort.set_default_logger_severity(4 if len(providers) > 1 else 2)
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ServerError(f"router graph {path} cannot be loaded ({exc}); retrain with `mose router train`") from None
    finally:
        ort.set_default_logger_severity(2)


class OnnxRouter(BaseRouter):
    """The learned router: tokenizer + one ONNX graph + threshold + expert directory."""

    def __init__(
        self, directory: Path, registry=None, config: RouterConfig | None = None, threads: int | None = None
    ) -> None:
        """``threads`` overrides the config's ONNX Runtime intra-op threads (a server sharing its
        cores with decoders wants 1: an idle thread pool spin-waits and steals their CPU)."""
        self.directory = Path(directory)
        self.metadata = read_metadata(self.directory, verify=True)
        trained = RouterConfig.model_validate(self.metadata.config) if self.metadata.config else RouterConfig()
        self.config = config or trained
        self.labels = self.metadata.labels
        self.threshold = self.metadata.threshold
        self.tokenizer = load_tokenizer(self.directory, trained.max_length)
        threads = self.config.threads if threads is None else threads
        providers = choose_providers(self.config.use_cuda)
        self.graph_file = choose_graph(self.metadata, on_cuda=providers[0] == "CUDAExecutionProvider")
        """The graph loaded (see :func:`choose_graph`)."""
        self.session = open_session(self.directory / self.graph_file, providers, threads or 0)
        self.experts = ExpertDirectory(registry, self.config.fallback_expert, self.config.expert_refresh_s)

    @classmethod
    def load(cls, home, registry=None, config: RouterConfig | None = None, threads: int | None = None) -> OnnxRouter:
        """The current version in ``home.router_dir``; MoseError when missing or corrupted."""
        return cls(current_dir(home.router_dir), registry=registry, config=config, threads=threads)

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def provider(self) -> str:
        """The execution provider ONNX Runtime actually uses (not just the one asked for)."""
        return self.session.get_providers()[0]

    def scores(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities, centroid support), one row per query, input order."""
        if not queries:
            return np.zeros((0, len(self.labels)), dtype=np.float32), np.zeros(0, dtype=np.float32)
        token_ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(queries))]
        if len(token_ids) == 1:
            input_ids, mask = pad(token_ids)
            probs, support = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})
            return probs, support
        probs = np.empty((len(token_ids), len(self.labels)), dtype=np.float32)
        support = np.empty(len(token_ids), dtype=np.float32)
        for index in length_sorted_batches(token_ids, self.config.runtime_batch_size):
            input_ids, mask = pad([token_ids[i] for i in index])
            probs[index], support[index] = self.session.run(None, {"input_ids": input_ids, "attention_mask": mask})
        return probs, support

    def probabilities(self, queries: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities, one row per query (input order)."""
        return self.scores(queries)[0]

    def route_batch(self, queries: Sequence[str]) -> list[RouteDecision]:
        for query in queries:
            if not isinstance(query, str) or not query.strip():
                raise MoseError("the router needs a non-empty text query")
        probs, support = self.scores(queries)
        self.experts.refresh()
        return [self.decide(row, float(s)) for row, s in zip(probs, support)]

    def decide(self, probs: np.ndarray, support: float = 1.0) -> RouteDecision:
        """Turn one probability row into a decision (top-k, expert mapping, abstention), tagged
        with the catalog generation of the expert mapping it used."""
        k = min(self.config.top_k, len(self.labels))
        best = np.argsort(-probs, kind="stable")[:k]
        top = [
            DomainScore(domain=self.labels[i], expert=self.experts.expert_for(self.labels[i]), p=float(probs[i]))
            for i in best
        ]
        abstained = top[0].p < self.threshold or support < self.metadata.min_support
        return RouteDecision(
            domain=top[0].domain,
            expert=self.experts.fallback if abstained else top[0].expert,
            confidence=top[0].p,
            top_k=top,
            abstained=abstained,
            support=support,
            catalog_generation=self.experts.generation,
        )


class FallbackRouter(BaseRouter):
    """Sends every query to the fallback (used when no router artifact can be loaded)."""

    def __init__(self, fallback: str = "base") -> None:
        self.fallback = fallback

    def route_batch(self, queries: Sequence[str]) -> list[RouteDecision]:
        return [RouteDecision(domain="unknown", expert=self.fallback, confidence=0.0, abstained=True) for _ in queries]


def load_router(
    home, registry=None, config: RouterConfig | None = None, strict: bool = True, threads: int | None = None
) -> BaseRouter:
    """The current learned router; with ``strict=False`` a missing or corrupted artifact gives a
    :class:`FallbackRouter` instead of raising (what the server does)."""
    try:
        return OnnxRouter.load(home, registry=registry, config=config, threads=threads)
    except MoseError:
        if strict:
            raise
        return FallbackRouter((config or RouterConfig()).fallback_expert)
