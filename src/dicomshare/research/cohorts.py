"""Cohort queries over the index: which instances a research export would take.

A cohort is chosen by modality, body part, study date range, patient age at the study
and sex, description text (study or series), SOP class and owning organisation, always
within what the caller's organisation may use for research (its own data, plus grants
with the ``research`` permission) and never including patients who opted out. Counts
come before anything is exported, so a researcher can shape the cohort first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Integer, and_, cast, exists, func, or_, select
from sqlalchemy.engine import Engine

from dicomshare.access.policy import Visibility
from dicomshare.errors import InvalidQuery
from dicomshare.storage import schema as s
from dicomshare.storage.visibility import instance_visible

_DATE = re.compile(r"^\d{8}$")
_SEXES = {"M", "F", "O"}
MAX_VALUES = 50  # per list field


@dataclass(frozen=True)
class CohortQuery:
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    study_date_from: str | None = None  # YYYYMMDD, inclusive
    study_date_to: str | None = None  # YYYYMMDD, inclusive
    age_min: int | None = None  # years at the study date, inclusive
    age_max: int | None = None
    sexes: tuple[str, ...] = ()
    description: str | None = None  # case-insensitive text in study or series description
    sop_classes: tuple[str, ...] = ()
    organisations: tuple[int, ...] = ()  # owners (pks); empty: any the caller may use

    def __post_init__(self) -> None:
        for name in ("modalities", "body_parts", "sexes", "sop_classes", "organisations"):
            values = getattr(self, name)
            if len(values) > MAX_VALUES:
                raise InvalidQuery(f"at most {MAX_VALUES} values for {name}")
            for v in values:
                if isinstance(v, str) and not 0 < len(v) <= 64:
                    raise InvalidQuery(f"{name}: values must have 1 to 64 characters")
        for name in ("study_date_from", "study_date_to"):
            value = getattr(self, name)
            if value is not None and not _DATE.match(value):
                raise InvalidQuery(f"{name} must be a date as YYYYMMDD, not {value[:20]!r}")
        for name in ("age_min", "age_max"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 150:
                raise InvalidQuery(f"{name} must be between 0 and 150")
        if set(self.sexes) - _SEXES:
            raise InvalidQuery("sexes are M, F and O")
        if self.description is not None and len(self.description) > 200:
            raise InvalidQuery("description is longer than 200 characters")

    def as_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if v not in ((), None)}


@dataclass
class CohortCounts:
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    bytes: int = 0
    modalities: dict[str, int] = field(default_factory=dict)  # studies per modality
    opted_out_patients: int = 0  # matched, but excluded


@dataclass(frozen=True)
class Member:
    """One instance of a cohort, as an export needs it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    blob_key: str
    size: int
    sha256: str
    patient_id: str | None
    issuer_of_patient_id: str | None
    modality: str | None


def _age_years() -> Any:
    """Whole years between PatientBirthDate and StudyDate (both YYYYMMDD text)."""
    born, seen = s.study.c.patient_birth_date, s.study.c.study_date
    years = cast(func.substr(seen, 1, 4), Integer) - cast(func.substr(born, 1, 4), Integer)
    return years - cast(func.substr(seen, 5, 4) < func.substr(born, 5, 4), Integer)


def _opted_out() -> Any:
    o = s.research_optout
    return exists().where(o.c.patient_id == s.study.c.patient_id,
                          o.c.issuer_of_patient_id == func.coalesce(
                              s.study.c.issuer_of_patient_id, ""))


def _conditions(query: CohortQuery, vis: Visibility) -> list[Any]:
    conds: list[Any] = [instance_visible(vis)]
    if query.modalities:
        conds.append(s.series.c.modality.in_(query.modalities))
    if query.body_parts:
        conds.append(func.upper(s.series.c.body_part_examined).in_(
            [b.upper() for b in query.body_parts]))
    if query.study_date_from:
        conds.append(s.study.c.study_date >= query.study_date_from)
    if query.study_date_to:
        conds.append(s.study.c.study_date <= query.study_date_to)
    if query.age_min is not None or query.age_max is not None:
        age = _age_years()
        conds.append(s.study.c.patient_birth_date.isnot(None))
        conds.append(func.length(s.study.c.patient_birth_date) == 8)
        if query.age_min is not None:
            conds.append(age >= query.age_min)
        if query.age_max is not None:
            conds.append(age <= query.age_max)
    if query.sexes:
        conds.append(s.study.c.patient_sex.in_(query.sexes))
    if query.description:
        pattern = "%" + query.description.lower().replace("\\", "\\\\").replace(
            "%", "\\%").replace("_", "\\_") + "%"
        conds.append(or_(func.lower(s.study.c.study_description).like(pattern, escape="\\"),
                         func.lower(s.series.c.series_description).like(pattern, escape="\\")))
    if query.sop_classes:
        conds.append(s.instance.c.sop_class_uid.in_(query.sop_classes))
    if query.organisations:
        io = s.instance_owner.alias("cohort_io")
        conds.append(exists().where(io.c.instance_pk == s.instance.c.pk,
                                    io.c.organisation_pk.in_(query.organisations)))
    return conds


_FROM = s.instance.join(s.series, s.instance.c.series_pk == s.series.c.pk) \
    .join(s.study, s.series.c.study_pk == s.study.c.pk)


def count(engine: Engine, vis: Visibility, query: CohortQuery) -> CohortCounts:
    if vis.nothing:
        return CohortCounts()
    conds = _conditions(query, vis)
    patient = func.coalesce(s.study.c.patient_id, "") + "|" + func.coalesce(
        s.study.c.issuer_of_patient_id, "")
    kept = and_(*conds, ~_opted_out())
    with engine.connect() as conn:
        row = conn.execute(select(
            func.count(func.distinct(patient)), func.count(func.distinct(s.study.c.pk)),
            func.count(func.distinct(s.series.c.pk)), func.count(s.instance.c.pk),
            func.coalesce(func.sum(s.instance.c.size), 0)).select_from(_FROM).where(kept)).one()
        excluded = conn.execute(select(func.count(func.distinct(patient))).select_from(_FROM)
                                .where(and_(*conds, _opted_out()))).scalar_one()
        by_modality = conn.execute(
            select(s.series.c.modality, func.count(func.distinct(s.study.c.pk)))
            .select_from(_FROM).where(kept).group_by(s.series.c.modality)).all()
    return CohortCounts(int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]),
                        {str(m or ""): int(n) for m, n in by_modality}, int(excluded))


def members(engine: Engine, vis: Visibility, query: CohortQuery) -> Iterator[Member]:
    """Every instance of the cohort, grouped by patient, study and series (streamed)."""
    if vis.nothing:
        return
    stmt = (select(s.study.c.study_instance_uid, s.series.c.series_instance_uid,
                   s.instance.c.sop_instance_uid, s.instance.c.blob_key, s.instance.c.size,
                   s.instance.c.sha256, s.study.c.patient_id, s.study.c.issuer_of_patient_id,
                   s.series.c.modality)
            .select_from(_FROM).where(*_conditions(query, vis), ~_opted_out())
            .order_by(s.study.c.patient_id, s.study.c.pk, s.series.c.pk, s.instance.c.pk))
    with engine.connect() as conn:
        for row in conn.execution_options(yield_per=1000).execute(stmt):
            yield Member(*row)
