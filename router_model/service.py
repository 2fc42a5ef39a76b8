"""The router's top-level operations, as the CLI and the server call them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from router_model.config import RouterConfig
from router_model.data import assemble, load_jsonl, split_heldout, write_jsonl


def train_and_publish(
    home,
    files: Sequence[str | os.PathLike] = (),
    registry=None,
    config: RouterConfig | None = None,
    exclude_domains: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Full training on ``files`` + the registry's active experts; returns the new version dir."""
    from router_model.export import write_artifact
    from router_model.train import train_router

    config = config or RouterConfig()
    data = assemble(
        files,
        registry,
        heldout_fraction=config.heldout_fraction,
        validation_fraction=config.validation_fraction,
        salt=config.split_salt,
        max_rows_per_label=config.max_rows_per_label,
        exclude_domains=exclude_domains,
    )
    trained = train_router(data, config, progress=progress)
    return write_artifact(home.router_dir, trained, data, config)


def write_split(path: str | os.PathLike, out_dir: str | os.PathLike, config: RouterConfig | None = None) -> dict:
    """Write ``<stem>.train.jsonl`` and ``<stem>.heldout.jsonl``: the exact split training uses."""
    config = config or RouterConfig()
    train, heldout = split_heldout(load_jsonl(path), config.heldout_fraction, config.split_salt)
    out_dir = Path(out_dir)
    stem = Path(path).stem
    result = {}
    for name, rows in (("train", train), ("heldout", heldout)):
        target = out_dir / f"{stem}.{name}.jsonl"
        result[name] = {"path": str(target), "rows": len(rows), "sha256": write_jsonl(rows, target)}
    return result
