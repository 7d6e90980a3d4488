"""Watchlists: a clinician follows a patient (PatientID + issuer); when a new study of that
patient arrives from any organisation and the follower may see it, the follower is
notified (kind ``watch-new-study``: the API and, with SMTP, e-mail).

Matching is behind :func:`watched_by`, which follows confirmed patient links and merges
across organisations (patients/identity.py). Following a patient reveals
nothing by itself: the follower is only told of studies its own visibility opens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from dicomshare import clock
from dicomshare.access.policy import Principal
from dicomshare.errors import Conflict, InvalidInput, NotFound
from dicomshare.monitoring import events
from dicomshare.storage import schema as s

wt = s.watch
T = TypeVar("T")
MAX_WATCHES_PER_USER = 1000


@dataclass(frozen=True)
class Watch:
    id: int
    user_pk: int
    patient_id: str
    issuer_of_patient_id: str
    label: str | None
    created_at: Any

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "patient_id": self.patient_id,
                "issuer_of_patient_id": self.issuer_of_patient_id, "label": self.label,
                "created_at": clock.iso(clock.aware(self.created_at))}


def _watch(row: Any) -> Watch:
    return Watch(row.pk, row.user_pk, row.patient_id, row.issuer_of_patient_id, row.label,
                 row.created_at)


def watched_by(conn: Connection, patient_id: str, issuer: str) -> list[Watch]:
    """The watches following this patient (PatientID + issuer, "" for none) under any of
    the identifiers confirmed links and merges join it to (patients/identity.py): a
    follower of the hospital's "A-998" hears of the clinic's "12345" once they are linked.
    The one place that decides which records are "the same patient" for watchlists."""
    from dicomshare.patients.identity import same_person_ids

    if not patient_id:
        return []
    ids = same_person_ids(conn, patient_id, issuer or "")
    found: dict[int, Any] = {}
    for pid, iss in sorted(ids):
        for row in conn.execute(select(wt).where(wt.c.patient_id == pid,
                                                 wt.c.issuer_of_patient_id == iss)):
            found[row.pk] = row
    return [_watch(found[pk]) for pk in sorted(found)]


def _clean(text: str, what: str) -> str:
    text = text.strip()
    if len(text) > 64 or any(ord(ch) < 32 or ch == "\\" for ch in text):
        raise InvalidInput(f"{what} is at most 64 characters, without control characters "
                           "or backslashes")
    return text


class UserRows(Generic[T]):
    """Rows a user owns (patient and cohort watches): listed, read and removed by their
    owner only; anyone else's answer NotFound, like missing ones."""

    table: Table
    noun: str

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _make(self, row: Any) -> T:
        raise NotImplementedError

    def listing(self, who: Principal) -> list[T]:
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(select(t).where(t.c.user_pk == who.user_pk)
                                .order_by(t.c.pk)).all()
        return [self._make(r) for r in rows]

    def get(self, who: Principal, watch_id: int) -> T:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.pk == watch_id,
                                               t.c.user_pk == who.user_pk)).first()
        if row is None:
            raise NotFound(f"no {self.noun} {watch_id}")
        return self._make(row)

    def unfollow(self, who: Principal, watch_id: int) -> T:
        found = self.get(who, watch_id)
        with self.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.pk == watch_id))
        events.invalidate()
        return found


class Watchlist(UserRows[Watch]):
    table = wt
    noun = "watch"

    def _make(self, row: Any) -> Watch:
        return _watch(row)

    def follow(self, who: Principal, patient_id: str, issuer: str = "",
               label: str | None = None) -> Watch:
        if who.user_pk is None:
            raise InvalidInput("only users have watchlists")
        patient_id = _clean(patient_id, "patient_id")
        if not patient_id:
            raise InvalidInput("patient_id is required")
        issuer = _clean(issuer or "", "issuer")
        if label is not None and len(label) > 200:
            raise InvalidInput("a label is at most 200 characters")
        try:
            with self.engine.begin() as conn:
                count = conn.execute(select(func.count()).select_from(wt)
                                     .where(wt.c.user_pk == who.user_pk)).scalar_one()
                if count >= MAX_WATCHES_PER_USER:
                    raise InvalidInput(f"a watchlist holds at most {MAX_WATCHES_PER_USER} "
                                       "patients")
                pk = conn.execute(insert(wt).values(
                    user_pk=who.user_pk, patient_id=patient_id, issuer_of_patient_id=issuer,
                    label=label, created_at=clock.now())).inserted_primary_key[0]  # type: ignore[index]
        except IntegrityError:
            raise Conflict("you already follow this patient") from None
        events.invalidate()
        return self.get(who, int(pk))

