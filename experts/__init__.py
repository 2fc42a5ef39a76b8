"""mose experts: base weights, the expert pool, likelihood scoring and LoRA fine-tuning.

Public names are imported lazily so ``import experts`` stays cheap (no torch until needed).

    from experts import ExpertPool, PoolConfig
    pool = ExpertPool.from_registry(Registry.open(home))
    pool.generate([{"expert": "demo-law", "messages": [{"role": "user", "content": "..."}]}])
    pool.score(question, answer, ["demo-law", "base"])
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SMOLLM2_ID": "experts.base_models",
    "MINILM_ID": "experts.base_models",
    "prepare_base_models": "experts.base_models",
    "ensure_base_model": "experts.base_models",
    "smollm2_dir": "experts.base_models",
    "minilm_dir": "experts.base_models",
    "DevicePolicy": "experts.policy",
    "ExpertPool": "experts.pool",
    "PoolConfig": "experts.pool",
    "BASE_EXPERT": "experts.types",
    "SamplingParams": "experts.types",
    "ChatMessage": "experts.types",
    "GenerationRequest": "experts.types",
    "GenerationResult": "experts.types",
    "ExpertScore": "experts.types",
    "FinetuneConfig": "experts.finetune",
    "DemoConfig": "experts.demo",
    "build_demo": "experts.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'experts' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
