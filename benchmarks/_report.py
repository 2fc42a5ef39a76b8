"""What the benchmarks share: the markdown table they print, the JSON file of the same figures
(``--json FILE``) and the memory of a process tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIXED_DOMAIN_PROMPTS = [
    "What are the symptoms of type 2 diabetes?",
    "Solve for x: 3x + 5 = 20.",
    "What is a fiduciary duty?",
    "How does compound interest work?",
    "Write a Python function that reverses a string.",
    "What is the boiling point of water at sea level?",
    "Who wrote Pride and Prejudice?",
    "What is inflation?",
]
"""Short questions across the demo verticals that the speed benchmarks send in turn."""


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """``title``, then (measure, value, notes) rows as a markdown table (pasted into docs/benchmarks.md)."""
    width = max(len(row[0]) for row in rows)
    print(f"\n{title}\n")
    print(f"| {'measure'.ljust(width)} | value | notes |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")


def write_json(path: str | Path | None, figures: Any) -> None:
    """Write ``figures`` (the printed table's numbers) to ``path`` as JSON; nothing without a path."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists; anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants (a server with its Ray workers), MiB."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # a worker that exited while we looked
            pass
    return total / 2**20
