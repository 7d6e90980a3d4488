"""Research projects and opt-outs.

A project belongs to one organisation and holds the key of its pseudonyms and date
shifts: every export of the project maps the same patient, UID and date the same way,
so exports made months apart line up, and two projects cannot be linked to each other.
An opt-out (a patient who declined research use) excludes the patient from every
cohort count and export, of every project.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from dicomshare import clock
from dicomshare.access.policy import Action, Principal, check
from dicomshare.errors import Conflict, Forbidden, InvalidInput, NotFound
from dicomshare.storage import schema as s

DEFAULT_OPTIONS = ("retain_longitudinal_modified_dates",)


@dataclass(frozen=True)
class Project:
    id: int
    organisation_pk: int
    name: str
    description: str | None
    options: tuple[str, ...]
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "description": self.description,
                "options": list(self.options), "created_at": self.created_at.isoformat()}




def _project(row: Any) -> Project:
    return Project(row.pk, row.organisation_pk, row.name, row.description,
                   tuple(o for o in row.options.split(",") if o), clock.aware(row.created_at))


_P = s.research_project


class Projects:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, who: Principal, name: str, description: str | None = None,
               options: tuple[str, ...] = DEFAULT_OPTIONS) -> Project:
        check(who, Action.RESEARCH)
        if who.organisation_pk is None:
            raise Forbidden("projects belong to an organisation")
        name = name.strip()
        if not 0 < len(name) <= 200:
            raise InvalidInput("a project name has 1 to 200 characters")
        try:
            with self.engine.begin() as conn:
                result = conn.execute(insert(_P).values(
                    organisation_pk=who.organisation_pk, name=name, description=description,
                    secret=secrets.token_hex(32), options=",".join(options),
                    created_by_user_pk=who.user_pk, created_at=clock.now()))
                pk = int(result.inserted_primary_key[0])  # type: ignore[index]
        except IntegrityError:
            raise Conflict(f"your organisation has a project named {name!r} already") from None
        return self.get(who, pk)

    def get(self, who: Principal, project_id: int) -> Project:
        """A project of the caller's organisation (superusers: any); others are NotFound."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_P).where(_P.c.pk == project_id)).first()
        if row is None or not (who.superuser or row.organisation_pk == who.organisation_pk):
            raise NotFound(f"no project {project_id}")
        return _project(row)

    def list_projects(self, who: Principal) -> list[Project]:
        stmt = select(_P).order_by(_P.c.name)
        if not who.superuser:
            stmt = stmt.where(_P.c.organisation_pk == who.organisation_pk)
        with self.engine.connect() as conn:
            return [_project(r) for r in conn.execute(stmt)]

    def key(self, project_id: int) -> bytes:
        """The project's secret; only the export worker asks for it."""
        with self.engine.connect() as conn:
            secret = conn.execute(select(_P.c.secret).where(_P.c.pk == project_id)).scalar()
        if secret is None:
            raise NotFound(f"no project {project_id}")
        return bytes.fromhex(secret)

    # -- opt-outs ------------------------------------------------------------------------
    def opt_out(self, who: Principal, patient_id: str, issuer: str = "",
                reason: str | None = None) -> None:
        """Record that a patient declined research use (clinicians and admins)."""
        check(who, Action.SHARE)
        if not 0 < len(patient_id) <= 64 or len(issuer) > 64:
            raise InvalidInput("patient_id has 1 to 64 characters, the issuer at most 64")
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(s.research_optout).values(
                    patient_id=patient_id, issuer_of_patient_id=issuer,
                    organisation_pk=who.organisation_pk, created_by_user_pk=who.user_pk,
                    created_at=clock.now(), reason=reason))
        except IntegrityError:
            pass  # opted out already: nothing to add

    def opt_in(self, who: Principal, patient_id: str, issuer: str = "") -> None:
        check(who, Action.SHARE)
        o = s.research_optout
        with self.engine.begin() as conn:
            stmt = delete(o).where(o.c.patient_id == patient_id,
                                   o.c.issuer_of_patient_id == issuer)
            if not who.superuser:
                stmt = stmt.where(o.c.organisation_pk == who.organisation_pk)
            if conn.execute(stmt).rowcount == 0:
                raise NotFound("no opt-out of that patient recorded by your organisation")

    def opt_outs(self, who: Principal) -> list[dict[str, Any]]:
        o = s.research_optout
        stmt = select(o.c.patient_id, o.c.issuer_of_patient_id, o.c.created_at,
                      o.c.reason).order_by(o.c.pk)
        if not who.superuser:
            stmt = stmt.where(o.c.organisation_pk == who.organisation_pk)
        with self.engine.connect() as conn:
            return [{"patient_id": r[0], "issuer_of_patient_id": r[1],
                     "created_at": clock.aware(r[2]).isoformat(), "reason": r[3]}
                    for r in conn.execute(stmt)]
