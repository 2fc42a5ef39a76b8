"""mose's serving layer: the ``mose`` command line and the Ray Serve application behind one
OpenAI-compatible HTTP endpoint.

Public surface (everything else in ``serve`` is internal and may change):

* :class:`ServeConfig` and :func:`load_config`: the server's configuration, one pydantic section
  per concern, from YAML, ``MOSE_SERVE__*`` environment variables and keyword overrides.
* :func:`build_application`: the bound Ray Serve graph (Ingress -> Router, ExpertPool,
  FullExperts, CrossCheck) for ``serve.run`` or ``serve deploy``.
* :func:`start` and :func:`stop`: run it on an embedded local Ray, or on the cluster at
  ``ray.address``, and shut it down.

Importing ``serve`` loads neither torch nor Ray; they are imported where a deployment starts.
"""

from serve.app import build_application, start, stop
from serve.config import ServeConfig, load_config

__all__ = ["ServeConfig", "build_application", "load_config", "start", "stop"]
