"""The one data directory where mose keeps its state.

Layout (see DESIGN.md): ``registry.db``, ``artifacts/`` (content-addressed), ``router/``
(versioned router artifacts), ``crosscheck/`` (calibrators), ``cache/`` (converted base
weights), ``keys/`` (team key pairs made by ``mose keys generate``).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

HOME_ENV = "MOSE_HOME"
CACHE_ENV = "MOSE_CACHE"
DEFAULT_HOME = ".mose"


class MoseHome(BaseModel):
    """Paths inside one mose data directory. Cheap to build; creates folders on demand."""

    model_config = ConfigDict(frozen=True)

    root: Path
    """The data directory. Default ``./.mose``; override with ``MOSE_HOME``."""

    cache_root: Path | None = None
    """Where converted base weights live. Default ``<root>/cache``; ``MOSE_CACHE`` overrides it
    so several data directories (tests, benchmarks) can share one conversion."""

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> MoseHome:
        """Resolve the data directory: explicit argument, then ``$MOSE_HOME``, then ``./.mose``."""
        chosen = root if root is not None else os.environ.get(HOME_ENV, DEFAULT_HOME)
        cache = os.environ.get(CACHE_ENV)
        return cls(
            root=Path(chosen).expanduser().resolve(),
            cache_root=Path(cache).expanduser().resolve() if cache else None,
        )

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def db_path(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / "registry.db"

    @property
    def artifacts_dir(self) -> Path:
        return self._dir("artifacts")

    @property
    def router_dir(self) -> Path:
        return self._dir("router")

    @property
    def crosscheck_dir(self) -> Path:
        return self._dir("crosscheck")

    @property
    def cache_dir(self) -> Path:
        if self.cache_root is not None:
            self.cache_root.mkdir(parents=True, exist_ok=True)
            return self.cache_root
        return self._dir("cache")

    @property
    def keys_dir(self) -> Path:
        return self._dir("keys")
