"""``mose team``: teams that register and retire their own experts over HTTP (operator commands)."""

from __future__ import annotations

import argparse
from pathlib import Path

from serve.commands._common import add_common_flags, emit, home_of

TOKEN_NOTE = (
    "This token is shown once and stored only as a hash: give it to the team now. It goes in "
    "'Authorization: Bearer <token>' on POST /v1/experts, /v1/experts/NAME/retire."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "team",
        help="create teams, rotate or revoke their tokens, record their keys",
        description="A team's token lets it register, update and retire the experts it owns (manifest "
        "`owner` = team name) over HTTP, and nothing else; its public keys are the only keys that may sign "
        "its experts. These commands are for the registry operator (they need the registry's files).",
    )
    sub = parser.add_subparsers(dest="team_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])

    create = _sub(
        sub,
        "create",
        _create,
        "create a team and print its token (once)",
        "Create team NAME with its public keys and print its token. The token is shown only "
        "now; the registry keeps a salted hash.",
    )
    create.add_argument("name", help="team name, a lowercase slug: the `owner` of its experts' manifests")
    create.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="FILE",
        help="a public key that may sign the team's experts: ed25519 (TEAM.pub, or base64) for "
        "manifest signatures, ECDSA P-256 (TEAM.p256.pub) for OMS bundles; repeatable",
    )

    rotate = _sub(
        sub,
        "rotate",
        _rotate,
        "replace a team's token (print the new one once)",
        "Give team NAME a new token; the old one stops working at once. Reinstates a revoked team.",
    )
    rotate.add_argument("name")

    revoke = _sub(
        sub,
        "revoke",
        _revoke,
        "make a team's token stop working",
        "Revoke team NAME's token: it is refused from now on. Its experts and keys stay; "
        "`mose team rotate NAME` issues a new token.",
    )
    revoke.add_argument("name")
    revoke.add_argument("--reason", default=None, help="why (recorded in the audit log)")

    add_key = _sub(
        sub,
        "add-key",
        _add_key,
        "register another public key of a team",
        "Add a public key that may sign the team's experts: ed25519 (TEAM.pub from `mose keys "
        "generate`, or base64) checks manifest signatures, ECDSA P-256 (TEAM.p256.pub from `mose keys "
        "generate --type p256`) checks OMS bundles.",
    )
    add_key.add_argument("name")
    add_key.add_argument(
        "--key", required=True, metavar="FILE", help="TEAM.pub or TEAM.p256.pub, or the base64 ed25519 public key"
    )

    remove_key = _sub(
        sub,
        "remove-key",
        _remove_key,
        "stop accepting a key's signatures on a team's experts",
        "Remove a public key from team NAME (experts already registered stay).",
    )
    remove_key.add_argument("name")
    remove_key.add_argument(
        "--key", required=True, metavar="FILE", help="TEAM.pub or TEAM.p256.pub, or the base64 ed25519 public key"
    )

    _sub(sub, "list", _list, "list teams (never their tokens)", "List teams, their keys and token status.")


def _sub(sub, name: str, func, help_text: str, description: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=description)
    add_common_flags(parser)
    if name != "list":
        parser.add_argument("--actor", default="operator", help="who makes the change (audit log)")
    parser.set_defaults(func=func)
    return parser


def _open(args: argparse.Namespace):
    from registry import Registry

    return Registry.open(home_of(args))


def _key_text(value: str) -> str:
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if path.is_file() else value


def _summary(team) -> dict:
    return {
        "name": team.name,
        "public_keys": team.public_keys,
        "created_at": team.created_at.isoformat(),
        "rotated_at": team.rotated_at.isoformat() if team.rotated_at else None,
        "revoked_at": team.revoked_at.isoformat() if team.revoked_at else None,
    }


def _with_token(args: argparse.Namespace, team, token: str, verb: str) -> int:
    emit(
        args,
        {**_summary(team), "token": token},
        f"team {team.name!r} {verb} ({len(team.public_keys)} public key(s)).\n{TOKEN_NOTE}\n\n{token}",
    )
    return 0


def _create(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        team, token = reg.create_team(args.name, [_key_text(k) for k in args.key], actor=args.actor)
    return _with_token(args, team, token, "created")


def _rotate(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        team, token = reg.rotate_team_token(args.name, actor=args.actor)
    return _with_token(args, team, token, "has a new token; the old one no longer works")


def _revoke(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        team = reg.revoke_team(args.name, actor=args.actor, reason=args.reason)
    emit(args, _summary(team), f"team {team.name!r}: token revoked; `mose team rotate {team.name}` issues a new one")
    return 0


def _add_key(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        team = reg.add_team_key(args.name, _key_text(args.key), actor=args.actor)
    emit(args, _summary(team), f"team {team.name!r} has {len(team.public_keys)} public key(s)")
    return 0


def _remove_key(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        team = reg.remove_team_key(args.name, _key_text(args.key), actor=args.actor)
    emit(args, _summary(team), f"team {team.name!r} has {len(team.public_keys)} public key(s)")
    return 0


def _list(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        teams = reg.teams()
    if not teams:
        emit(args, [], "no teams (create one with `mose team create NAME --key TEAM.pub`)")
        return 0
    rows = [["NAME", "KEYS", "TOKEN", "CREATED"]] + [
        [
            t.name,
            str(len(t.public_keys)),
            f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked else "valid",
            f"{t.created_at:%Y-%m-%d %H:%M}",
        ]
        for t in teams
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    emit(args, [_summary(t) for t in teams], text)
    return 0
