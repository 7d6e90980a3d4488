"""Blobs in a folder, content-addressed by SHA-256: ``blobs/ab/cd/abcd...``.

Crash safety comes from the order of operations: write to ``blobs/tmp/``, fsync, rename
into place, fsync the folder. A crash leaves either nothing visible or a complete blob
that the index may not know yet (``dicomshare check`` finds and repairs those).
Keys are hex digests, so nothing a client sends ever becomes part of a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
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

    def write(self, data: bytes) -> None:
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

    def sync_and_close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self.close()


class FilesystemBlobStore:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.fsync = fsync
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise NotFound(f"no blob {key[:80]!r}")
        return self.root / key[:2] / key[2:4] / key

    def new_temp(self) -> FileTemp:
        return FileTemp(self.tmp / f"{uuid.uuid4().hex}.part")

    def commit(self, temp: FileTemp) -> str:
        try:
            if self.fsync:
                temp.sync_and_close()
            else:
                temp.close()
            key = temp.sha256()
            final = self._path(key)
            if final.exists():
                temp.path.unlink(missing_ok=True)
                return key
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp.path, final)
            if self.fsync:
                _fsync_dir(final.parent)
            return key
        except OSError as exc:
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

    def keys(self) -> Iterator[str]:
        for path in self.root.glob("??/??/*"):
            if _KEY.match(path.name):
                yield path.name

    def temp_leftovers(self, min_age: float = 3600) -> list[Path]:
        """Partial uploads left by a crash; never visible, safe to delete.

        Younger files may belong to an upload in progress, so they are left alone.
        """
        cutoff = time.time() - min_age
        return sorted(p for p in self.tmp.glob("*.part") if p.stat().st_mtime < cutoff)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
