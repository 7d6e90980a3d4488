"""Registered DICOM application entities: the peers we send to, and who may connect.

An AE title is the only name a DICOM peer gives; the registry ties it to a host and port
(for C-MOVE destinations and ``dicomshare send``) and, later, to the organisation that
owns what it stores. Unknown callers are refused at association time unless the server
runs with ``--dicom-accept-unknown``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine

from dicomshare.errors import Conflict, InvalidInput, NotFound
from dicomshare.storage import schema as s

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash


@dataclass(frozen=True)
class RemoteAE:
    ae_title: str
    host: str
    port: int
    description: str | None = None


def check_ae_title(title: str) -> str:
    """PS3.5 AE: 1-16 characters, no backslash or control characters, not all spaces."""
    cleaned = title.strip()
    if not cleaned or not _AE_TITLE.match(title) or len(title) > 16:
        raise InvalidInput(f"{title!r} is not a valid AE title (1-16 printable characters, "
                           "no backslash)")
    return cleaned


class AERegistry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, ae_title: str, host: str, port: int, description: str | None = None,
            replace: bool = False) -> RemoteAE:
        title = check_ae_title(ae_title)
        if not host.strip():
            raise InvalidInput("host is empty")
        if not 0 < port < 65536:
            raise InvalidInput(f"port {port} is not between 1 and 65535")
        row = {"host": host.strip(), "port": port, "description": description}
        with self.engine.begin() as conn:
            exists = conn.execute(select(s.remote_ae.c.pk)
                                  .where(s.remote_ae.c.ae_title == title)).first()
            if exists and not replace:
                raise Conflict(f"AE {title} is already registered (use --replace to change it)")
            if exists:
                conn.execute(update(s.remote_ae).where(s.remote_ae.c.ae_title == title)
                             .values(**row))
            else:
                conn.execute(insert(s.remote_ae).values(ae_title=title,
                                                        created_at=datetime.now(UTC), **row))
        return RemoteAE(title, row["host"], port, description)  # type: ignore[arg-type]

    def remove(self, ae_title: str) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(delete(s.remote_ae)
                                .where(s.remote_ae.c.ae_title == ae_title.strip()))
        if done.rowcount == 0:
            raise NotFound(f"no registered AE {ae_title!r}")

    def get(self, ae_title: str) -> RemoteAE | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(s.remote_ae.c.ae_title, s.remote_ae.c.host, s.remote_ae.c.port,
                       s.remote_ae.c.description)
                .where(s.remote_ae.c.ae_title == ae_title.strip())).first()
        return RemoteAE(*row) if row else None

    def require(self, ae_title: str) -> RemoteAE:
        found = self.get(ae_title)
        if found is None:
            raise NotFound(f"no registered AE {ae_title!r}: add it with "
                           f"`dicomshare ae add {ae_title.strip()} --host H --port P`")
        return found

    def all(self) -> list[RemoteAE]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(s.remote_ae.c.ae_title, s.remote_ae.c.host, s.remote_ae.c.port,
                       s.remote_ae.c.description).order_by(s.remote_ae.c.ae_title)).all()
        return [RemoteAE(*row) for row in rows]
