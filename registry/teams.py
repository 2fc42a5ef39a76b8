"""Teams: who may write which experts, and with which keys they sign.

The operator creates a team (``mose team create NAME``) and hands its token to the team. The
token (``mose_team_<name>_<43 random url-safe characters>``) is shown once; the registry keeps
only a salted HMAC-SHA256 of it and compares in constant time. A team token may register,
update and retire the experts whose manifest ``owner`` is the team; activating and quarantining
stay with the operator. A team's registered public keys (with its ``trusted_keys`` entry, if any)
are the only keys that may sign the experts it owns: ed25519 keys check manifest signatures,
ECDSA P-256 keys check OMS bundles.

Who acted is a :class:`Principal`: the operator (any audit name, ``operator`` over HTTP) or a
team (``team:<name>`` in the audit log). Tokens never reach the audit log, logs or errors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from registry.errors import MoseError
from registry.manifest import NAME_PATTERN
from registry.store import StoredTeam

TOKEN_PREFIX = "mose_team_"
SECRET_CHARS = 43
"""Length of the random part: ``secrets.token_urlsafe(32)`` (256 bits)."""
OPERATOR = "operator"
TEAM_ACTOR_PREFIX = "team:"


@dataclass(frozen=True)
class Principal:
    """Who makes a change: the operator (``team`` None) or one team."""

    actor: str
    """The name the audit log records: ``operator`` (or another operator label) or ``team:<name>``."""
    team: str | None = None
    """The team acting, or None for the operator."""

    @classmethod
    def of_team(cls, team: str) -> Principal:
        return cls(f"{TEAM_ACTOR_PREFIX}{team}", team)

    @classmethod
    def operator(cls, actor: str = OPERATOR) -> Principal:
        return cls(actor, None)


def as_principal(actor: str | Principal) -> Principal:
    """A plain actor string is an operator action under that name (the CLI, a component)."""
    return actor if isinstance(actor, Principal) else Principal.operator(actor)


class Team(BaseModel):
    """A team as the registry knows it (its token hash is never part of it)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    name: str
    """Team name: the ``owner`` of the experts it may write."""
    public_keys: list[str]
    """Public keys that may sign the team's experts: ed25519 as base64 of the raw 32 bytes (manifest
    signatures), ECDSA P-256 as PEM (OMS bundles)."""
    created_at: datetime
    """When the team was created (UTC)."""
    rotated_at: datetime | None = None
    """When its token was last replaced."""
    revoked_at: datetime | None = None
    """When its token was revoked (None: the token works)."""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @classmethod
    def from_stored(cls, row: StoredTeam) -> Team:
        return cls(
            name=row.name,
            public_keys=json.loads(row.public_keys_json),
            created_at=row.created_at,
            rotated_at=row.rotated_at,
            revoked_at=row.revoked_at,
        )


def new_token(team: str) -> str:
    """A fresh token for ``team``."""
    return f"{TOKEN_PREFIX}{team}_{secrets.token_urlsafe(32)}"


def new_salt() -> str:
    return secrets.token_hex(16)


def hash_token(token: str, salt: str) -> str:
    """HMAC-SHA256 of the token keyed by its random salt (hex). The token has 256 random bits, so a
    fast hash suffices; the salt keeps equal tokens from having equal hashes."""
    return hmac.new(bytes.fromhex(salt), token.encode("utf-8"), hashlib.sha256).hexdigest()


def token_matches(token: str, salt: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(token, salt).encode("ascii"), stored_hash.encode("ascii"))


def looks_like_team_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX)


def team_of_token(token: str) -> str | None:
    """The team name a token claims, or None when it is not shaped like a team token."""
    if not looks_like_team_token(token) or len(token) < len(TOKEN_PREFIX) + SECRET_CHARS + 2:
        return None
    head, sep = token[len(TOKEN_PREFIX) : -SECRET_CHARS - 1], token[-SECRET_CHARS - 1]
    if sep != "_" or not re.fullmatch(NAME_PATTERN, head) or len(head) > 64:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_-]+", token[-SECRET_CHARS:]):
        return None
    return head


def check_team_name(name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name) or len(name) > 64:
        raise MoseError(
            f"team {name!r}: use a lowercase slug of letters, digits, '-' or '_' (e.g. law-team), "
            "at most 64 characters; it is the `owner` its experts' manifests name"
        )
