"""Calls to an upstream OpenAI-compatible model (the "single large model" mose checks)."""

from __future__ import annotations

from typing import Any

import httpx

from registry.errors import MoseError
from serve.config import UpstreamConfig


class UpstreamError(MoseError):
    """The upstream model could not be reached or answered with an error."""


class UpstreamClient:
    """One pooled async HTTP client per configured upstream."""

    def __init__(self, upstreams: dict[str, UpstreamConfig]) -> None:
        self.upstreams = upstreams
        self._clients: dict[str, httpx.AsyncClient] = {}

    def _client(self, name: str) -> httpx.AsyncClient:
        if name not in self._clients:
            config = self.upstreams[name]
            headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
            self._clients[name] = httpx.AsyncClient(
                base_url=config.base_url.rstrip("/") + "/", headers=headers, timeout=config.timeout_s
            )
        return self._clients[name]

    async def chat(
        self, name: str, model: str, messages: list[dict[str, str]], max_tokens: int, temperature: float
    ) -> dict[str, Any]:
        """The upstream's chat completion (non-streaming) as JSON."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        try:
            response = await self._client(name).post("chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {name!r} is unreachable ({type(exc).__name__})") from None
        if response.status_code >= 400:
            raise UpstreamError(f"upstream {name!r} answered {response.status_code}: {_error_text(response)}")
        try:
            payload = response.json()
            payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UpstreamError(f"upstream {name!r} sent a response that is not a chat completion") from None
        return payload


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", {}).get("message", ""))[:300] or response.text[:300]
    except ValueError:
        return response.text[:300]
