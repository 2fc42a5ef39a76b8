"""The printed tables of benchmarks/mixture.py: every system measured gets its rows, and a run
that left out the one-run generalist prints neither its rows nor its interval."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# loaded by path: putting benchmarks/ on sys.path would shadow the registry package with
# benchmarks/registry.py for every test collected after this one
_SPEC = importlib.util.spec_from_file_location(
    "mixture_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "mixture.py"
)
mixture = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mixture)
MIXED, SYSTEMS, table = mixture.MIXED, mixture.SYSTEMS, mixture.table


def _result(systems: list[str]) -> dict:
    figures = {
        s: {"nll": 2.0 + i / 10, "similarity": 0.5, "degenerate": 0.0, "echo": 0.0, "empty": 0.0, "loop": 0.0}
        for i, s in enumerate(systems)
    }
    figures[MIXED] = {"nll": 1.9}
    interval = {"estimate": -0.01, "low": -0.02, "high": 0.0}
    return {
        "verticals": ["law"],
        "systems": [*systems, MIXED],
        "per_vertical": {v: {**figures, "routed_to_own": 1.0} for v in ("law", "overall")},
        "auto_minus_generalist_nll": interval,
        "auto_minus_one_run_generalist_nll": interval if "one_run_generalist" in systems else None,
        "auto_minus_oracle_nll": 0.0,
        "top2_minus_auto_nll": interval,
        "top2_mixed_share": 0.5,
    }


def test_every_system_gets_a_row_in_both_tables():
    printed = table(_result(list(SYSTEMS)))
    for system in SYSTEMS:
        assert printed.count(f"| {system} |") == 2  # NLL table and greedy-answer table
    assert "auto - one_run_generalist" in printed


def test_a_run_without_the_one_run_generalist_prints_neither_its_rows_nor_its_interval():
    systems = [s for s in SYSTEMS if s != "one_run_generalist"]
    printed = table(_result(systems))
    assert "one_run_generalist" not in printed
    assert printed.count("| generalist |") == 2
    assert "auto - generalist NLL: -0.010" in printed
