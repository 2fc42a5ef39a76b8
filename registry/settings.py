"""Registry settings: ``<home>/registry.yaml``, then environment variables.

Example ``registry.yaml``::

    require_signatures: true
    trusted_keys:
      law-team: keys/law-team.pub        # a path (relative to the home), PEM text, or base64
      med-team: keys/med-team.p256.pub   # an ECDSA P-256 key: checks the team's OMS bundles
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import MoseError
from registry.home import MoseHome

SETTINGS_FILE = "registry.yaml"
REQUIRE_SIGNATURES_ENV = "MOSE_REQUIRE_SIGNATURES"
COPY_CHUNK_DELAY_ENV = "MOSE_TEST_COPY_CHUNK_DELAY_S"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class RegistrySettings(BaseModel):
    """How strict the registry is about provenance."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    require_signatures: bool = False
    """Refuse any manifest without a valid signature from a trusted team
    (env ``MOSE_REQUIRE_SIGNATURES=1`` overrides the file)."""

    trusted_keys: dict[str, str] = Field(default_factory=dict)
    """Team -> public key, one per team: ed25519 (checks manifest signatures; PEM text, base64 of the
    32 raw bytes) or ECDSA P-256 (checks OMS bundles of the experts the team owns; PEM text), or a
    path to a ``.pub`` file (relative paths are inside the mose home)."""

    copy_chunk_delay_s: float = Field(default=0.0, ge=0.0)
    """Testing only: pause after each 1 MiB copied into the artifact store (env
    ``MOSE_TEST_COPY_CHUNK_DELAY_S``), so a test can kill a registration mid-copy."""

    @classmethod
    def load(cls, home: MoseHome) -> RegistrySettings:
        """Read ``<home>/registry.yaml`` if it exists, then apply the environment overrides."""
        path = home.root / SETTINGS_FILE
        data: dict = {}
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise MoseError(f"{path}: not valid YAML: {exc}") from None
        if REQUIRE_SIGNATURES_ENV in os.environ:
            data["require_signatures"] = _env_bool(REQUIRE_SIGNATURES_ENV)
        if COPY_CHUNK_DELAY_ENV in os.environ:
            data["copy_chunk_delay_s"] = float(os.environ[COPY_CHUNK_DELAY_ENV])
        try:
            settings = cls.model_validate(data)
        except ValidationError as exc:
            raise MoseError(f"{path}: {exc}") from None
        return settings.model_copy(update={"trusted_keys": _resolve_keys(settings.trusted_keys, home.root)})

    def save(self, home: MoseHome) -> Path:
        """Write the file settings (not the testing hook) to ``<home>/registry.yaml``."""
        path = home.root / SETTINGS_FILE
        data = self.model_dump(exclude={"copy_chunk_delay_s"})
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path


def _env_bool(name: str) -> bool:
    value = os.environ[name].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise MoseError(f"{name}={os.environ[name]!r}: use 1/true/yes or 0/false/no")


def _is_raw_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _resolve_keys(keys: dict[str, str], root: Path) -> dict[str, str]:
    """Replace key-file paths by their contents; PEM and base64 values pass through."""
    resolved = {}
    for team, value in keys.items():
        text = value.strip()
        if "BEGIN" not in text and not _is_raw_key(text):
            path = (root / text).expanduser()
            if not path.is_file():
                raise MoseError(f"trusted_keys.{team}: key file {path} not found")
            text = path.read_text(encoding="utf-8").strip()
        resolved[team] = text
    return resolved
