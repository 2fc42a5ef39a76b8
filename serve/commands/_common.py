"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from registry.home import MoseHome


def add_common_flags(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """Flags every command accepts: the data directory and, where useful, JSON output."""
    parser.add_argument(
        "--home",
        default=None,
        help="mose data directory (default: $MOSE_HOME or ./.mose)",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def home_of(args: argparse.Namespace) -> MoseHome:
    return MoseHome.from_env(getattr(args, "home", None))


def emit(args: argparse.Namespace, payload: Any, text: str | None = None) -> None:
    """Print ``payload`` as JSON with ``--json``, else ``text`` (or indented JSON)."""
    if getattr(args, "json", False) or text is None:
        json.dump(payload, sys.stdout, indent=None if getattr(args, "json", False) else 2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)
