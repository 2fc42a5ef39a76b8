"""``mose up``: the README's main command — get a working mose on this machine.

Runs every preparation step that is not done yet (each one is idempotent and cached under
MOSE_HOME), then reports what is registered. Later steps start the server.
"""

from __future__ import annotations

import argparse
import sys

from serve.commands._common import add_common_flags, emit, home_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "up",
        help="prepare everything mose needs (first run slow, cached after) and report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(parser)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="prepare the data directory and exit without starting the server (used on cluster heads)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experts.base_models import prepare_base_models
    from registry import Registry

    home = home_of(args)
    print(f"mose: data directory {home.root}", file=sys.stderr)
    models = prepare_base_models(home)
    registry = Registry.open(home)
    experts = [
        {"name": r.name, "version": r.version, "status": r.status, "domains": r.domains}
        for r in registry.list()
    ]
    payload = {"home": str(home.root), "base_models": models.model_dump(mode="json"), "experts": experts}
    lines = [f"mose is ready in {home.root}", f"{len(experts)} expert(s) registered:"]
    lines += [f"  {e['name']}@{e['version']}  [{e['status']}]  {', '.join(e['domains'])}" for e in experts]
    emit(args, payload, "\n".join(lines))
    return 0
