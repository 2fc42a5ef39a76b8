"""Team signatures on manifests (ed25519, via ``cryptography``).

A team makes a key pair once (``mose keys generate TEAM``: ``<home>/keys/TEAM.key``, mode 0600,
and ``TEAM.pub``), signs each manifest (``mose expert sign``), and the registry operator lists
the team's public key under ``trusted_keys`` in ``registry.yaml`` or registers it with the team
(``mose team create --key``, ``mose team add-key``). The signature covers
:func:`registry.manifest.canonical_bytes`, which includes every file digest, so it vouches for
the weights too. A team's registered keys may also be ECDSA P-256 keys (:func:`normalise_public_key`):
those check its OMS bundles (:mod:`registry.oms`), never ed25519 signatures.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from registry.errors import ConflictError, SignatureError
from registry.manifest import NAME_PATTERN, ExpertManifest, Signature, canonical_bytes


@dataclass(frozen=True)
class KeyPairPaths:
    """Where ``generate_keypair`` wrote the team's keys."""

    team: str
    private_key: Path
    public_key: Path
    public_key_b64: str


def generate_keypair(team: str, keys_dir: Path, overwrite: bool = False) -> KeyPairPaths:
    """Make an ed25519 key pair for ``team``: ``TEAM.key`` (PEM, mode 0600) and ``TEAM.pub`` (PEM)."""
    import re

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not re.match(NAME_PATTERN, team):
        raise SignatureError(f"team {team!r}: use a lowercase slug of letters, digits, '-' or '_' (e.g. law-team)")
    keys_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = keys_dir / f"{team}.key", keys_dir / f"{team}.pub"
    if private_path.exists() and not overwrite:
        raise ConflictError(
            f"{private_path} already exists; pass --force to replace it (old signatures stop verifying)"
        )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_private(private_path, private_pem)
    public_path.write_bytes(public_pem)
    return KeyPairPaths(team, private_path, public_path, public_key_b64(key.public_key()))


def _write_private(path: Path, data: bytes) -> None:
    """Create the file with mode 0600 from the start (never readable by others, even briefly)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def public_key_b64(public_key) -> str:
    """Base64 of the 32 raw public-key bytes (the short form accepted in ``trusted_keys``)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_private_key(path: str | Path):
    """Read an ed25519 private key written by :func:`generate_keypair`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(f"{path}: key file not found (make one with `mose keys generate TEAM`)") from None
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an ed25519 key (mose signs with ed25519 only)")
    return key


def load_public_key(text: str, team: str = "?"):
    """A public key from PEM text or base64 of the 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = text.strip()
    try:
        if "BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"trusted key of team {team!r} is not a valid ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"trusted key of team {team!r} is not an ed25519 key")
    return key


def normalise_public_key(text: str, team: str) -> str:
    """The form a team's registered public key is kept in: base64 of the 32 raw bytes for an ed25519
    key (PEM or base64 given; it checks manifest signatures), the PEM SubjectPublicKeyInfo for an
    ECDSA P-256 key (PEM given; it checks OMS bundles). Anything else is refused, naming the team."""
    from registry.oms import _p256_or_none, _public_pem

    if (p256 := _p256_or_none(text)) is not None:
        return _public_pem(p256).decode("ascii")
    try:
        return public_key_b64(load_public_key(text, team))
    except SignatureError:
        raise SignatureError(
            f"public key of team {team!r} is neither an ed25519 key (TEAM.pub from `mose keys generate`, or base64 "
            "of its 32 bytes) nor an ECDSA P-256 key (TEAM.p256.pub from `mose keys generate --type p256`)"
        ) from None


def sign_manifest(manifest: ExpertManifest, private_key, team: str) -> ExpertManifest:
    """A copy of ``manifest`` carrying ``team``'s signature over its canonical bytes."""
    value = base64.b64encode(private_key.sign(canonical_bytes(manifest))).decode("ascii")
    signature = Signature(team=team, algorithm="ed25519", value=value)
    return manifest.model_copy(update={"signature": signature})


def verify_manifest(manifest: ExpertManifest, trusted_keys: dict[str, str], required: bool) -> str:
    """Check the manifest's signature; return ``verified``, ``unsigned`` or ``untrusted-team``.

    With ``required``, a missing signature or a team without a trusted key is refused; a signature
    that does not verify against a known key is refused always.
    """
    signature = manifest.signature
    ref = manifest.ref
    if signature is None:
        if required:
            raise SignatureError(
                f"{ref}: this registry requires signed manifests and this one has no signature; "
                "sign it with `mose expert sign MANIFEST --key TEAM.key`"
            )
        return "unsigned"
    key_text = trusted_keys.get(signature.team)
    if key_text is not None and _is_p256(key_text):
        if required:
            raise SignatureError(
                f"{ref}: signed by team {signature.team!r}, whose trusted key is an ECDSA P-256 key: it checks the "
                "team's OMS bundles, not ed25519 signatures; sign the expert folder with `mose expert sign "
                "MANIFEST --format oms`"
            )
        return "untrusted-team"
    if key_text is None:
        if required:
            trusted = ", ".join(sorted(trusted_keys)) or "none"
            raise SignatureError(
                f"{ref}: signed by team {signature.team!r}, whose key is not trusted by this registry "
                f"(trusted teams: {trusted}); ask the operator to add it to trusted_keys in registry.yaml"
            )
        return "untrusted-team"
    from cryptography.exceptions import InvalidSignature

    try:
        load_public_key(key_text, signature.team).verify(base64.b64decode(signature.value), canonical_bytes(manifest))
    except InvalidSignature:
        raise SignatureError(
            f"{ref}: the signature of team {signature.team!r} does not match the manifest "
            "(it was changed after signing, or signed with another key); sign it again"
        ) from None
    return "verified"


def _is_p256(key_text: str) -> bool:
    """A P-256 key (it checks OMS bundles, see :mod:`registry.oms`), never an ed25519 signature."""
    from registry.oms import is_p256_public_key

    return is_p256_public_key(key_text)


def _verifies(key_text: str, team: str, signature: bytes, payload: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        load_public_key(key_text, team).verify(signature, payload)
    except InvalidSignature:
        return False
    return True


def verify_owned_manifest(manifest: ExpertManifest, owner: str, team_keys: dict[str, list[str]], required: bool) -> str:
    """Check the signature of a manifest whose ``owner`` is a registered team: only a key of that team
    (``team_keys[owner]``) may sign it. Returns ``verified``, ``unsigned`` or ``untrusted-team``.

    A signature that verifies with another team's key is refused, naming both teams; one that
    verifies with no known key is refused when the owner has keys (or signatures are required).
    """
    signature, ref = manifest.signature, manifest.ref
    has_p256 = any(_is_p256(key) for key in team_keys.get(owner, []))
    if signature is None:
        if required:
            oms_hint = (
                f", or sign the expert folder with its P-256 key (`mose expert sign MANIFEST --format oms "
                f"--key {owner}.p256.key`)"
                if has_p256
                else ""
            )
            raise SignatureError(
                f"{ref}: this registry requires signed manifests and this one has no signature; "
                f"sign it with a key of team {owner!r}, its owner (`mose expert sign MANIFEST --key {owner}.key`)"
                + oms_hint
            )
        return "unsigned"
    try:
        value = base64.b64decode(signature.value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{ref}: the signature is not valid base64") from None
    payload = canonical_bytes(manifest)
    owner_keys = [key for key in team_keys.get(owner, []) if not _is_p256(key)]
    if any(_verifies(key, owner, value, payload) for key in owner_keys):
        return "verified"
    signer = next(
        (
            team
            for team, keys in sorted(team_keys.items())
            if team != owner and any(_verifies(key, team, value, payload) for key in keys if not _is_p256(key))
        ),
        None,
    )
    if signer is not None:
        raise SignatureError(
            f"{ref}: the signature is valid but was made with a key of team {signer!r}, and {ref} is owned by "
            f"team {owner!r}; only a key registered to team {owner!r} may sign its experts"
        )
    if not owner_keys:
        if required:
            if has_p256:
                raise SignatureError(
                    f"{ref}: owned by team {owner!r}, whose keys are all ECDSA P-256 keys: they check the team's OMS "
                    "bundles, not ed25519 signatures; sign the expert folder with `mose expert sign MANIFEST --format "
                    f"oms`, or ask the operator to add the team's ed25519 key (`mose team add-key {owner} --key "
                    f"{owner}.pub`)"
                )
            raise SignatureError(
                f"{ref}: owned by team {owner!r}, which has no public key registered, so its signature cannot be "
                f"checked; ask the operator to add one (`mose team add-key {owner} --key {owner}.pub`)"
            )
        return "untrusted-team"
    raise SignatureError(
        f"{ref}: the signature (team {signature.team!r}) does not verify against any key of team {owner!r}, its "
        "owner (it was changed after signing, or signed with another key); sign it again with the team's key"
    )
