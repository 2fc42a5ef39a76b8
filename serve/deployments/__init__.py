"""Ray Serve deployments, one module per role.

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

Modules: :mod:`.router`, :mod:`.pool`, :mod:`.full_experts`, :mod:`.crosscheck`, :mod:`.ingress`;
what they share (device policy, registry, the retried handle call) is in :mod:`._common`.
"""

from serve.deployments.crosscheck import CrossCheckDeployment
from serve.deployments.full_experts import FullExpertDeployment, full_expert_deployment
from serve.deployments.ingress import Ingress
from serve.deployments.pool import ExpertPoolDeployment
from serve.deployments.router import RouterDeployment

__all__ = [
    "CrossCheckDeployment",
    "ExpertPoolDeployment",
    "FullExpertDeployment",
    "Ingress",
    "RouterDeployment",
    "full_expert_deployment",
]
