"""The HTTP API: OpenAI-compatible completions plus mose's routing and admin endpoints.

:func:`build_api` turns a :class:`~serve.config.ServeConfig` and a :class:`~serve.backend.Backend`
into a FastAPI app. Every error is an OpenAI-shaped JSON body (``{"error": {"message", ...}}``):
a 4xx that says what the client got wrong, 503 for something the request needs that is not
available, 500 for another fault of the server's, 502 for the upstream model's.

One module per concern:

* :mod:`serve.api.errors` — the error body, the status of every error, the one validation-error formatter
* :mod:`serve.api.middleware` — the admin gate, the body limit, admission control
* :mod:`serve.api.openai_routes` — ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``
* :mod:`serve.api.sse` — the server-sent events of a streamed completion
* :mod:`serve.api.mose_routes` — ``/healthz``, ``/metrics``, ``/v1/route``, ``/v1/crosscheck``, ``/v1/feedback``
* :mod:`serve.api.admin_routes` — ``/v1/experts`` (register, activate, retire, quarantine) and its authentication
* :mod:`serve.api.app` — :func:`build_api`, which mounts them (and the catalogue pages)
"""

from serve.api.admin_routes import (
    ADMIN_PREFIX,
    PRINCIPAL_SCOPE_KEY,
    QuarantineRequest,
    RegisterExpertRequest,
    authenticate,
    authorize_admin,
)
from serve.api.app import build_api
from serve.api.errors import (
    ERROR_DESCRIPTIONS,
    ApiError,
    describe_validation,
    error_response,
    find_mose_error,
    mose_error_status,
)
from serve.api.middleware import AdminGateMiddleware, AdmissionMiddleware, BodyLimitMiddleware
from serve.api.openai_routes import AUTO, MIN_TEMPERATURE, UPSTREAM_PREFIX
from serve.api.sse import CLIENT_CLOSED, _sse

__all__ = [
    "ADMIN_PREFIX",
    "AUTO",
    "CLIENT_CLOSED",
    "ERROR_DESCRIPTIONS",
    "MIN_TEMPERATURE",
    "PRINCIPAL_SCOPE_KEY",
    "UPSTREAM_PREFIX",
    "AdminGateMiddleware",
    "AdmissionMiddleware",
    "ApiError",
    "BodyLimitMiddleware",
    "QuarantineRequest",
    "RegisterExpertRequest",
    "_sse",
    "authenticate",
    "authorize_admin",
    "build_api",
    "describe_validation",
    "error_response",
    "find_mose_error",
    "mose_error_status",
]
