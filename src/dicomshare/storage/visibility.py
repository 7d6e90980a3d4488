"""A caller's :class:`~dicomshare.access.policy.Visibility` as SQL.

Ownership lives in ``instance_owner`` (the truth) and ``study_owner`` (derived, for
fast study-level filtering). One predicate, :func:`owned_by_visible`, says whether an
owner organisation column is one the caller may see *for the study row in scope*:
its own organisation, or a grant's source organisation for a granted study or patient.
Every search level, every count and every retrieve uses it, so what is listed, what
is counted and what can be fetched always agree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, exists, false, func, or_, select, true

from dicomshare.access.policy import Visibility
from dicomshare.storage import schema as s


def owned_by_visible(vis: Visibility, org_col: Any) -> ColumnElement[bool]:
    """``org_col`` (an owner organisation) is visible to the caller; needs ``study`` in scope."""
    if vis.everything:
        return true()
    parts: list[ColumnElement[bool]] = []
    if vis.organisation is not None:
        parts.append(org_col == vis.organisation)
    for opening in vis.openings:
        which: list[ColumnElement[bool]] = []
        if opening.studies:
            which.append(s.study.c.study_instance_uid.in_(sorted(opening.studies)))
        for patient_id, issuer in sorted(opening.patients):
            which.append(and_(s.study.c.patient_id == patient_id,
                              func.coalesce(s.study.c.issuer_of_patient_id, "") == issuer))
        if which:
            parts.append(and_(org_col == opening.source, or_(*which)))
    return or_(*parts) if parts else false()


def study_visible(vis: Visibility) -> ColumnElement[bool]:
    """The study row has at least one instance the caller may see."""
    if vis.everything:
        return true()
    so = s.study_owner.alias("vis_so")
    return exists().where(so.c.study_pk == s.study.c.pk,
                          owned_by_visible(vis, so.c.organisation_pk))


def series_visible(vis: Visibility) -> ColumnElement[bool]:
    """The series row has at least one visible instance; needs ``study`` in scope."""
    if vis.everything:
        return true()
    inst = s.instance.alias("vis_i")
    io = s.instance_owner.alias("vis_io")
    return exists().where(inst.c.series_pk == s.series.c.pk,
                          io.c.instance_pk == inst.c.pk,
                          owned_by_visible(vis, io.c.organisation_pk))


def instance_visible(vis: Visibility) -> ColumnElement[bool]:
    """The instance row is visible; needs ``study`` in scope."""
    if vis.everything:
        return true()
    io = s.instance_owner.alias("vis_io")
    return exists().where(io.c.instance_pk == s.instance.c.pk,
                          owned_by_visible(vis, io.c.organisation_pk))


def visible_instances_join(vis: Visibility, stmt: Any) -> Any:
    """Restrict a select over ``series JOIN instance`` to visible instances (for counts)."""
    if vis.everything:
        return stmt
    return stmt.join(s.study, s.series.c.study_pk == s.study.c.pk).where(
        instance_visible(vis))


def owners_of_study(conn: Any, study_pk: int) -> set[int]:
    return set(conn.execute(select(s.study_owner.c.organisation_pk)
                            .where(s.study_owner.c.study_pk == study_pk)).scalars())


def may_add_to(vis: Visibility | None, owner: int | None, study_uid: str,
               patient: tuple[str, str], owners: set[int]) -> bool:
    """May a caller store new instances into an existing study with these owners?

    Yes when nobody owns it (an archive from before ownership), when the caller's
    organisation owns part of it, or when an add-series grant from an owner covers it.
    """
    if vis is None or vis.everything or not owners:
        return True
    if owner is not None and owner in owners:
        return True
    return any(o.source in owners and (study_uid in o.studies or patient in o.patients)
               for o in vis.openings)
