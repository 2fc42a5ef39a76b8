"""The interface between the HTTP API and whatever answers it.

:func:`serve.api.build_api` only talks to a :class:`Backend`; the Ray Serve ingress implements it
with deployment handles (router, expert pool, cross-check). Keeping HTTP concerns (parsing,
limits, status codes, SSE) apart from placement concerns (Ray) lets each be tested alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from experts.types import GenerationRequest, GenerationResult
from registry.teams import Principal
from router_model.runtime import RouteDecision


class Backend(ABC):
    """What the HTTP API needs from the serving side; every method may raise MoseError."""

    @abstractmethod
    async def route(self, query: str) -> RouteDecision:
        """The router's decision for one query."""

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> tuple[GenerationResult, int]:
        """One completion, and the most requests it was decoded with in one step."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """One completion as text pieces, as they are generated, then its :class:`GenerationResult`
        (finish reason, token counts). Closing the iterator early stops the generation."""

    @abstractmethod
    async def crosscheck(self, question: str, answer: str, k: int, own_answers: bool) -> Any:
        """The jury's verdict (``jury.jury.Verdict``) on an answer; stored for feedback."""

    @abstractmethod
    async def feedback(self, verdict_id: str, correct: bool) -> dict[str, float]:
        """Record whether a checked answer was correct; returns the jurors' new weights."""

    @abstractmethod
    async def upstream_chat(
        self, name: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
    ) -> dict[str, Any]:
        """The named upstream model's chat completion (OpenAI JSON)."""

    @abstractmethod
    async def experts(self) -> list[dict[str, Any]]:
        """The active experts: name, version, domains, owner, kind."""

    async def has_expert(self, name: str) -> bool:
        """Whether ``name`` is an active expert; a backend that caches the list looks again
        before it says no (an expert activated a moment ago is known)."""
        return any(expert["name"] == name for expert in await self.experts())

    @abstractmethod
    async def authenticate_team(self, token: str) -> str:
        """The name of the team this token belongs to; ``registry.errors.AccessDeniedError`` for an
        unknown, wrong, rotated or revoked token."""

    @abstractmethod
    async def register(self, manifest: dict[str, Any], files: dict[str, bytes], actor: Principal) -> dict[str, Any]:
        """Register an expert from a manifest and its files as ``actor`` (a team only its own);
        returns the stored record."""

    @abstractmethod
    async def set_status(self, name: str, action: str, actor: Principal, reason: str | None = None) -> dict[str, Any]:
        """``activate``, ``retire`` or ``quarantine`` (with ``reason``) an expert as ``actor``; an
        activated expert becomes routable at once (:func:`serve.activation.activate`: the router
        learns its domain if it did not know it)."""

    @abstractmethod
    async def health(self) -> dict[str, Any]:
        """Liveness and what each part is running on."""

    def catalogue(self) -> Any:
        """The registry view the read-only ``/ui`` pages show (:class:`serve.catalogue.Catalogue`);
        None, the default, serves no pages."""
        return None
