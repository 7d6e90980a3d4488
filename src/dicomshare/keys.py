"""Secret key files (the audit trail's, de-identification projects'), made once.

A key is 32 random bytes in a file of mode 0600 in a folder of mode 0700. It is made by
writing a complete temporary file and hard-linking it into place, so processes racing to
create the same key all end up reading one and the same.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_BYTES = 32


class KeyFileError(Exception):
    """The key file cannot be read, made, or is too short."""


def load_or_create_key(path: Path, min_bytes: int = 16) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        try:
            _create(path)
            key = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot create the key {path}: {exc}") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read the key {path}: {exc}") from exc
    if len(key) < min_bytes:
        raise KeyFileError(f"the key {path} is too short ({len(key)} bytes, at least "
                           f"{min_bytes})")
    return key


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: use that one
    finally:
        os.unlink(tmp)
