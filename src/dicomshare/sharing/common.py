"""What the sharing features (inbox, consults, upload links) do alike, kept in one place so
that they keep doing it alike: who is a party to a row (whatever else answers NotFound),
how a row is read with its parties' names, how a recipient named by a sender is found,
and how a link secret is made and stored.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, Table, and_, false, or_, select
from sqlalchemy.engine import Connection

from dicomshare.access.policy import Principal
from dicomshare.errors import NotFound
from dicomshare.storage import schema as s

T = TypeVar("T")
SECRET_BYTES = 32  # 256 random bits


# -- link secrets ----------------------------------------------------------------------------
def new_secret() -> str:
    """A link secret: shown once to its creator, stored only as :func:`secret_digest`."""
    return secrets.token_urlsafe(SECRET_BYTES)


def secret_digest(secret: str) -> str:
    """What the database keeps of a secret. SHA-256 is enough: a 256-bit random value
    cannot be guessed, so it needs no slow (password) hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


# -- parties -----------------------------------------------------------------------------------
def find_recipient(conn: Connection, organisation: str,
                   user: str | None) -> tuple[int, int | None]:
    """The organisation a sender names and, when named too, one of its users (a user of
    another organisation is not found: the name is read within the organisation)."""
    org_pk = conn.execute(select(s.organisation.c.pk).where(
        s.organisation.c.name == organisation)).scalar()
    if org_pk is None:
        raise NotFound(f"no organisation {organisation!r}")
    user_pk = None
    if user is not None:
        user_pk = conn.execute(select(s.user.c.pk).where(
            s.user.c.name == user, s.user.c.organisation_pk == org_pk)).scalar()
        if user_pk is None:
            raise NotFound(f"no user {user!r} in {organisation!r}")
    return org_pk, user_pk


def addressed_to(organisation: Any, user: Any, who: Principal) -> ColumnElement[bool]:
    """Rows for the caller: sent to its organisation as a whole (``user`` NULL) or to the
    caller by name. A caller of no organisation is a party to nothing."""
    if who.organisation_pk is None:
        return false()
    return and_(organisation == who.organisation_pk,
                or_(user.is_(None), user == who.user_pk))


def of_organisation(organisation: Any, who: Principal) -> ColumnElement[bool]:
    """Rows made by the caller's organisation (any of its users may follow them up)."""
    if who.organisation_pk is None:
        return false()
    return organisation == who.organisation_pk


def with_names(table: Table, organisations: Mapping[str, Any],
               users: Mapping[str, Any]) -> Select[Any]:
    """``table`` with the names its organisation and user columns point to, labelled
    ``<alias>_name``: the API shows names, never primary keys. Organisations are always
    there; a user column may be NULL (sent to a whole organisation, or not decided yet)."""
    columns: list[Any] = [table]
    joined: Any = table
    for named, pks, optional in ((s.organisation, organisations, False), (s.user, users, True)):
        for alias, pk in pks.items():
            other = named.alias(alias)
            columns.append(other.c.name.label(f"{alias}_name"))
            joined = (joined.outerjoin if optional else joined.join)(other, pk == other.c.pk)
    return select(*columns).select_from(joined)


@dataclass(frozen=True)
class Record:
    """A row read through :func:`with_names`; what of it the API shows depends on the
    caller, so subclasses render it with ``as_json(who)``."""

    row: Any

    @property
    def id(self) -> int:
        return int(self.row.pk)

    @property
    def state(self) -> str:
        return str(self.row.state)


def audit_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Audit details without the empty (None) values: a record says what happened."""
    return {k: v for k, v in details.items() if v is not None}


# -- services on the web app ---------------------------------------------------------------------
_made_lock = threading.Lock()


def app_service(state: Any, name: str, make: Callable[[], T]) -> T:
    """The service ``name`` of the app (``request.app.state``), made on first use, once even
    when requests race, so that app.py need not know the sharing features."""
    found: T | None = getattr(state, name, None)
    if found is not None:
        return found
    with _made_lock:
        found = getattr(state, name, None)
        if found is None:
            found = make()
            setattr(state, name, found)
    return found
