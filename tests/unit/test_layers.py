"""The layer contract of pyproject.toml's [tool.importlinter] holds: registry at the bottom,
experts and router_model independent of each other, the jury above both, serve on top."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def lint_imports() -> str:
    found = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return found


def test_the_layer_contract_is_kept():
    result = subprocess.run([lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "mose layers KEPT" in result.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """A copy of the tree where registry imports serve breaks the contract (the check is live)."""
    for package in ("registry", "experts", "router_model", "jury", "serve"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "registry" / "errors.py", "a", encoding="utf-8") as out:
        out.write("\nimport serve.config  # noqa: E402\n")
    result = subprocess.run(
        [lint_imports(), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0 and "registry.errors -> serve.config" in result.stdout, result.stdout[-3000:]
