"""Registered DICOM application entities: the peers we send to, and who may connect.

An AE title is the only name a DICOM peer gives; the registry ties it to a host and port
(for C-MOVE destinations and ``dicomshare send``) and to the organisation it acts for:
what it stores belongs to that organisation, and it finds and retrieves what that
organisation may see, within its scopes (read, write). Unknown callers are refused at
association time unless the server runs with ``--dicom-accept-unknown``. A peer marked
``tls`` is only ever called over DICOM TLS (``dimse/tls.py``): the internet in between
must see no patient data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine

from dicomshare.access.policy import Principal, parse_scopes
from dicomshare.errors import Conflict, InvalidInput, NotFound
from dicomshare.storage import schema as s

_JOINED = s.remote_ae.outerjoin(s.organisation,
                                s.remote_ae.c.organisation_pk == s.organisation.c.pk)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash


@dataclass(frozen=True)
class RemoteAE:
    ae_title: str
    host: str
    port: int
    description: str | None = None
    organisation_pk: int | None = None
    organisation: str | None = None
    scopes: tuple[str, ...] = ("read", "write")
    tls: bool = False  # we call it over DICOM TLS (its port is then its TLS port)

    def principal(self, source: str | None = None) -> Principal:
        """The AE as a caller: a device of its organisation, limited to its scopes."""
        return Principal(f"AE {self.ae_title}", self.organisation or "", "clinician",
                         organisation_pk=self.organisation_pk,
                         scopes=frozenset(self.scopes), kind="ae",
                         source=source or self.ae_title)


_COLUMNS = (s.remote_ae.c.ae_title, s.remote_ae.c.host, s.remote_ae.c.port,
            s.remote_ae.c.description, s.remote_ae.c.organisation_pk, s.organisation.c.name,
            s.remote_ae.c.scopes, s.remote_ae.c.tls)


def _ae(row: Any) -> RemoteAE:
    return RemoteAE(row[0], row[1], row[2], row[3], row[4], row[5],
                    tuple(x for x in row[6].split(",") if x), bool(row[7]))


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
            replace: bool = False, organisation: str | None = None,
            scopes: Iterable[str] | str = ("read", "write"), tls: bool = False) -> RemoteAE:
        """Register (or with ``replace`` change) a peer. ``organisation`` may be omitted
        while the archive has exactly one; ``tls``: call it over DICOM TLS only."""
        title = check_ae_title(ae_title)
        if not host.strip():
            raise InvalidInput("host is empty")
        if not 0 < port < 65536:
            raise InvalidInput(f"port {port} is not between 1 and 65535")
        wanted = parse_scopes(scopes) & {"read", "write"}
        row = {"host": host.strip(), "port": port, "description": description,
               "organisation_pk": self._organisation(organisation),
               "scopes": ",".join(sc for sc in ("read", "write") if sc in wanted),
               "tls": bool(tls)}
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
        return self.require(title)

    def _organisation(self, name: str | None) -> int:
        with self.engine.connect() as conn:
            if name is not None:
                pk = conn.execute(select(s.organisation.c.pk)
                                  .where(s.organisation.c.name == name)).scalar()
                if pk is None:
                    raise NotFound(f"no organisation {name!r}")
                return int(pk)
            pks = conn.execute(select(s.organisation.c.pk).limit(2)).scalars().all()
        if len(pks) != 1:
            raise InvalidInput("say which organisation the AE title acts for (--org)")
        return int(pks[0])

    def remove(self, ae_title: str) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(delete(s.remote_ae)
                                .where(s.remote_ae.c.ae_title == ae_title.strip()))
        if done.rowcount == 0:
            raise NotFound(f"no registered AE {ae_title!r}")

    def get(self, ae_title: str) -> RemoteAE | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_COLUMNS).select_from(_JOINED)
                .where(s.remote_ae.c.ae_title == ae_title.strip())).first()
        return _ae(row) if row else None

    def require(self, ae_title: str) -> RemoteAE:
        found = self.get(ae_title)
        if found is None:
            raise _unknown(ae_title)
        return found

    def all(self, organisation_pk: int | None = None) -> list[RemoteAE]:
        stmt = select(*_COLUMNS).select_from(_JOINED).order_by(s.remote_ae.c.ae_title)
        if organisation_pk is not None:
            stmt = stmt.where(s.remote_ae.c.organisation_pk == organisation_pk)
        with self.engine.connect() as conn:
            return [_ae(row) for row in conn.execute(stmt)]

    def usable_by(self, who: Principal, ae_title: str) -> RemoteAE:
        """A peer the caller may query, retrieve from and send to: one of its own
        organisation's (any, for superusers). Others answer like unregistered ones."""
        found = self.get(ae_title)
        if found is None or not (who.superuser or found.organisation_pk == who.organisation_pk):
            raise _unknown(ae_title)
        return found


def _unknown(ae_title: str) -> NotFound:
    return NotFound(f"no registered AE {ae_title!r}: add it with "
                    f"`dicomshare ae add {ae_title.strip()} --host H --port P`")
