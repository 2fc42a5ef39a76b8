"""A real, throwaway PostgreSQL server for the registry tests (Debian's ``postgresql`` package,
installed by scripts/bootstrap).

:func:`postgres_server` (session) runs ``initdb`` and ``pg_ctl start`` in a fresh folder under
/tmp on a free port (as the ``postgres`` user when the tests run as root: the server refuses
root), and stops it at the end. :func:`postgres_url` gives each test its own empty database and
sets ``MOSE_REGISTRY_URL`` to it, so ``Registry.open`` and every ``mose`` subprocess use it.
:func:`registry_backend` parametrises a test over both stores (``sqlite``, ``postgres``).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._fixtures.serve import free_port

SERVER_USER = "postgres"
DB_USER = "mose"


def postgres_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH), newest version first."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


@dataclass
class PostgresServer:
    """A running server: ``url(db)`` is a libpq URL (trust authentication on 127.0.0.1)."""

    port: int
    data_dir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        pytest.fail(
            f"the tests run as root and there is no {SERVER_USER!r} user for the PostgreSQL server "
            "(scripts/bootstrap installs Debian's postgresql package, which creates it)"
        )
    return ["runuser", "-u", SERVER_USER, "--", *command]


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own for this test session, on a free port; stopped at the end."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/bootstrap, which installs "
            "Debian's postgresql package"
        )
    # Under /tmp, not pytest's tmp_path: the server user must reach it, and socket paths are short.
    root = Path(tempfile.mkdtemp(prefix="mose-pg-"))
    data_dir = root / "data"
    data_dir.mkdir()
    if os.geteuid() == 0:
        os.chmod(root, 0o755)
        server = pwd.getpwnam(SERVER_USER)
        os.chown(data_dir, server.pw_uid, server.pw_gid)
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            DB_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-instructions",
        ],
        "initdb",
    )
    port = free_port()
    options = f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
    _run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data_dir),
            "-l",
            str(data_dir / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        "pg_ctl start",
    )
    try:
        yield PostgresServer(port=port, data_dir=data_dir)
    finally:
        subprocess.run(
            _as_server_user([str(bindir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(root, ignore_errors=True)


_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres_server, monkeypatch) -> Iterator[str]:
    """A fresh, empty database for one test; ``MOSE_REGISTRY_URL`` points at it (subprocesses too)."""
    import psycopg

    name = f"mose_test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = postgres_server.url(name)
    monkeypatch.setenv("MOSE_REGISTRY_URL", url)
    yield url
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def registry_backend(request, monkeypatch) -> str:
    """Run the test once on each store: ``sqlite`` (the embedded default, MOSE_REGISTRY_URL unset)
    and ``postgres`` (a fresh database on the session's server)."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_url")
    else:
        monkeypatch.delenv("MOSE_REGISTRY_URL", raising=False)
    return request.param
