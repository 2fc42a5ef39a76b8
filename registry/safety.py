"""What files an expert may ship: safetensors weights and small JSON/tokenizer/text files.

Anything that can run code when loaded is refused: pickled weights (``.bin``, ``.pt``, ...,
recognised by extension *and* by content, so a renamed pickle is caught), Python or other code
files, and configs that ask transformers for remote code (``auto_map``, ``trust_remote_code``).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

from registry.errors import ArtifactError

WEIGHT_SUFFIXES = frozenset({".safetensors"})
JSON_SUFFIXES = frozenset({".json"})
TEXT_SUFFIXES = frozenset({".txt", ".model", ".md", ".jinja"})
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib", ".dill"})
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".ipynb", ".exe"})
REMOTE_CODE_KEYS = frozenset({"auto_map", "trust_remote_code"})
MAX_SMALL_FILE_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20
_SAFE_TYPES = "safetensors weights and small .json/.txt/.model/.md/.jinja files"


def check_expert_file(relpath: str, path: Path) -> int:
    """Refuse an unsafe or malformed file (:class:`ArtifactError`); return its size in bytes."""
    _check_regular(relpath, path)
    suffix = Path(relpath).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ArtifactError(
            f"{relpath}: {suffix} files hold pickled weights, which can run code when loaded; "
            "convert them to safetensors (e.g. model.save_pretrained(..., safe_serialization=True))"
        )
    if suffix in CODE_SUFFIXES:
        raise ArtifactError(f"{relpath}: code files are not accepted; an expert must load without custom code")
    if suffix not in WEIGHT_SUFFIXES | JSON_SUFFIXES | TEXT_SUFFIXES:
        raise ArtifactError(f"{relpath}: file type {suffix or '(none)'} is not accepted; allowed: {_SAFE_TYPES}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    if suffix in WEIGHT_SUFFIXES:
        # The structure check decides: a valid safetensors header length may itself begin with
        # bytes that look like pickle magic (0x80 0x02..0x05), so sniffing alone would refuse it.
        try:
            _check_safetensors(relpath, path, size)
        except ArtifactError:
            _refuse_serialized_code(relpath, head)  # say "pickle" when it is one
            raise
    else:
        _refuse_serialized_code(relpath, head)
        if size > MAX_SMALL_FILE_BYTES:
            raise ArtifactError(
                f"{relpath}: {size} bytes is too large for a {suffix} file (limit {MAX_SMALL_FILE_BYTES} bytes)"
            )
        if suffix in JSON_SUFFIXES:
            _check_json(relpath, path)
    return size


def _check_regular(relpath: str, path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{relpath}: listed in the manifest but not found at {path}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ArtifactError(f"{relpath}: is a symbolic link; copy the real file into the expert folder")
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{relpath}: is not a regular file")


def _refuse_serialized_code(relpath: str, head: bytes) -> None:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise ArtifactError(
            f"{relpath}: contains a Python pickle, which can run code when loaded; only safetensors weights are accepted"
        )
    if head.startswith(b"PK\x03\x04"):
        raise ArtifactError(
            f"{relpath}: is a zip archive (the torch.save format holds a pickle); only safetensors weights are accepted"
        )
    if head.startswith(b"\x93NUMPY"):
        raise ArtifactError(f"{relpath}: is a numpy array file, not safetensors")


def _check_safetensors(relpath: str, path: Path, size: int) -> None:
    """The header must be a JSON table of tensors whose data exactly fills the rest of the file."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ArtifactError(f"{relpath}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            raise ArtifactError(f"{relpath}: not a safetensors file (header length {header_len} does not fit the file)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtifactError(f"{relpath}: not a safetensors file (its header is not JSON)") from None
    data_bytes = size - 8 - header_len
    ends = []
    for name, entry in header.items() if isinstance(header, dict) else []:
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
            raise ArtifactError(f"{relpath}: not a safetensors file (tensor {name!r} has no dtype/shape/data_offsets)")
        ends.append(entry["data_offsets"][1])
    if not isinstance(header, dict) or max(ends, default=0) != data_bytes:
        raise ArtifactError(f"{relpath}: not a valid safetensors file (the tensor table does not match the data)")


def _check_json(relpath: str, path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{relpath}: not valid JSON ({exc})") from None
    key = find_remote_code_key(data)
    if key:
        raise ArtifactError(
            f"{relpath}: sets {key!r}, which makes transformers run code shipped with the model; "
            "experts must use the library's built-in architectures: remove it"
        )


def find_remote_code_key(data: object) -> str | None:
    """The first key anywhere in ``data`` that asks transformers to run shipped code, if any."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in REMOTE_CODE_KEYS and value not in (None, False, {}, []):
                return key
            if found := find_remote_code_key(value):
                return found
    elif isinstance(data, list):
        for item in data:
            if found := find_remote_code_key(item):
                return found
    return None
