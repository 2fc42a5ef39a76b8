"""``mose audit``: check and read the registry's hash-chained audit log."""

from __future__ import annotations

import argparse

from serve.commands._common import add_common_flags, emit, home_of


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="verify and read the audit log",
        description="Every registration, status change and removal is appended to a hash-chained log "
        "in the registry database.",
    )
    sub = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])

    verify = sub.add_parser(
        "verify",
        help="recompute the hash chain",
        description="Recompute every entry's hash; exit 1 and name the first altered entry if the chain is broken.",
    )
    add_common_flags(verify)
    verify.set_defaults(func=_verify)

    log = sub.add_parser("log", help="print audit entries", description="Print the audit log, oldest first.")
    log.add_argument("--limit", type=int, default=None, help="only the last N entries")
    add_common_flags(log)
    log.set_defaults(func=_log)


def _verify(args: argparse.Namespace) -> int:
    from registry import Registry

    with Registry.open(home_of(args)) as reg:
        report = reg.audit_verify()
    emit(args, report.model_dump(), report.message if report.ok else f"audit chain BROKEN: {report.message}")
    return 0 if report.ok else 1


def _log(args: argparse.Namespace) -> int:
    from registry import Registry

    with Registry.open(home_of(args)) as reg:
        entries = reg.audit_entries(limit=args.limit)
    lines = [f"{e.seq:>5}  {e.ts}  {e.actor:<12} {e.action:<11} {e.subject}" for e in entries]
    emit(args, [e.model_dump() for e in entries], "\n".join(lines) or "audit log is empty")
    return 0
