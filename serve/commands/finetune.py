"""``mose expert finetune``: added to the ``expert`` group by :mod:`serve.commands.expert`."""

from __future__ import annotations

import argparse


def add_expert_subcommands(expert_sub: "argparse._SubParsersAction") -> None:
    """Register ``finetune`` under ``mose expert`` (filled in by the experts work)."""
