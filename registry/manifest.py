"""The expert manifest: what a community team submits with its files.

A manifest is a small YAML (or JSON) document. :class:`ExpertManifest` is its schema: unknown
fields are refused, every rule is checked here except the domain names, which depend on the
registry's taxonomy and are checked at registration (:meth:`registry.Taxonomy.require_known`).
``mose expert schema`` prints :func:`manifest_json_schema` for teams and their editors.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from registry.errors import ManifestError

MIN_EXAMPLE_QUERIES = 20
NAME_PATTERN = r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$"
VERSION_PATTERN = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z]+(?:\.[0-9A-Za-z]+)*))?$"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DOMAIN_PATTERN = r"^[a-z][a-z0-9_]*$"
ED25519_SIGNATURE_BYTES = 64
REQUIRED_CONFIG = {"lora": "adapter_config.json", "full": "config.json"}
_FAST_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present


class Resources(BaseModel):
    """What one loaded copy of the expert costs; the expert pool uses it to place experts."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    memory_mb: int = Field(gt=0)
    """Estimated memory in MiB to hold the expert's own weights (for a LoRA: the adapter only)."""


class Signature(BaseModel):
    """An ed25519 signature over the manifest's canonical bytes (see :func:`canonical_bytes`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    team: str = Field(pattern=NAME_PATTERN, max_length=64)
    """The signing team; its public key must be in the registry's ``trusted_keys``."""

    algorithm: Literal["ed25519"] = "ed25519"
    """Signature algorithm; only ed25519 is accepted."""

    value: str
    """The signature, base64-encoded (64 bytes once decoded)."""

    @field_validator("value")
    @classmethod
    def _is_base64_signature(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise PydanticCustomError("signature_encoding", "signature value is not valid base64") from None
        if len(raw) != ED25519_SIGNATURE_BYTES:
            raise PydanticCustomError(
                "signature_length",
                "an ed25519 signature is {expected} bytes, this one is {got}",
                {"expected": ED25519_SIGNATURE_BYTES, "got": len(raw)},
            )
        return value


class ExpertManifest(BaseModel):
    """Everything the registry needs to know about one version of one expert."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    name: str = Field(pattern=NAME_PATTERN, min_length=2, max_length=64)
    """Expert name: a lowercase slug (letters, digits, ``-`` or ``_``), e.g. ``demo-law``."""

    version: str = Field(pattern=VERSION_PATTERN)
    """Semantic version ``MAJOR.MINOR.PATCH`` (optionally ``-prerelease``). ``name@version`` is
    immutable once registered: publish changed files under a new version."""

    kind: Literal["lora", "full"]
    """``lora``: a peft LoRA adapter on ``base_model``; ``full``: a complete model."""

    base_model: str | None = None
    """Base model id the adapter was trained on (required for ``lora``), e.g. ``smollm2-135m-instruct``."""

    files: dict[str, str] = Field(min_length=1)
    """Every file of the expert: relative path (``/``-separated, inside the expert folder) ->
    lowercase hex sha256. Only safetensors weights and small JSON/tokenizer/text files."""

    domains: list[str] = Field(min_length=1)
    """Taxonomy domain ids the expert serves (``mose expert domains`` lists them), most specific
    first, e.g. ``[cardiology]`` or ``[law]``."""

    description: str = Field(min_length=1, max_length=2000)
    """One or two sentences: what the expert is good at."""

    owner: str = Field(min_length=1, max_length=200)
    """The team or person responsible for the expert (contact for problems)."""

    license: str = Field(min_length=1, max_length=100)
    """Licence of the weights, e.g. an SPDX id such as ``Apache-2.0``."""

    example_queries: list[str]
    """At least 20 realistic user queries the expert should answer; they train the router."""

    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Quantisation the expert is meant to be served with (applied on CUDA only)."""

    resources: Resources
    """Memory estimate used to place the expert."""

    metrics: dict[str, FiniteFloat] = Field(default_factory=dict)
    """Optional evaluation figures, e.g. ``{"heldout_loss": 1.83}``."""

    signature: Signature | None = None
    """Team signature (added by ``mose expert sign``); required when the registry requires signatures."""

    @field_validator("files")
    @classmethod
    def _check_files(cls, files: dict[str, str]) -> dict[str, str]:
        for relpath, digest in files.items():
            _check_relpath(relpath)
            if not SHA256_PATTERN.match(digest):
                raise PydanticCustomError(
                    "sha256",
                    "{path}: '{digest}' is not a sha256 digest (64 lowercase hex characters)",
                    {"path": relpath, "digest": digest},
                )
        return files

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, domains: list[str]) -> list[str]:
        for domain in domains:
            if not re.match(DOMAIN_PATTERN, domain):
                raise PydanticCustomError(
                    "domain_id",
                    "'{domain}' is not a domain id (lowercase letters, digits and _)",
                    {"domain": domain},
                )
        if len(set(domains)) != len(domains):
            raise PydanticCustomError("domain_repeat", "a domain is listed twice")
        return domains

    @field_validator("example_queries")
    @classmethod
    def _check_queries(cls, queries: list[str]) -> list[str]:
        blank = [i for i, q in enumerate(queries) if not q.strip()]
        if blank:
            raise PydanticCustomError("blank_query", "example query {index} is empty", {"index": blank[0]})
        if len(queries) < MIN_EXAMPLE_QUERIES:
            raise PydanticCustomError(
                "too_few_queries",
                "at least {minimum} example queries are needed (got {got})",
                {"minimum": MIN_EXAMPLE_QUERIES, "got": len(queries)},
            )
        return queries

    @model_validator(mode="after")
    def _lora_needs_base(self) -> ExpertManifest:
        if self.kind == "lora" and not self.base_model:
            raise PydanticCustomError(
                "base_model_required", "base_model: required for a lora expert (e.g. smollm2-135m-instruct)"
            )
        return self

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


def _check_relpath(relpath: str) -> None:
    """A manifest path must stay inside the expert folder on every platform."""
    path = PurePosixPath(relpath)
    bad = (
        not relpath
        or "\\" in relpath
        or path.is_absolute()
        or re.match(r"^[A-Za-z]:", relpath) is not None
        or any(part in ("..", ".", "") for part in relpath.split("/"))
    )
    if bad:
        raise PydanticCustomError(
            "relpath",
            "'{path}' must be a relative path inside the expert folder (no absolute path, no '..')",
            {"path": relpath},
        )


def check_layout(manifest: ExpertManifest, source: str = "manifest") -> None:
    """The files a loader needs for the manifest's kind are listed (checked after file safety, so an
    unsafe file is reported as such rather than as a missing config)."""
    config = REQUIRED_CONFIG[manifest.kind]
    if config not in manifest.files or not any(path.endswith(".safetensors") for path in manifest.files):
        layout = "peft" if manifest.kind == "lora" else "transformers"
        raise ManifestError(
            f"{source}: files: a {manifest.kind} expert needs {config} and its weights as .safetensors "
            f"(Hugging Face {layout} layout)"
        )


def canonical_bytes(manifest: ExpertManifest) -> bytes:
    """The bytes a signature covers: the manifest without ``signature``, as sorted-key compact JSON."""
    payload = manifest.model_dump(mode="json", exclude={"signature"})
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`ExpertManifest` (``mose expert schema``)."""
    schema = ExpertManifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mose expert manifest"
    return schema


def parse_manifest(data: Any, source: str = "manifest") -> ExpertManifest:
    """Validate already-parsed manifest data; errors name ``source`` and each offending field."""
    if not isinstance(data, dict):
        raise ManifestError(
            f"{source}: the manifest must be a mapping of fields (name, version, ...), got {type(data).__name__}"
        )
    try:
        return ExpertManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def load_manifest(path: str | Path) -> ExpertManifest:
    """Read a manifest from a YAML or JSON file; every problem becomes a :class:`ManifestError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path.name}: cannot read the manifest: {exc}") from None
    return parse_manifest(_parse_text(text, path), source=path.name)


def dump_manifest(manifest: ExpertManifest, path: str | Path) -> None:
    """Write a manifest as JSON (``.json``) or YAML (anything else), fields in schema order."""
    path = Path(path)
    data = manifest.model_dump(mode="json", exclude_none=True)
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def _parse_text(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{path.name}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
            ) from None
    try:
        return yaml.load(text, Loader=_FAST_YAML_LOADER)
    except yaml.YAMLError:
        pass
    try:  # the pure-Python parser words its errors better (and the same on every machine)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path.name}: not valid YAML{_yaml_where(exc)}: {_yaml_problem(exc)}") from None


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem and context:
        return f"{problem} {context}"
    return problem or str(exc)


_ALLOWED_FIELDS = ", ".join(ExpertManifest.model_fields)


def _describe(err: dict[str, Any]) -> str:
    """One pydantic error as ``field: what is wrong`` in words a manifest author understands."""
    where = ".".join(str(part) for part in err["loc"])
    kind = err["type"]
    if kind == "missing":
        message = "required field is missing"
    elif kind == "extra_forbidden":
        message = f"unknown field (allowed fields: {_ALLOWED_FIELDS})" if len(err["loc"]) == 1 else "unknown field"
    elif kind == "string_pattern_mismatch" and where == "name":
        message = "must be a lowercase slug of letters, digits, '-' or '_' (e.g. demo-law)"
    elif kind == "string_pattern_mismatch" and where == "version":
        message = "must be a semantic version MAJOR.MINOR.PATCH (e.g. 1.0.0)"
    elif kind == "base_model_required":
        return err["msg"]
    else:
        message = err["msg"]
    return f"{where}: {message}" if where else message
