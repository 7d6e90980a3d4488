"""Watches on cohort queries: a user saves filters and is notified (kind
``watch-cohort-study``) of each new study that matches them *and* that the user may see.

The filters are research's (research/cohorts.py :class:`CohortQuery` holds and bounds
them: modalities, body parts, sexes, age at the study, storing organisations) plus a
StudyDescription pattern with the DICOM wildcards of dicom/matching.py, matched
case-insensitively. The API names them as DICOM does (``Modality``, ``BodyPartExamined``,
``StudyDescription``, ``PatientSex``) plus ``min_age``, ``max_age`` and ``organisation``.

Matching runs in the monitoring worker (worker.py), on a study's :class:`StudyFacts`:
first over every instance of the study (a cheap test of all watches at once), then, for
the watches that pass, over the instances their follower may see. Only the second
decides, so a watch reveals nothing by itself; the first only saves work.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from dicomshare import clock
from dicomshare.access.grants import live_grants
from dicomshare.access.policy import Action, Principal, Visibility, visibility
from dicomshare.dicom.matching import wildcard_match
from dicomshare.errors import Conflict, InvalidInput, InvalidQuery
from dicomshare.monitoring import events
from dicomshare.monitoring.watch import UserRows
from dicomshare.research.cohorts import MAX_VALUES, CohortQuery
from dicomshare.storage import schema as s
from dicomshare.storage.visibility import owned_by_visible

log = logging.getLogger(__name__)
cw = s.cohort_watch
KIND = "watch-cohort-study"
SUBJECT = "A new study matching a cohort you follow arrived"  # e-mailed: no PHI, no label
MAX_COHORT_WATCHES_PER_USER = 50
MAX_QUERY_CHARS = 4000  # the query as JSON
FILTERS = ("Modality", "BodyPartExamined", "StudyDescription", "PatientSex", "min_age",
           "max_age", "organisation")
_CS = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # PS3.5 Code String
_DATE = re.compile(r"^\d{8}$")
_SEXES = ("M", "F", "O")


# -- the query ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortFilter:
    """A validated cohort watch query. ``cohort`` holds every filter but the description
    pattern (research's container, so both features bound and read filters alike)."""

    cohort: CohortQuery
    description: str | None = None  # StudyDescription, with * and ?

    def stored(self) -> dict[str, Any]:
        """The normalised query, as kept in ``cohort_watch.query`` (organisations by pk)."""
        c = self.cohort
        out: dict[str, Any] = {"Modality": list(c.modalities),
                               "BodyPartExamined": list(c.body_parts),
                               "StudyDescription": self.description,
                               "PatientSex": list(c.sexes), "min_age": c.age_min,
                               "max_age": c.age_max, "organisation": list(c.organisations)}
        return {k: v for k, v in out.items() if v not in ([], None)}

    def matches(self, facts: StudyFacts | None) -> bool:
        if facts is None:
            return False
        c = self.cohort
        if c.sexes and (facts.sex or "").upper() not in c.sexes:
            return False
        if c.age_min is not None or c.age_max is not None:
            if facts.age is None:
                return False
            if c.age_min is not None and facts.age < c.age_min:
                return False
            if c.age_max is not None and facts.age > c.age_max:
                return False
        if self.description is not None and not wildcard_match(
                self.description, facts.description or "", True):
            return False
        # Series-level filters hold together on one series (a CT of the chest, not a CT
        # and a chest X-ray), stored by one of the organisations asked for.
        return any((not c.modalities or modality in c.modalities)
                   and (not c.body_parts or body_part in c.body_parts)
                   and (not c.organisations or owner in c.organisations)
                   for modality, body_part, owner in facts.series)


def _values(key: str, raw: Any) -> list[Any]:
    """One value or a non-empty list of them."""
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise InvalidQuery(f"{key}: give one value or a non-empty list")
    if len(values) > MAX_VALUES:
        raise InvalidQuery(f"{key}: at most {MAX_VALUES} values")
    return values


def _codes(key: str, raw: Any, allowed: tuple[str, ...] = ()) -> tuple[str, ...]:
    out: list[str] = []
    for value in _values(key, raw):
        if not isinstance(value, str):
            raise InvalidQuery(f"{key}: values are text, not {type(value).__name__}")
        code = value.strip().upper()
        if not _CS.match(code):
            raise InvalidQuery(f"{key}: {value[:40]!r} is not a code string (1 to 16 "
                               "letters, digits, spaces or underscores)")
        if allowed and code not in allowed:
            raise InvalidQuery(f"{key}: {value[:40]!r} is not one of {', '.join(allowed)}")
        out.append(code)
    return tuple(sorted(set(out)))


def _age(key: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidQuery(f"{key}: a whole number of years, not {json.dumps(raw)[:40]}")
    if not 0 <= raw <= 150:
        raise InvalidQuery(f"{key}: between 0 and 150 years, not {raw}")
    return raw


def _description(raw: Any) -> str:
    if not isinstance(raw, str):
        raise InvalidQuery("StudyDescription: a text pattern (with * and ?)")
    text = raw.strip()
    if not 0 < len(text) <= 64:
        raise InvalidQuery("StudyDescription: 1 to 64 characters")
    if any(ord(ch) < 32 or ch == "\\" for ch in text):
        raise InvalidQuery("StudyDescription: no control characters or backslashes")
    if set(text) == {"*"}:
        raise InvalidQuery("StudyDescription: a pattern of only * matches every study; "
                           "leave the filter out")
    return text


def parse_query(raw: Any, organisation_pk: Callable[[int | str], int] | None = None
                ) -> CohortFilter:
    """A query (JSON object) as a CohortFilter; InvalidQuery (400) with the reason for
    anything unknown, malformed or out of bounds. ``organisation_pk`` turns one
    ``organisation`` value (name or pk) into a pk the caller may name, or raises."""
    if not isinstance(raw, dict):
        raise InvalidQuery("the query is a JSON object of filters")
    if len(json.dumps(raw, default=str)) > MAX_QUERY_CHARS:
        raise InvalidQuery(f"the query is longer than {MAX_QUERY_CHARS} characters as JSON")
    unknown = sorted(str(k) for k in raw if k not in FILTERS)
    if unknown:
        raise InvalidQuery(f"unknown filter {unknown[0][:40]!r}; cohort queries take "
                           f"{', '.join(FILTERS)}")
    given = {k: v for k, v in raw.items() if v is not None}
    if not given:
        raise InvalidQuery(f"the query has no filter; give at least one of "
                           f"{', '.join(FILTERS)}")
    age_min = _age("min_age", given["min_age"]) if "min_age" in given else None
    age_max = _age("max_age", given["max_age"]) if "max_age" in given else None
    if age_min is not None and age_max is not None and age_min > age_max:
        raise InvalidQuery(f"min_age ({age_min}) is above max_age ({age_max})")
    orgs: set[int] = set()
    for value in _values("organisation", given["organisation"]) if "organisation" in given \
            else ():
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            raise InvalidQuery("organisation: a name or an id")
        orgs.add(organisation_pk(value) if organisation_pk else int(value))
    return CohortFilter(CohortQuery(
        modalities=_codes("Modality", given["Modality"]) if "Modality" in given else (),
        body_parts=(_codes("BodyPartExamined", given["BodyPartExamined"])
                    if "BodyPartExamined" in given else ()),
        age_min=age_min, age_max=age_max,
        sexes=_codes("PatientSex", given["PatientSex"], _SEXES) if "PatientSex" in given
        else (),
        organisations=tuple(sorted(orgs))),
        _description(given["StudyDescription"]) if "StudyDescription" in given else None)


def _org_resolver(conn: Connection, who: Principal) -> Callable[[int | str], int]:
    """name or pk -> pk, among the organisations whose studies the caller may see (its
    own, those that grant it something; any for superusers). Others answer exactly like
    unknown ones."""
    vis = visibility(who, Action.SEARCH, live_grants(conn, who))
    names = dict(conn.execute(select(s.organisation.c.name, s.organisation.c.pk)).tuples().all())
    allowed = set(names.values()) if vis.everything else (
        {vis.organisation} | {o.source for o in vis.openings}) - {None}

    def resolve(value: int | str) -> int:
        pk = value if isinstance(value, int) else names.get(value.strip())
        if pk is None or pk not in allowed:
            raise InvalidQuery(f"organisation: no organisation {str(value)[:60]!r} whose "
                               "studies you may see")
        return pk

    return resolve


# -- facts of a study -------------------------------------------------------------------
@dataclass(frozen=True)
class StudyFacts:
    """What the filters look at, over some instances of one study."""

    description: str | None
    sex: str | None
    age: int | None  # whole years between PatientBirthDate and StudyDate
    series: frozenset[tuple[str, str, int | None]]  # (MODALITY, BODY PART, owner)


def age_at(birth: str | None, seen: str | None) -> int | None:
    """Whole years at the study, as research/cohorts.py counts them in SQL; None when a
    date is missing or malformed (computed here: a cast error in SQL would abort the
    worker's transaction on PostgreSQL)."""
    if not (birth and seen and _DATE.match(birth) and _DATE.match(seen)):
        return None
    return int(seen[:4]) - int(birth[:4]) - (seen[4:8] < birth[4:8])


def study_facts(conn: Connection, study_uid: str, vis: Visibility | None = None
                ) -> StudyFacts | None:
    """Facts over every instance of the study (``vis`` None) or over those ``vis`` sees,
    counting only the owners it sees; None when there is no such instance."""
    i, se, st, io = s.instance, s.series, s.study, s.instance_owner
    if vis is not None and vis.nothing:
        return None
    stmt = (select(st.c.study_description, st.c.patient_sex, st.c.patient_birth_date,
                   st.c.study_date, se.c.modality, se.c.body_part_examined,
                   io.c.organisation_pk)
            .select_from(i.join(se, se.c.pk == i.c.series_pk)
                         .join(st, st.c.pk == se.c.study_pk)
                         .outerjoin(io, io.c.instance_pk == i.c.pk))
            .where(st.c.study_instance_uid == study_uid).distinct())
    if vis is not None:
        stmt = stmt.where(owned_by_visible(vis, io.c.organisation_pk))
    rows = conn.execute(stmt).all()
    if not rows:
        return None
    first = rows[0]
    return StudyFacts(first.study_description, first.patient_sex,
                      age_at(first.patient_birth_date, first.study_date),
                      frozenset(((r.modality or "").strip().upper(),
                                 (r.body_part_examined or "").strip().upper(),
                                 r.organisation_pk) for r in rows))


# -- the watches ------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortWatch:
    id: int
    user_pk: int
    label: str | None
    query: CohortFilter
    created_at: Any

    def as_json(self, names: dict[int, str] | None = None) -> dict[str, Any]:
        """The query as stored, organisations by name (a client may post it back)."""
        query = self.query.stored()
        if "organisation" in query:
            query["organisation"] = [(names or {}).get(pk, pk) for pk in query["organisation"]]
        return {"id": self.id, "label": self.label, "query": query,
                "created_at": clock.iso(clock.aware(self.created_at))}


def _watch(row: Any) -> CohortWatch:
    return CohortWatch(row.pk, row.user_pk, row.label, parse_query(json.loads(row.query)),
                       row.created_at)


def all_watches(conn: Connection) -> list[CohortWatch]:
    """Every cohort watch of the site (the worker tests each new study against them). A
    row that no longer parses (edited by hand) is skipped and logged: it must not hold up
    the other subscribers' events."""
    out = []
    for row in conn.execute(select(cw).order_by(cw.c.pk)):
        try:
            out.append(_watch(row))
        except (InvalidInput, ValueError, TypeError):
            log.warning("cohort watch %s has an unreadable query; skipped", row.pk)
    return out


class CohortWatchlist(UserRows[CohortWatch]):
    table = cw
    noun = "cohort watch"

    def _make(self, row: Any) -> CohortWatch:
        return _watch(row)

    def organisation_names(self) -> dict[int, str]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(s.organisation.c.pk, s.organisation.c.name))
                        .tuples().all())

    def follow(self, who: Principal, query: Any, label: str | None = None) -> CohortWatch:
        if who.user_pk is None:
            raise InvalidInput("only users have watchlists")
        if label is not None:
            label = label.strip() or None
            if label is not None and len(label) > 200:
                raise InvalidInput("a label is at most 200 characters")
        with self.engine.begin() as conn:
            found = parse_query(query, _org_resolver(conn, who))
            stored = json.dumps(found.stored(), sort_keys=True)
            mine = conn.execute(select(cw.c.query).where(cw.c.user_pk == who.user_pk)
                                ).scalars().all()
            if len(mine) >= MAX_COHORT_WATCHES_PER_USER:
                raise InvalidInput(f"a user follows at most {MAX_COHORT_WATCHES_PER_USER} "
                                   "cohort queries")
            if stored in mine:
                raise Conflict("you already follow this cohort query")
            pk = conn.execute(insert(cw).values(
                user_pk=who.user_pk, label=label, query=stored, created_at=clock.now())
            ).inserted_primary_key[0]  # type: ignore[index]
        events.invalidate()
        return self.get(who, int(pk))


