"""The ``mose`` command line.

Each command group lives in :mod:`serve.commands` and registers its own sub-parser; this
module only assembles them, sets the offline environment, and turns :class:`MoseError`
into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from registry.errors import MoseError

# Order is the order shown by `mose --help`.
COMMAND_MODULES = ("up", "models", "expert", "keys", "team", "audit", "demo", "router", "crosscheck", "serve")

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def set_offline_env() -> None:
    """mose never downloads at run time: make the Hugging Face libraries fail fast instead."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mose",
        description="mose: a mixture of small experts. Register community experts, route queries "
        "to them, cross-check large-model answers, and serve it all on Ray Serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"serve.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_offline_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
