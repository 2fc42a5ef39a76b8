"""Content-addressed artifact store: every blob lives at ``sha256/<aa>/<hex>`` under the root.

A blob becomes visible only complete and verified: it is written to ``tmp/`` on the same
filesystem, fsynced, checked against its expected digest, renamed into place (atomic), and
the directory is fsynced. Identical content is stored once. A crash leaves at worst a stale
file in ``tmp/`` (never under ``sha256/``) or an unreferenced complete blob; :meth:`ArtifactStore.gc`
removes both.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from registry.errors import ArtifactError

CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """The lowercase hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ArtifactStore:
    """Blobs addressed by sha256 under ``root``."""

    def __init__(self, root: Path, chunk_hook: Callable[[], None] | None = None) -> None:
        self.root = Path(root)
        self.blob_root = self.root / "sha256"
        self.tmp_root = self.root / "tmp"
        # Called after each chunk is written; tests use it to be killed in the middle of a copy.
        self._chunk_hook = chunk_hook

    def path_for(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        return self.blob_root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def put_file(self, source: Path, expected_sha256: str) -> Path:
        """Copy ``source`` in as the blob ``expected_sha256``; an existing identical blob is reused.

        The copy is hashed as it is written, so a file changed after it was checked is refused
        (:class:`ArtifactError`) and nothing becomes visible.
        """
        if self.has(expected_sha256):
            return self.put_chunks(iter(()), expected_sha256, source.name)
        with open(source, "rb") as src:
            return self.put_chunks(
                iter(lambda: src.read(CHUNK_BYTES), b""),
                expected_sha256,
                source.name,
                hint="make sure nothing writes to the expert folder and retry",
            )

    def put_chunks(
        self,
        chunks: Iterator[bytes],
        expected_sha256: str,
        what: str,
        problem: str = "changed while it was being copied",
        hint: str = "retry",
    ) -> Path:
        """Write ``chunks`` as the blob ``expected_sha256`` (temp file, fsync, verify, rename); an
        existing blob is reused and the chunks are not read. Bytes that hash otherwise are refused."""
        final = self.path_for(expected_sha256)
        if final.is_file():
            os.utime(final)  # fresh mtime: gc() leaves recently (re)used blobs alone
            return final
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{expected_sha256[:12]}.", suffix=".part", dir=self.tmp_root)
        tmp = Path(tmp_name)
        try:
            actual = self._write_hashing(chunks, fd)
            if actual != expected_sha256:
                raise ArtifactError(f"{what}: {problem} (sha256 {actual}, expected {expected_sha256}); {hint}")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)  # atomic: readers see nothing or the whole blob
            fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def _write_hashing(self, chunks: Iterator[bytes], fd: int) -> str:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst:
            for chunk in chunks:
                dst.write(chunk)
                digest.update(chunk)
                if self._chunk_hook is not None:
                    dst.flush()
                    self._chunk_hook()
            dst.flush()
            os.fsync(dst.fileno())
        return digest.hexdigest()

    def blobs(self) -> Iterator[str]:
        """Digests of every complete blob."""
        if not self.blob_root.is_dir():
            return
        for shard in sorted(self.blob_root.iterdir()):
            for blob in sorted(shard.iterdir()):
                yield blob.name

    def verify(self, sha256: str) -> str | None:
        """Re-hash one blob: None when intact, else a message saying what is wrong."""
        path = self.path_for(sha256)
        if not path.is_file():
            return f"blob {sha256} is missing from {path.parent}"
        actual = sha256_file(path)
        if actual != sha256:
            return f"blob {path} is corrupted: its content hashes to {actual}"
        return None

    def gc(self, referenced: set[str], stale_after_s: float = 3600.0) -> list[str]:
        """Delete unreferenced blobs and temp files older than ``stale_after_s``; return what went.

        The age limit protects registrations in flight, whose blobs exist before their record.
        """
        cutoff = time.time() - stale_after_s
        removed = []
        for sha in list(self.blobs()):
            path = self.path_for(sha)
            if sha not in referenced and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed.append(sha)
        if self.tmp_root.is_dir():
            for part in self.tmp_root.iterdir():
                if part.stat().st_mtime < cutoff:
                    part.unlink(missing_ok=True)
                    removed.append(part.name)
        return removed
