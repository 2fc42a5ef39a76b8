"""Server configuration: one pydantic model, loaded from YAML and the environment.

Precedence (highest first): keyword arguments, ``MOSE_SERVE__<SECTION>__<FIELD>`` environment
variables (e.g. ``MOSE_SERVE__HTTP__PORT=9000``), the YAML file, the defaults below. A few
secret also has a short name: ``MOSE_ADMIN_TOKEN``.

Every field has a default and a docstring; ``mose serve --help`` and ``docs/operations.md`` are
built from them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from experts.pool import PoolConfig
from registry.errors import MoseError

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class HttpConfig(_Section):
    host: str = "127.0.0.1"
    """Address the HTTP ingress binds to. Use 0.0.0.0 to accept connections from other hosts."""

    port: int = Field(8000, ge=1, le=65535)
    """Port of the HTTP ingress."""

    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"
    """Where Ray Serve runs HTTP proxies. EveryNode suits a cluster behind a load balancer; the
    default avoids several nodes of one machine (tests, a laptop cluster) binding the same port."""


class AuthConfig(_Section):
    admin_token: SecretStr | None = None
    """Bearer token for admin endpoints (register, activate, retire). Env: MOSE_ADMIN_TOKEN."""

    admin_enabled: bool | None = None
    """Serve the admin endpoints. Default: on when an admin token is set (or insecure_local),
    off otherwise. Set true to insist on them: the server then refuses to start without a token."""

    insecure_local: bool = False
    """Open the admin endpoints without a token: anyone who reaches the port may change the
    registry. Only for a sandbox on this machine (http.host must be loopback); announced at start."""

    @model_validator(mode="after")
    def _admin_needs_a_token(self) -> AuthConfig:
        if self.admin_token is not None and not self.admin_token.get_secret_value():
            raise ValueError("admin_token is empty; unset it or give a real token")
        if self.admin_enabled and self.admin_token is None and not self.insecure_local:
            raise ValueError(
                "admin_enabled is true but no admin token is configured: set MOSE_ADMIN_TOKEN "
                "(or auth.admin_token), or for a sandbox on this machine only set auth.insecure_local: true "
                "(MOSE_SERVE__AUTH__INSECURE_LOCAL=true) to open the admin endpoints without a token"
            )
        return self

    @property
    def admin_mode(self) -> Literal["token", "insecure", "off"]:
        """How the admin endpoints are guarded: by the token, by nothing (insecure_local), or absent."""
        enabled = (
            self.admin_enabled
            if self.admin_enabled is not None
            else (self.admin_token is not None or self.insecure_local)
        )
        if not enabled:
            return "off"
        return "token" if self.admin_token is not None else "insecure"


class LimitsConfig(_Section):
    max_body_bytes: int = Field(1_000_000, gt=0)
    """Largest request body accepted, in bytes (413 above it)."""

    max_upload_bytes: int = Field(256_000_000, gt=0)
    """Largest body of an admin expert upload (``POST /v1/experts``: files base64-encoded)."""

    max_prompt_chars: int = Field(8_000, gt=0)
    """Longest prompt (all messages together), in characters (400 above it)."""

    max_tokens: int = Field(256, gt=0)
    """Largest ``max_tokens`` a request may ask for (400 above it)."""

    default_max_tokens: int = Field(64, gt=0)
    """``max_tokens`` used when a request gives none."""

    max_queued_requests: int = Field(64, gt=0)
    """Requests admitted at once; beyond it the server answers 429 with ``Retry-After``."""

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0)
    """Fewest replicas Ray Serve keeps running."""

    max_replicas: int = Field(1, ge=1)
    """Most replicas Ray Serve may start under load."""

    target_ongoing_requests: float = Field(4.0, gt=0)
    """Ongoing requests per replica that autoscaling aims for."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class DeploymentConfig(_Section):
    num_replicas: int = Field(1, ge=1)
    """Fixed replica count (ignored when ``autoscaling`` is set)."""

    autoscaling: AutoscalingConfig | None = None
    """Let Ray Serve scale replicas between bounds instead of a fixed count."""

    num_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per replica (fractions share a core)."""

    num_gpus: float = Field(0.0, ge=0, le=1)
    """GPU fraction per replica. Requested only when the cluster has GPUs; ignored on CPU."""

    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica handles at once; also caps what a batch can gather."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources the replica needs (e.g. ``{"expert_node": 1}`` to pin it to a node)."""


class PoolSettings(_Section):
    max_batch_size: int = Field(PoolConfig.model_fields["max_batch_size"].default, ge=1)
    """Most requests the expert pool decodes together (per model); more wait for a free slot, and a
    request leaves the batch as soon as it is done. The default is the library's
    (``experts.pool.PoolConfig.max_batch_size``): one number whether the pool serves or runs alone."""

    batch_wait_timeout_s: float = Field(0.02, ge=0)
    """How long an idle pool waits after a first request for others to share its prefill pass;
    requests that arrive while a batch runs join it at the next decoding step without waiting."""

    max_full_experts_per_replica: int = Field(2, ge=1)
    """Full-weight experts one ``full_experts`` replica keeps loaded; the least recently used is
    unloaded when another is asked for. Size it to the replica's memory (a 135M model: ~0.5 GiB
    in fp32 on CPU, ~0.1 GiB at 4-bit on GPU)."""

    torch_threads: int = Field(0, ge=0)
    """Threads torch may use in each pool replica; 0 = every core of the machine. (Ray gives
    actors with fractional CPUs one thread by default, which would starve the decoder.)"""

    cpu_dtype: Literal["auto", "float32", "bfloat16"] | None = None
    """Precision of pool replicas on CPU nodes: ``auto`` is bf16 where the node's CPU has bf16
    instructions (1.6-1.75x on the jury there, same quality), else float32; None leaves it to each
    node's ``MOSE_CPU_DTYPE``, else ``auto`` (see ``experts.policy.DevicePolicy.cpu_dtype``)."""

    def pool_config(self, max_new_tokens: int, **fields: Any) -> PoolConfig:
        """The library's :class:`experts.pool.PoolConfig` for one replica on this node: these
        settings, ``max_new_tokens`` as its cap, and ``fields`` for what a role sets itself."""
        from experts.policy import DevicePolicy

        # None reads the node's MOSE_CPU_DTYPE when the replica starts, not where the config was made.
        policy = DevicePolicy() if self.cpu_dtype is None else DevicePolicy(cpu_dtype=self.cpu_dtype)
        settings = {
            "max_new_tokens_limit": max_new_tokens,
            "max_batch_size": self.max_batch_size,
            "batch_wait_s": self.batch_wait_timeout_s,
            "policy": policy,
        }
        return PoolConfig(**{**settings, **fields})


class UpstreamConfig(_Section):
    base_url: str = ""
    """OpenAI-compatible base URL of the single large model (e.g. https://api.example.com/v1)."""

    model: str = "auto"
    """Model name sent to the upstream."""

    api_key: SecretStr | None = None
    """API key sent to the upstream (``MOSE_SERVE__UPSTREAMS__<NAME>__API_KEY``)."""

    timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for the upstream's answer."""

    crosscheck: bool = True
    """Cross-check every upstream answer with the jury and attach the verdict."""


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster to join (``auto`` or ``host:port``). None starts an embedded local Ray."""

    num_cpus: int | None = None
    """CPUs given to an embedded local Ray (default: all of them)."""

    object_store_memory_mb: int = Field(256, ge=75)
    """Object store size of an embedded local Ray."""


class ServeConfig(BaseSettings):
    """Everything ``mose serve`` needs. Defaults run on one CPU machine with no token set."""

    model_config = SettingsConfigDict(
        env_prefix="MOSE_SERVE__",
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
    )

    http: HttpConfig = Field(default_factory=HttpConfig)
    """HTTP ingress address."""

    auth: AuthConfig = Field(default_factory=AuthConfig)
    """Admin authentication."""

    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    """Request limits and admission control."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Where Ray runs."""

    ingress: DeploymentConfig = Field(default_factory=DeploymentConfig)
    """The FastAPI ingress deployment."""

    router: DeploymentConfig = Field(default_factory=DeploymentConfig)
    """The router deployment (ONNX Runtime)."""

    expert_pool: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=1.0, num_gpus=0.5, max_ongoing_requests=64)
    )
    """One deployment per base model hosting its LoRA experts."""

    full_experts: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.25, num_gpus=0.25, max_ongoing_requests=32)
    )
    """Full-weight experts, loaded on demand per replica (Ray Serve model multiplexing)."""

    crosscheck: DeploymentConfig = Field(default_factory=DeploymentConfig)
    """The cross-check jury deployment."""

    pool: PoolSettings = Field(default_factory=PoolSettings)
    """Mixed-adapter batching and threads in the expert pool."""

    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    """Large models reachable as ``model: "upstream:<name>"``."""

    home: Path | None = None
    """mose data directory (default: $MOSE_HOME or ./.mose)."""

    @field_validator("upstreams")
    @classmethod
    def _upstream_names(cls, value: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
        for name, upstream in value.items():
            if not upstream.base_url:
                raise ValueError(f"upstream {name!r} needs a base_url")
        return value

    @model_validator(mode="after")
    def _insecure_only_on_loopback(self) -> ServeConfig:
        if self.auth.admin_mode == "insecure" and self.http.host not in LOOPBACK_HOSTS:
            raise ValueError(
                f"auth.insecure_local opens the admin endpoints without a token, so http.host must be a "
                f"loopback address ({', '.join(LOOPBACK_HOSTS)}), not {self.http.host!r}; set MOSE_ADMIN_TOKEN instead"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_config merges the layers itself (YAML < environment < overrides).
        return (init_settings,)


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServeConfig:
    """Load the server config from an optional YAML file, the environment and ``overrides``.

    YAML values are the base; environment variables and ``overrides`` (e.g. CLI flags) win.
    Errors name the offending field, e.g. ``limits.max_tokens: Input should be greater than 0``.
    """
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for layer in (_environment_layer(), overrides):
        data = _deep_merge(data, layer)
    try:
        return ServeConfig(**data)
    except Exception as exc:  # pydantic.ValidationError: reword as one clear line per problem
        raise MoseError(f"invalid server config{f' in {path}' if path else ''}: {_describe(exc)}") from None


def _environment_layer() -> dict[str, Any]:
    """``MOSE_SERVE__*`` variables as a nested dict, plus the short secret names."""
    layer: dict[str, Any] = EnvSettingsSource(ServeConfig, env_prefix="MOSE_SERVE__", env_nested_delimiter="__")()
    token = os.environ.get("MOSE_ADMIN_TOKEN")
    if token is not None:
        layer = _deep_merge(layer, {"auth": {"admin_token": token}})
    return layer


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MoseError(f"server config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MoseError(f"server config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MoseError(f"server config {path} must be a mapping at the top level")
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively; ``None`` in ``top`` means "not given" (unset CLI flags)."""
    merged = dict(base)
    for key, value in top.items():
        if value is None:
            continue
        if isinstance(value, dict):
            merged[key] = _deep_merge(merged.get(key) if isinstance(merged.get(key), dict) else {}, value)
        else:
            merged[key] = value
    return merged


def _describe(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        message = str(err.get("msg")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
