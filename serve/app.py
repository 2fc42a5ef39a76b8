"""Assemble and run the mose Ray Serve application.

* :func:`build_application` binds the deployments with the options in :class:`ServeConfig`;
  GPU fractions are requested only when the Ray cluster has GPUs (a GPU request on a GPU-less
  cluster is never scheduled), so the same config runs on a laptop and on a GPU cluster.
* :func:`app_builder` is the ``import_path`` target for ``serve deploy`` (see ``mose serve build``).
* :func:`start` runs it on an embedded local Ray (the default) or joins ``ray.address``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from experts.base_models import SMOLLM2_ID
from registry.home import MoseHome
from serve.config import DeploymentConfig, ServeConfig, load_config

APP_NAME = "mose"
RETRY_AFTER_S = 1
"""``Retry-After`` (seconds) of a 429 from Ray's proxy queue; the middleware sends the same."""
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 when Ray is not initialised)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def deployment_options(name: str, deployment: DeploymentConfig, gpus_available: bool, home_root: str) -> dict[str, Any]:
    """Ray Serve options for one role from its config section."""
    actor: dict[str, Any] = {
        "num_cpus": deployment.num_cpus,
        "runtime_env": {
            "env_vars": {
                **OFFLINE_ENV,
                "MOSE_HOME": home_root,
                **({"MOSE_CACHE": os.environ["MOSE_CACHE"]} if "MOSE_CACHE" in os.environ else {}),
            }
        },
    }
    if gpus_available and deployment.num_gpus > 0:
        actor["num_gpus"] = deployment.num_gpus
    if deployment.resources:
        actor["resources"] = dict(deployment.resources)
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor,
        "max_ongoing_requests": deployment.max_ongoing_requests,
    }
    if deployment.autoscaling is not None:
        options["autoscaling_config"] = deployment.autoscaling.model_dump()
    else:
        options["num_replicas"] = deployment.num_replicas
    return options


def ingress_options(config: ServeConfig, gpus_available: bool, home_root: str) -> dict[str, Any]:
    """The Ingress options, sized so that overload is refused with 429 instead of queued.

    The admission middleware refuses requests beyond ``limits.max_queued_requests``, but it only
    sees what the replica admits: with ``max_ongoing_requests`` below the limit the excess would
    wait in Ray's proxy, unbounded, until clients time out. So each replica admits twice the
    limit (refusing is cheap). Ray's proxy queue is bounded as a backstop (429 + Retry-After, but
    a plain-text body); it is deep enough that a burst drains through the middleware's JSON 429s,
    since a refused request frees its slot within milliseconds.
    """
    options = deployment_options("Ingress", config.ingress, gpus_available, home_root)
    limit = config.limits.max_queued_requests
    options["max_ongoing_requests"] = max(options["max_ongoing_requests"], 2 * limit)
    options["max_queued_requests"] = 4 * limit
    options["backpressure_config"] = {"status_code": 429, "retry_after_s": RETRY_AFTER_S}
    return options


def build_application(config: ServeConfig, gpus_available: bool | None = None):
    """The bound application graph:
    Ingress -> (Router, ExpertPool, FullExperts, CrossCheck -> (Router, ExpertPool))."""
    from ray import serve

    from serve.deployments import (
        CrossCheckDeployment,
        ExpertPoolDeployment,
        Ingress,
        RouterDeployment,
        full_expert_deployment,
    )

    gpus = cluster_gpus() > 0 if gpus_available is None else gpus_available
    home_root = str(config.home or MoseHome.from_env().root)
    config = config.model_copy(update={"home": home_root})

    router = (
        serve.deployment(RouterDeployment)
        .options(**deployment_options("Router", config.router, gpus, home_root))
        .bind(home_root)
    )
    pool_options = deployment_options(f"ExpertPool-{SMOLLM2_ID}", config.expert_pool, gpus, home_root)
    pool = (
        serve.deployment(ExpertPoolDeployment)
        .options(**pool_options)
        .bind(home_root, SMOLLM2_ID, config.pool, config.limits)
    )
    full = (
        serve.deployment(full_expert_deployment(config.pool))
        .options(**deployment_options("FullExperts", config.full_experts, gpus, home_root))
        .bind(home_root, config.pool, config.limits)
    )
    checker = (
        serve.deployment(CrossCheckDeployment)
        .options(**deployment_options("CrossCheck", config.crosscheck, gpus, home_root))
        .bind(home_root, router, pool)
    )
    ingress = serve.deployment(Ingress).options(**ingress_options(config, gpus, home_root))
    return ingress.bind(config, router, pool, full, checker)


def app_builder(args: dict[str, Any]):
    """``serve deploy`` entry point: ``args`` may hold ``config_path`` and ``home``."""
    config = load_config(args.get("config_path"), home=args.get("home"))
    return build_application(config)


def start(config: ServeConfig, blocking: bool = False) -> str:
    """Start Ray (embedded unless ``ray.address``), deploy, and return the base URL."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if config.ray.address:
            ray.init(address=config.ray.address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(
                address="local",
                num_cpus=config.ray.num_cpus,
                include_dashboard=False,
                object_store_memory=config.ray.object_store_memory_mb * 1024 * 1024,
                log_to_driver=False,
            )
    serve.start(
        http_options={"host": config.http.host, "port": config.http.port}, proxy_location=config.http.proxy_location
    )
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=blocking)
    if not blocking:
        for line in damage_report():
            print(f"mose: WARNING: {line}", file=sys.stderr, flush=True)
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::") else config.http.host
    return f"http://{host}:{config.http.port}"


def damage_report(timeout_s: float = 120.0) -> list[str]:
    """What started damaged (a router that fell back, experts refused at load), one line each.

    Replicas log to Ray's files, not to ``mose serve``'s output; an operator starting the server
    should see at once that it runs degraded (``/healthz`` has the same details).
    """
    from ray import serve

    try:
        health = serve.get_app_handle(APP_NAME).health.remote().result(timeout_s=timeout_s)
    except Exception as exc:  # a report, never a reason not to serve
        return [f"could not read the application's health: {exc}"]
    lines = []
    router = health.get("router") or {}
    if router.get("fallback_only"):
        lines.append(f"router unavailable, every query goes to the base model: {router.get('error')}")
    for name, reason in sorted(((health.get("expert_pool") or {}).get("refused") or {}).items()):
        lines.append(f"expert {name} refused (quarantined in the registry): {reason}")
    return lines


def stop() -> None:
    """Shut the application and Ray down (what SIGINT/SIGTERM do)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()


def serve_build_config(config_path: str | None, home: str | None) -> dict[str, Any]:
    """A Ray Serve config file (``serve deploy``-able) for this application.

    Secrets are not written: replicas read ``MOSE_ADMIN_TOKEN`` from their environment.
    """
    config = load_config(config_path, home=home)
    home_root = str(config.home or MoseHome.from_env().root)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.http.host, "port": config.http.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serve.app:app_builder",
                "args": {"home": home_root, **({"config_path": config_path} if config_path else {})},
                "runtime_env": {"env_vars": dict(OFFLINE_ENV)},
            }
        ],
    }
