"""Blobs in a folder, content-addressed by SHA-256: ``blobs/ab/abcd...``.

Crash safety comes from the order of operations: write to ``blobs/tmp/``, fsync, rename
into place, fsync the folder. A crash leaves either nothing visible or a complete blob
that the index may not know yet (``dicomshare check`` finds and repairs those).
Keys are hex digests, so nothing a client sends ever becomes part of a path. The 256
fan-out folders are made (and made durable) once, when the store is opened, so storing
a blob never creates a folder: one folder fsync per blob is then enough.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dicomshare.errors import NotFound, StorageFailure

_KEY = re.compile(r"^[0-9a-f]{64}$")


class FileTemp:
    """A temporary blob being written; hashed as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = open(path, "xb")  # noqa: SIM115 - closed in close()
        self._synced: Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None, "write after close"
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None

    def start_sync(self, pool: ThreadPoolExecutor | None) -> None:
        """Close, and start the fsync in the background (``pool``) or not at all (None)."""
        self.close()
        if pool is not None and self._synced is None:
            self._synced = pool.submit(_fsync, self.path)

    def wait_synced(self) -> None:
        if self._synced is not None:
            self._synced.result()


class FilesystemBlobStore:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.fsync = fsync
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.deleting_dir = root / "deleting"
        self.deleting_dir.mkdir(exist_ok=True)
        fanout = [root / f"{i:02x}" for i in range(256)]
        if not all(d.is_dir() for d in fanout):
            for d in fanout:
                d.mkdir(exist_ok=True)
            if fsync:
                _fsync(root)
                _fsync(root.parent)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise NotFound(f"no blob {key[:80]!r}")
        return self.root / key[:2] / key

    def new_temp(self) -> FileTemp:
        return FileTemp(self.tmp / f"{uuid.uuid4().hex}.part")

    def start_sync(self, temp: FileTemp) -> None:
        """Let the fsync of a received blob run while its header is parsed."""
        temp.start_sync(_POOL if self.fsync else None)

    def commit_many(self, temps: list[FileTemp]) -> list[str]:
        """Make blobs durable under their keys: fsync each (in parallel), rename it into
        place, then fsync each folder once. Raises StorageFailure (and discards them all)."""
        try:
            for temp in temps:
                self.start_sync(temp)
            for temp in temps:
                temp.wait_synced()
            keys, folders = [], set()
            for temp in temps:
                key = temp.sha256()
                final = self._path(key)
                if final.exists():  # identical bytes are already stored
                    temp.path.unlink(missing_ok=True)
                else:
                    os.replace(temp.path, final)
                    folders.add(final.parent)
                keys.append(key)
            if self.fsync:
                list(_POOL.map(_fsync, folders))
            return keys
        except OSError as exc:
            for temp in temps:
                self.discard(temp)
            raise StorageFailure(f"could not store blob: {exc.strerror or exc}") from exc

    def discard(self, temp: FileTemp) -> None:
        temp.close()
        temp.path.unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {key} is missing from the store") from None

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.exists():
            raise NotFound(f"blob {key} is missing from the store")
        yield path

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def begin_delete(self, keys: list[str]) -> Path | None:
        """A journal of the keys a delete is about to unindex, fsynced before the index
        commit: if the process dies before the blobs are gone, ``check --repair`` removes
        them instead of re-indexing what was deleted."""
        if not keys:
            return None
        path = self.deleting_dir / f"{uuid.uuid4().hex}.keys"
        with open(path, "w", encoding="ascii") as out:
            out.write("\n".join(k for k in keys if _KEY.match(k)))
            out.flush()
            if self.fsync:
                os.fsync(out.fileno())
        if self.fsync:
            _fsync(self.deleting_dir)
        return path

    def end_delete(self, journal: object) -> None:
        if isinstance(journal, Path):
            journal.unlink(missing_ok=True)

    def deleting(self) -> set[str]:
        found: set[str] = set()
        for path in self.deleting_dir.glob("*.keys"):
            found |= {k for k in path.read_text("ascii", "replace").split() if _KEY.match(k)}
        return found

    def clear_deleting(self) -> None:
        for path in self.deleting_dir.glob("*.keys"):
            path.unlink(missing_ok=True)

    def keys(self) -> Iterator[str]:
        for path in self.root.glob("??/*"):
            if _KEY.match(path.name):
                yield path.name

    def temp_leftovers(self, min_age: float = 3600) -> list[Path]:
        """Partial uploads left by a crash; never visible, safe to delete.

        Younger files may belong to an upload in progress, so they are left alone.
        """
        cutoff = time.time() - min_age
        return sorted(p for p in self.tmp.glob("*.part") if p.stat().st_mtime < cutoff)


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")


def _fsync(path: Path) -> None:
    """fsync a file or a folder (for a folder: makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
