"""``mose keys``: team signing keys (ed25519, or ECDSA P-256 for OMS bundles) and the registry's
list of trusted teams."""

from __future__ import annotations

import argparse
from pathlib import Path

from serve.commands._common import add_common_flags, emit, home_of


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="make team signing keys and trust them",
        description="Teams sign their expert manifests with an ed25519 key, or their expert folders with an "
        "ECDSA P-256 key as an OpenSSF Model Signing (OMS) bundle; a registry that requires signatures accepts "
        "only experts signed by a trusted team.",
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])

    generate = sub.add_parser(
        "generate",
        help="make a key pair for a team",
        description="Write <home>/keys/TEAM.key (private, mode 0600: keep it secret) and TEAM.pub "
        "(public: give it to registry operators); with --type p256, TEAM.p256.key and TEAM.p256.pub.",
    )
    generate.add_argument("team", help="team name, a lowercase slug (e.g. law-team)")
    generate.add_argument(
        "--type",
        dest="key_type",
        choices=("ed25519", "p256"),
        default="ed25519",
        help="ed25519 (default) signs manifests (`mose expert sign`); p256 (ECDSA P-256) "
        "signs OMS bundles (`mose expert sign --format oms`)",
    )
    generate.add_argument("--force", action="store_true", help="replace an existing key pair")
    add_common_flags(generate)
    generate.set_defaults(func=_generate)

    trust = sub.add_parser(
        "trust",
        help="trust a team's public key in this registry",
        description="Add TEAM -> public key to trusted_keys in <home>/registry.yaml.",
    )
    trust.add_argument("team")
    trust.add_argument("public_key", help="path to TEAM.pub or TEAM.p256.pub, or the base64 ed25519 public key")
    trust.add_argument("--require", action="store_true", help="also turn on require_signatures")
    add_common_flags(trust)
    trust.set_defaults(func=_trust)


def _generate(args: argparse.Namespace) -> int:
    from registry.signing import generate_keypair

    if args.key_type == "p256":
        return _generate_p256(args)
    pair = generate_keypair(args.team, home_of(args).keys_dir, overwrite=args.force)
    payload = {
        "team": pair.team,
        "private_key": str(pair.private_key),
        "public_key": str(pair.public_key),
        "public_key_b64": pair.public_key_b64,
    }
    emit(
        args,
        payload,
        "\n".join(
            [
                f"private key: {pair.private_key} (mode 0600; keep it secret)",
                f"public key:  {pair.public_key}",
                f"sign a manifest:  mose expert sign manifest.yaml --key {pair.private_key}",
                f"trust this team in a registry:  mose keys trust {pair.team} {pair.public_key_b64}",
            ]
        ),
    )
    return 0


def _generate_p256(args: argparse.Namespace) -> int:
    from registry.oms import generate_keypair

    pair = generate_keypair(args.team, home_of(args).keys_dir, overwrite=args.force)
    payload = {
        "team": pair.team,
        "type": "p256",
        "private_key": str(pair.private_key),
        "public_key": str(pair.public_key),
        "fingerprint": pair.fingerprint,
    }
    emit(
        args,
        payload,
        "\n".join(
            [
                f"private key: {pair.private_key} (mode 0600; keep it secret)",
                f"public key:  {pair.public_key} ({pair.fingerprint})",
                f"sign an expert folder:  mose expert sign manifest.yaml --format oms --key {pair.private_key}",
                f"trust this team in a registry:  mose keys trust {pair.team} {pair.public_key}",
            ]
        ),
    )
    return 0


def _trust(args: argparse.Namespace) -> int:
    from registry.oms import fingerprint, is_p256_public_key
    from registry.oms import load_public_key as load_p256_public_key
    from registry.settings import RegistrySettings
    from registry.signing import load_public_key, public_key_b64

    home = home_of(args)
    path = Path(args.public_key).expanduser()
    text = path.read_text(encoding="utf-8") if path.is_file() else args.public_key
    if is_p256_public_key(text):  # kept as PEM: P-256 keys have no short form
        value = text.strip() + "\n"
        payload = {"type": "p256", "fingerprint": fingerprint(load_p256_public_key(text, args.team))}
    else:
        value = public_key_b64(load_public_key(text, args.team))
        payload = {"type": "ed25519", "public_key_b64": value}
    settings = RegistrySettings.load(home)
    update = {"trusted_keys": {**settings.trusted_keys, args.team: value}}
    if args.require:
        update["require_signatures"] = True
    written = settings.model_copy(update=update).save(home)
    emit(args, {"team": args.team, **payload, "settings": str(written)}, f"team {args.team!r} is trusted ({written})")
    return 0
