"""Docs, docstrings, comments and help text say what the code does now: ``scripts/check_narration``
finds no development timeline (numbered sessions or rounds, "tried and not kept", throwaway
/tmp paths, issue numbers) anywhere in the repository, and finds each of those where it is."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_narration"


@pytest.fixture(scope="module")
def narration():
    loader = importlib.machinery.SourceFileLoader("check_narration", str(SCRIPT))
    spec = importlib.util.spec_from_loader("check_narration", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_repository_narrates_no_development_history(narration):
    hits = narration.check(REPO)
    assert not hits, "narration in docs, docstrings or help text:\n" + "\n".join(hits)


@pytest.mark.parametrize("text, marker", [
    ("Latest figures (session 12, quiet machine).", "numbered session"),
    ("as measured in sessions 3-4", "numbered session"),
    ("the session-7 rows", "numbered session"),
    ("Earlier, in development round 3, ...", "development round"),
    ("round 2 of the tuning", "development round"),
    ("Tried and not kept (the grid over depths):", "tried and not kept"),
    ("a throwaway script on the saved evidence", "throwaway run"),
    ("python /tmp/s8/own_pilot.py", "throwaway /tmp path"),
    ("--home /tmp/rx/fresh/home", "throwaway /tmp path"),
    ("the values that meet issue 4's targets", "issue number"),
])  # fmt: skip
def test_each_marker_is_found(narration, text, marker):
    assert narration.find_markers(text) == [marker]


@pytest.mark.parametrize("text", [
    "Ray's logs are in /tmp/ray/session_latest/logs/serve/.",
    "One ONNX Runtime session per replica; a pytest session fixture.",
    "A throwaway PostgreSQL server for the tests.",
    "a round trip through the registry, rounded to 3 decimals",
    "Measured at commit 9b25967 on 2026-11-22 (2 CPU cores).",
    "the previously active version is retired",
])  # fmt: skip
def test_ordinary_words_are_not_markers(narration, text):
    assert narration.find_markers(text) == []


def test_python_is_read_in_strings_and_comments_only(narration, tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        '"""Docstring: session 4 figures."""\n'
        "session_4 = 1  # comment: tried and not kept\n"
        "parser.add_argument('--x', help='see /tmp/s9/x.py')\n"
        "round_3 = session_4\n"
    )
    lines = {line for line, text in narration.texts_of(source) if narration.find_markers(text)}
    assert lines == {1, 2, 3}


def test_the_script_exits_non_zero_and_names_file_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("# Notes\n\nFigures of session 9 below.\n")
    (tmp_path / "clean.md").write_text("What the code does now.\n")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "docs/notes.md:3: numbered session" in done.stdout
    assert "clean.md" not in done.stdout
