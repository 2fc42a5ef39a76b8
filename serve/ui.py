"""The catalogue pages: plain server-rendered HTML at ``/ui``, read-only.

* ``GET /ui``: every registered expert version with its owner, status, domains, signature,
  reputation, verdict agreement and share of routed traffic, and a live panel of this ingress
  replica's recent routing decisions and flag rate (see :mod:`serve.catalogue` for each figure);
* ``GET /ui/experts/{name}[/{version}]``: one expert version: manifest, example queries, file
  digests, versions and audit history.

Every value goes through Jinja2's autoescaping, and the pages carry no script: the
Content-Security-Policy forbids scripts, frames and forms outright. Nothing secret is shown (no
token, no query text). ``/ui`` is admitted by the same in-flight limit as ``/v1/``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from registry.errors import NotFoundError
from serve.backend import Backend
from serve.catalogue import Catalogue, live_panel, utc_time
from serve.metrics import IngressMetrics

UI_PREFIX = "/ui"
TEMPLATES_DIR = Path(__file__).with_name("templates")
REFRESH_S = 30
"""The catalogue page reloads itself this often (a meta refresh: no script)."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def mount_catalogue(api: FastAPI, backend: Backend, metrics: IngressMetrics) -> None:
    """Serve the catalogue pages when the backend has a registry to show."""
    catalogue = backend.catalogue()
    if catalogue is not None:
        api.include_router(catalogue_router(catalogue, metrics))


def templates() -> Jinja2Templates:
    """The page templates, autoescaped, with the filters they use."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters.update(pct=percent, utc=utc_time, size=human_size)
    return Jinja2Templates(env=env)


def catalogue_router(catalogue: Catalogue, metrics: IngressMetrics) -> APIRouter:
    """The ``/ui`` routes over one catalogue and this replica's metrics (not in the OpenAPI schema)."""
    pages = _Pages(catalogue, metrics, templates())
    router = APIRouter(prefix=UI_PREFIX, include_in_schema=False)
    router.get("", response_class=HTMLResponse)(pages.index)
    router.get("/style.css")(pages.style)
    router.get("/experts/{name}", response_class=HTMLResponse)(pages.expert)
    router.get("/experts/{name}/{version}", response_class=HTMLResponse)(pages.expert)
    return router


class _Pages:
    """Page handlers bound to one catalogue, metrics set and template environment."""

    def __init__(self, catalogue: Catalogue, metrics: IngressMetrics, templates: Jinja2Templates) -> None:
        self.catalogue, self.metrics, self.templates = catalogue, metrics, templates

    async def index(self, request: Request) -> Response:
        rows = await asyncio.to_thread(self.catalogue.rows, self.metrics.routed_counts())
        return self._render(request, "catalogue.html", rows=rows, live=live_panel(self.metrics), refresh_s=REFRESH_S)

    async def expert(self, request: Request, name: str, version: str | None = None) -> Response:
        try:
            page = await asyncio.to_thread(self.catalogue.page, name, version, self.metrics.routed_counts())
        except NotFoundError as exc:
            return self._render(request, "not_found.html", status=404, message=str(exc))
        return self._render(request, "expert.html", page=page, row=page.row, manifest=page.row.manifest)

    async def style(self) -> Response:
        css = (TEMPLATES_DIR / "style.css").read_text(encoding="utf-8")
        return Response(css, media_type="text/css", headers=SECURITY_HEADERS)

    def _render(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        return self.templates.TemplateResponse(
            request, template, {"prefix": UI_PREFIX, **context}, status_code=status, headers=SECURITY_HEADERS
        )


def percent(value: float | None, digits: int = 0) -> str:
    """0.4567 -> ``46%``; None -> an en dash (no data yet)."""
    return "\u2013" if value is None else f"{100 * value:.{digits}f}%"


def human_size(size: int) -> str:
    """Bytes in the largest unit that keeps the number above 1."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
