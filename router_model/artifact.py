"""Versioned router artifacts under ``home.router_dir``.

Layout::

    router/
      current            -> text file naming the live version (replaced atomically)
      v0001/
        metadata.json    label map, experts, temperature, threshold, metrics, data hashes,
                         sha256 of every file below
        model.onnx       token ids + attention mask -> calibrated probabilities (fp32)
        model.int8.onnx  the same, int8 dynamic quantisation (only when it kept accuracy)
        tokenizer.json   the encoder's tokenizer
        weights.safetensors, encoder_config.json   torch weights, for incremental updates
        train.jsonl, validation.jsonl, heldout.jsonl   the exact rows used / held out

A version directory is built under a temporary name and renamed into place, then ``current``
is switched: readers never see a half-written version.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

from registry.artifacts import atomic_write
from registry.errors import MoseError, ServerError, UnavailableError
from router_model.data import file_sha256

CURRENT_FILE = "current"
METADATA_FILE = "metadata.json"
TRAIN_ROWS = "train.jsonl"
VALIDATION_ROWS = "validation.jsonl"
HELDOUT_ROWS = "heldout.jsonl"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
FORMAT_VERSION = 1


class RouterMetadata(BaseModel):
    """What ``metadata.json`` records about one router version."""

    format_version: int = FORMAT_VERSION
    """Layout version of the artifact."""
    version: str = ""
    """This version's directory name (``v0001`` ...)."""
    parent: str | None = None
    """The version an incremental update started from (None for a full training)."""
    created_at: str = ""
    """UTC time the version was written."""
    labels: list[str]
    """Output index -> domain."""
    experts: list[str] = Field(default_factory=list)
    """Active experts (name@version) the router was trained or updated for."""
    added_domains: list[str] = Field(default_factory=list)
    """Domains added by incremental updates since the last full training (head rows fitted on
    frozen embeddings)."""
    temperature: float
    """Temperature folded into the graph (probabilities = softmax(logits / T))."""
    threshold: float
    """Calibrated confidence below which the router abstains to the fallback."""
    min_support: float = 0.0
    """The router abstains when a query's best cosine similarity to a label centroid is below
    this (text unlike any training data)."""
    fine_tuned: bool
    """Whether the encoder was fine-tuned (True) or only the head was trained (False)."""
    onnx_file: str
    """The graph the runtime loads (``model.onnx`` or ``model.int8.onnx``)."""
    quantized: bool = False
    """Whether ``onnx_file`` is the int8 graph."""
    config: dict = Field(default_factory=dict)
    """The RouterConfig used (max_length, encoder_layers, ...)."""
    metrics: dict = Field(default_factory=dict)
    """Validation metrics measured while training/exporting."""
    data: dict = Field(default_factory=dict)
    """Training data provenance: labelled files with sha256, row counts and row digests."""
    files: dict[str, str] = Field(default_factory=dict)
    """File name -> sha256, checked when the runtime loads the artifact."""


def versions(router_dir: Path) -> list[str]:
    """Existing version directories, oldest first."""
    found = [p.name for p in router_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
    return sorted(found, key=lambda name: int(VERSION_PATTERN.match(name).group(1)))


def staging_dir(router_dir: Path) -> Path:
    """A fresh temporary directory inside ``router_dir`` to build a version in."""
    return Path(tempfile.mkdtemp(dir=router_dir, prefix=".building-"))


def publish(router_dir: Path, staging: Path, metadata: RouterMetadata) -> Path:
    """Hash the staged files, write metadata, rename to the next version, switch ``current``."""
    from datetime import UTC, datetime

    metadata.files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    metadata.created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    while True:
        existing = versions(router_dir)
        number = int(VERSION_PATTERN.match(existing[-1]).group(1)) + 1 if existing else 1
        metadata.version = f"v{number:04d}"
        (staging / METADATA_FILE).write_text(metadata.model_dump_json(indent=2))
        target = router_dir / metadata.version
        try:
            os.rename(staging, target)  # fails if another writer took this number first
            break
        except OSError:
            if not target.exists():
                raise
    set_current(router_dir, metadata.version)
    return target


def set_current(router_dir: Path, version: str) -> None:
    """Point ``current`` at ``version`` atomically (temp file + rename)."""
    if not (router_dir / version).is_dir():
        raise MoseError(f"router version {version} does not exist in {router_dir}")
    atomic_write(router_dir / CURRENT_FILE, version + "\n")


def current_dir(router_dir: Path) -> Path:
    """The live version's directory; a clear error when there is none."""
    pointer = router_dir / CURRENT_FILE
    if not pointer.is_file():
        raise UnavailableError(
            f"no router artifact in {router_dir}: train one with `mose router train --data "
            "../shared/data/routing_dev.jsonl` (the server answers with the fallback model meanwhile)"
        )
    version = pointer.read_text().strip()
    directory = router_dir / version
    if not VERSION_PATTERN.match(version) or not directory.is_dir():
        raise ServerError(
            f"router pointer {pointer} names {version!r}, which is not a version in {router_dir}: "
            "retrain with `mose router train` or point it at an existing version"
        )
    return directory


def read_metadata(directory: Path, verify: bool = True) -> RouterMetadata:
    """Metadata of a version; with ``verify``, every recorded file is checked against its sha256."""
    path = directory / METADATA_FILE
    try:
        metadata = RouterMetadata.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise ServerError(
            f"router artifact {directory} has no {METADATA_FILE}: retrain with `mose router train`"
        ) from None
    except ValueError as exc:
        raise MoseError(
            f"router artifact {directory}: {METADATA_FILE} is corrupted ({exc.__class__.__name__}): "
            "retrain with `mose router train`"
        ) from None
    if verify:
        for name, digest in metadata.files.items():
            file = directory / name
            if not file.is_file():
                raise ServerError(f"router artifact {directory} is missing {name}: retrain with `mose router train`")
            if file_sha256(file) != digest:
                raise MoseError(
                    f"router artifact {directory}: {name} does not match its recorded sha256 (corrupted "
                    "or edited): retrain with `mose router train`"
                )
    return metadata
