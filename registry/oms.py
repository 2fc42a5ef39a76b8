"""OpenSSF Model Signing (OMS v1.0) bundles for expert folders, key-based (ECDSA P-256), offline.

A team signs its expert folder with a P-256 private key (``mose keys generate TEAM --type p256``,
then ``mose expert sign MANIFEST --format oms --key TEAM.p256.key``); the ``model-signing``
library writes the bundle: a Sigstore bundle holding a DSSE envelope whose in-toto statement
lists the sha256 of every file. No network, no Sigstore instance, no transparency log.

What a bundle covers (the same rule for signing and verifying):

* every file under the expert folder, recursively, the manifest included;
* except the bundle itself when it lies inside the folder (its path is recorded in the signed
  statement's ``ignore_paths``) and the library's default git paths (``.git``,
  ``.gitattributes``, ``.github``, ``.gitignore``).

A bundle verifies when its signature checks out with one of the allowed public keys and the
folder holds exactly the signed files with the signed digests: a changed file, a signed file
that is missing and a file the bundle does not cover are each refused by name. The registry
then also requires (:func:`check_covers_expert`) that the files listed in the manifest, and a
manifest file equal to the manifest being registered, are among the signed files, so the
bundle vouches for the metadata as well as the weights.

:func:`sign_folder` and :func:`verify_folder` are the public pair; both call the library's own
signer and verifier (``model_signing.signing`` / ``model_signing.verifying``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from registry.errors import SignatureError

BUNDLE_NAME = "model.sig"
"""The bundle's default file name, inside the expert folder (the library's default too)."""
MANIFEST_NAMES = ("manifest.yaml", "manifest.yml", "manifest.json")
"""Names a manifest file may have at the top of a signed folder."""
CURVE = "secp256r1"
_SHORT = 12  # digest characters shown in messages


@dataclass(frozen=True)
class OmsVerification:
    """What a verified bundle says."""

    key: str
    """Label of the allowed key that verified it (as passed to :func:`verify_folder`, e.g. the team)."""
    fingerprint: str
    """``sha256:<hex>`` of the key's PEM SubjectPublicKeyInfo (the bundle's own key hint)."""
    bundle: Path
    """The bundle file."""
    files: dict[str, str] = field(default_factory=dict)
    """Signed files: ``/``-separated path inside the folder -> sha256 hex."""

    def details(self) -> dict[str, object]:
        """The audit-log form (no key material, only its fingerprint)."""
        return {
            "format": "oms-v1",
            "status": "verified",
            "key": self.key,
            "fingerprint": self.fingerprint,
            "bundle": self.bundle.name,
            "files": len(self.files),
        }


# ------------------------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class P256KeyPair:
    """Where :func:`generate_keypair` wrote a team's P-256 keys."""

    team: str
    private_key: Path
    public_key: Path
    fingerprint: str


def generate_keypair(team: str, keys_dir: Path, overwrite: bool = False) -> P256KeyPair:
    """Make an ECDSA P-256 key pair for ``team``: ``TEAM.p256.key`` (PKCS#8 PEM, mode 0600) and
    ``TEAM.p256.pub`` (PEM), beside any ed25519 pair ``TEAM.key`` / ``TEAM.pub`` of the team."""
    import re

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from registry.errors import ConflictError
    from registry.manifest import NAME_PATTERN
    from registry.signing import _write_private

    if not re.match(NAME_PATTERN, team):
        raise SignatureError(f"team {team!r}: use a lowercase slug of letters, digits, '-' or '_' (e.g. law-team)")
    keys_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = keys_dir / f"{team}.p256.key", keys_dir / f"{team}.p256.pub"
    if private_path.exists() and not overwrite:
        raise ConflictError(f"{private_path} already exists; pass --force to replace it (old bundles stop verifying)")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(private_path, private_pem)
    public_path.write_bytes(_public_pem(key.public_key()))
    return P256KeyPair(team, private_path, public_path, fingerprint(key.public_key()))


def is_p256_public_key(text: str) -> bool:
    """True when ``text`` is a PEM public key on P-256 (so OMS bundles can be checked with it)."""
    return _p256_or_none(text) is not None


def p256_fingerprint(text: str) -> str | None:
    """:func:`fingerprint` of a PEM P-256 public key; None for any other text."""
    key = _p256_or_none(text)
    return fingerprint(key) if key is not None else None


def load_private_key(path: str | Path):
    """Read an unencrypted PEM P-256 private key; refuse anything else with a message that says why."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(
            f"{path}: key file not found (make one with `mose keys generate TEAM --type p256`)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE:
        raise SignatureError(
            f"{path}: not an ECDSA P-256 key (OMS bundles are signed with P-256; make one with "
            "`mose keys generate TEAM --type p256`)"
        )
    return key


def fingerprint(public_key) -> str:
    """``sha256:<hex>`` of the key's PEM SubjectPublicKeyInfo: the key hint the library puts in bundles."""
    return "sha256:" + hashlib.sha256(_public_pem(public_key)).hexdigest()


def _public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(text: str, label: str = "?"):
    """A P-256 public key from PEM text; :class:`SignatureError` (naming ``label``) for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(text.strip().encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise SignatureError(f"key {label!r} is not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE:
        raise SignatureError(f"key {label!r} is not an ECDSA P-256 key")
    return key


# ---------------------------------------------------------------------------------------- signing
def sign_folder(folder: str | Path, bundle_path: str | Path | None, private_key_path: str | Path) -> OmsVerification:
    """Sign every file under ``folder`` into an OMS bundle (default ``folder/model.sig``) with a P-256 key.

    Returns what was signed, in the same form :func:`verify_folder` returns.
    """
    import model_signing

    folder = Path(folder)
    if not folder.is_dir():
        raise SignatureError(f"{folder}: the expert folder does not exist")
    bundle = Path(bundle_path) if bundle_path is not None else folder / BUNDLE_NAME
    key = load_private_key(private_key_path)
    ignored = [rel] if (rel := _inside(bundle, folder)) is not None else []
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=ignored)
    try:
        (
            model_signing.signing.Config()
            .set_hashing_config(hashing)
            .use_elliptic_key_signer(private_key=Path(private_key_path))
            .sign(folder, bundle)
        )
    except ValueError as exc:  # e.g. a symbolic link in the folder
        raise SignatureError(f"{folder}: cannot sign the folder: {exc}") from None
    return OmsVerification(
        key=Path(private_key_path).name,
        fingerprint=fingerprint(key.public_key()),
        bundle=bundle,
        files=_read_bundle(bundle)[1],
    )


def _inside(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` (``/``-separated) when it lies inside it."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


# ------------------------------------------------------------------------------------- verifying
def verify_folder(folder: str | Path, bundle_path: str | Path, public_keys: Mapping[str, str]) -> OmsVerification:
    """Verify ``folder`` against the OMS bundle with one of ``public_keys`` (label -> PEM text).

    Keys that are not P-256 are skipped. Returns the key that verified and the signed files;
    raises :class:`SignatureError` naming the bundle and, for a file problem, each file.
    """
    folder, bundle = Path(folder), Path(bundle_path)
    if not bundle.is_file():
        raise SignatureError(f"OMS bundle {bundle} not found")
    statement, signed, hint = _read_bundle(bundle)
    keys = {label: key for label, text in public_keys.items() if (key := _p256_or_none(text)) is not None}
    if not keys:
        named = ", ".join(sorted(public_keys)) or "none"
        raise SignatureError(
            f"no ECDSA P-256 key to check the OMS bundle {bundle.name} with (allowed keys: {named}); "
            "OMS bundles need a P-256 key (`mose keys generate TEAM --type p256`)"
        )
    candidates = {
        label: key for label, key in keys.items() if hint is None or fingerprint(key).removeprefix("sha256:") == hint
    }
    if not candidates:
        allowed = ", ".join(f"{label} {fingerprint(key)[: 7 + _SHORT]}" for label, key in sorted(keys.items()))
        raise SignatureError(
            f"the OMS bundle {bundle.name} was signed with key sha256:{hint[:_SHORT]}, which is none of the "
            f"allowed keys ({allowed})"
        )
    for label, key in sorted(candidates.items()):
        outcome = _check_with_key(folder, bundle, key)
        if outcome == "files-differ":  # signature good, files differ
            raise SignatureError(_describe_mismatch(folder, bundle, statement, signed))
        if outcome == "verified":
            return OmsVerification(key=label, fingerprint=fingerprint(key), bundle=bundle, files=signed)
    tried = ", ".join(sorted(candidates))
    raise SignatureError(
        f"the signature of the OMS bundle {bundle.name} does not verify with key {tried} (the bundle was changed "
        "after signing, or signed with another key)"
    )


def bundle_signer(folder: str | Path, bundle_path: str | Path, public_keys: Mapping[str, str]) -> str | None:
    """The label of the key among ``public_keys`` (label -> PEM text; others skipped) whose signature the
    bundle carries, whether or not the folder still matches it; None when none of them made it (or the
    file is no OMS bundle). The registry names with it the team whose key signed another team's expert."""
    folder, bundle = Path(folder), Path(bundle_path)
    try:
        hint = _read_bundle(bundle)[2]
    except SignatureError:
        return None
    for label, text in sorted(public_keys.items()):
        key = _p256_or_none(text)
        if key is None or (hint is not None and fingerprint(key).removeprefix("sha256:") != hint):
            continue
        try:
            if _check_with_key(folder, bundle, key) in ("verified", "files-differ"):
                return label
        except SignatureError:
            continue
    return None


def _check_with_key(folder: Path, bundle: Path, key) -> str:
    """Run the library's verifier with one P-256 key: ``verified``, ``files-differ`` (the signature is
    the key's, the folder does not match the statement) or ``bad-signature`` (not this key's)."""
    import model_signing
    from cryptography.exceptions import InvalidSignature

    with tempfile.TemporaryDirectory(prefix="mose-oms-") as tmp:
        key_file = Path(tmp) / "key.pub"
        key_file.write_bytes(_public_pem(key))
        try:
            model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key_file).verify(folder, bundle)
        except InvalidSignature:
            return "bad-signature"
        except ValueError as exc:
            if str(exc).startswith("Signature mismatch"):
                return "files-differ"
            if str(exc).startswith("Key mismatch"):
                return "bad-signature"
            raise SignatureError(f"cannot check the folder against the OMS bundle {bundle.name}: {exc}") from None
    return "verified"


def _p256_or_none(text: str):
    try:
        return load_public_key(text, "?")
    except SignatureError:
        return None


def _read_bundle(bundle: Path) -> tuple[dict, dict[str, str], str | None]:
    """The in-toto statement inside the bundle as written (the library checks its signature), the files
    it lists (path -> sha256) and the bundle's key hint (sha256 hex of the signing key's PEM; absent in
    bundles older than OMS v1.0)."""
    try:
        data = json.loads(bundle.read_text(encoding="utf-8"))
        statement = json.loads(base64.b64decode(data["dsseEnvelope"]["payload"], validate=True))
        files = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
        serialization = statement["predicate"]["serialization"]
        method = (serialization.get("method"), serialization.get("hash_type"))
        hint = (data.get("verificationMaterial") or {}).get("publicKey", {}).get("hint")
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        binascii.Error,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
    ):
        raise SignatureError(
            f"{bundle.name} is not an OMS bundle (expected a Sigstore bundle with a DSSE envelope listing the "
            "model's files)"
        ) from None
    if method != ("files", "sha256"):
        raise SignatureError(
            f"the OMS bundle {bundle.name} hashes the model as {method[0]}/{method[1]}; mose takes bundles that "
            "list whole files with their sha256 (the library's default)"
        )
    return statement, files, (hint or None)


def _describe_mismatch(folder: Path, bundle: Path, statement: dict, signed: dict[str, str]) -> str:
    """Which files differ between the folder and the signed statement, each by name."""
    import model_signing

    ignored = statement["predicate"].get("serialization", {}).get("ignore_paths", [])
    actual_manifest = model_signing.hashing.Config().set_ignored_paths(paths=ignored).hash(folder)
    actual = {rd.identifier: rd.digest.digest_hex for rd in actual_manifest.resource_descriptors()}
    other_files = bool(signed) and not set(signed.items()) & set(actual.items())
    problems = []
    for name in sorted(signed.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"{name}: signed but missing from the folder")
        elif name not in signed and name == _inside(bundle, folder):
            problems.append(f"{name}: the bundle itself is not in its ignore_paths (sign with its path ignored)")
        elif name not in signed:
            problems.append(f"{name}: not covered by the bundle (an unsigned file)")
        elif signed[name] != actual[name]:
            problems.append(
                f"{name}: sha256 {actual[name][:_SHORT]} on disk, {signed[name][:_SHORT]} signed"
                + ("" if other_files else " (changed after signing)")
            )
    if other_files:
        return (
            f"the OMS bundle {bundle.name} was signed for other files (none of its {len(signed)} files is in "
            "this folder): " + "; ".join(problems)
        )
    return f"the OMS bundle {bundle.name} does not match the expert's files: " + "; ".join(problems)


# -------------------------------------------------------------------------- registry requirements
def check_covers_expert(verification: OmsVerification, folder: str | Path, manifest) -> str:
    """The bundle must vouch for the expert: each file of ``manifest.files`` signed with the manifest's
    digest, and a manifest file at the folder's top, signed, whose content is ``manifest``.

    Returns the signed manifest file's name.
    """
    from registry.errors import ManifestError
    from registry.manifest import load_manifest

    folder = Path(folder)
    name = verification.bundle.name
    for relpath, digest in sorted(manifest.files.items()):
        signed = verification.files.get(relpath)
        if signed is None:
            raise SignatureError(f"{relpath}: listed in the manifest but not covered by the OMS bundle {name}")
        if signed != digest:
            raise SignatureError(
                f"{relpath}: the manifest says sha256 {digest[:_SHORT]}, the OMS bundle {name} signed {signed[:_SHORT]}"
            )
    present = [n for n in MANIFEST_NAMES if n in verification.files]
    if not present:
        raise SignatureError(
            f"the OMS bundle {name} covers no manifest ({', '.join(MANIFEST_NAMES)} at the top of the folder); "
            "put the manifest in the expert folder and sign the folder again"
        )
    for candidate in present:
        path = folder / candidate
        try:
            same = hashlib.sha256(path.read_bytes()).hexdigest() == verification.files[candidate]
            same = same and load_manifest(path) == manifest
        except (OSError, ManifestError):
            same = False
        if same:
            return candidate
    raise SignatureError(
        f"{present[0]}: the manifest being registered is not the one the OMS bundle {name} signed; "
        "sign the folder again after the last change to the manifest"
    )
