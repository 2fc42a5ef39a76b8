"""mose learned router: MiniLM encoder + linear head, temperature-calibrated, abstaining below
a threshold, exported to one ONNX graph and run with ONNX Runtime.

    from router_model import OnnxRouter, RouterConfig, train_and_publish, update_router
    path = train_and_publish(home, ["../shared/data/routing_dev.jsonl"], registry)
    router = OnnxRouter.load(home, registry=registry)
    router.route("What are the symptoms of anemia?")   # RouteDecision(domain, expert, confidence, top_k, abstained)

Public names are imported lazily: ``import router_model`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RouterConfig": "router_model.config",
    "BaseRouter": "router_model.runtime",
    "OnnxRouter": "router_model.runtime",
    "FallbackRouter": "router_model.runtime",
    "RouteDecision": "router_model.runtime",
    "DomainScore": "router_model.runtime",
    "load_router": "router_model.runtime",
    "train_and_publish": "router_model.service",
    "write_split": "router_model.service",
    "update_router": "router_model.update",
    "evaluate": "router_model.evaluate",
    "RouterMetadata": "router_model.artifact",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'router_model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
