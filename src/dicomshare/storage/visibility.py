"""A caller's :class:`~dicomshare.access.policy.Visibility` as SQL.

Ownership lives in ``instance_owner`` (the truth) and ``study_owner`` (derived, for
fast study-level filtering). One predicate, :func:`owned_by_visible`, says whether an
owner organisation column is one the caller may see *for the study row in scope*:
its own organisation, or a grant's source organisation for a granted study or patient.
Every search level, every count and every retrieve uses it, so what is listed, what
is counted and what can be fetched always agree. :func:`study_visible` says the same
for whole studies as the set of visible study keys (:func:`_visible_study_pks`), which
the database computes once per query instead of once per study row.

The predicates are built once per distinct Visibility and reused (they are immutable
SQL expressions): building them costs more than running them.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Select,
    and_,
    exists,
    false,
    func,
    or_,
    select,
    true,
    union_all,
)

from dicomshare.access.policy import Visibility
from dicomshare.storage import schema as s

# Aliases are made once: making one sets up its column collections, which is not cheap.
_VIS_SO = s.study_owner.alias("vis_so")
_VIS_STUDY = s.study.alias("vis_st")
_VIS_I = s.instance.alias("vis_i")
_VIS_IO = s.instance_owner.alias("vis_io")
_CACHED = 256  # distinct Visibility values whose predicates are kept


def owned_by_visible(vis: Visibility, org_col: Any, study: Any = s.study
                     ) -> ColumnElement[bool]:
    """``org_col`` (an owner organisation) is visible to the caller; needs ``study`` (the
    study table, or an alias of it) in scope."""
    if vis.everything:
        return true()
    parts: list[ColumnElement[bool]] = []
    if vis.organisation is not None:
        parts.append(org_col == vis.organisation)
    for opening in vis.openings:
        which: list[ColumnElement[bool]] = []
        if opening.studies:
            which.append(study.c.study_instance_uid.in_(sorted(opening.studies)))
        for patient_id, issuer in sorted(opening.patients):
            which.append(and_(study.c.patient_id == patient_id,
                              func.coalesce(study.c.issuer_of_patient_id, "") == issuer))
        if which:
            parts.append(and_(org_col == opening.source, or_(*which)))
    return or_(*parts) if parts else false()


@lru_cache(maxsize=_CACHED)
def study_visible(vis: Visibility) -> ColumnElement[bool]:
    """The study row has at least one instance the caller may see."""
    if vis.everything:
        return true()
    pks = _visible_study_pks(vis)
    return false() if pks is None else s.study.c.pk.in_(pks)


@lru_cache(maxsize=_CACHED)
def study_visible_by_row(vis: Visibility) -> ColumnElement[bool]:
    """The same as :func:`study_visible`, tested row by row: cheaper when the other
    conditions already narrow the search to a few studies (a PatientID, a UID)."""
    if vis.everything:
        return true()
    return exists().where(_VIS_SO.c.study_pk == s.study.c.pk,
                          owned_by_visible(vis, _VIS_SO.c.organisation_pk))


def _visible_study_pks(vis: Visibility) -> Select[Any] | CompoundSelect | None:
    """The keys of the studies with an owner :func:`owned_by_visible` lets the caller see
    (None: no study), from two index-driven SELECTs: the studies its organisation owns
    (``study_owner`` by organisation), and the granted ones (``study`` by the granted
    StudyInstanceUIDs and PatientIDs, then checked against the grants' sources)."""
    parts: list[Select[Any]] = []
    if vis.organisation is not None:
        parts.append(select(s.study_owner.c.study_pk)
                     .where(s.study_owner.c.organisation_pk == vis.organisation))
    uids = sorted({uid for o in vis.openings for uid in o.studies})
    patient_ids = sorted({patient_id for o in vis.openings for patient_id, _ in o.patients})
    if uids or patient_ids:
        st, so = _VIS_STUDY, _VIS_SO
        # Implied by the grants' own test below; here so that an index finds the rows.
        candidates = ([st.c.study_instance_uid.in_(uids)] if uids else []) + \
            ([st.c.patient_id.in_(patient_ids)] if patient_ids else [])
        granted = replace(vis, organisation=None)
        parts.append(select(st.c.pk).where(
            or_(*candidates),
            exists().where(so.c.study_pk == st.c.pk,
                           owned_by_visible(granted, so.c.organisation_pk, st))))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else union_all(*parts)


@lru_cache(maxsize=_CACHED)
def series_visible(vis: Visibility) -> ColumnElement[bool]:
    """The series row has at least one visible instance; needs ``study`` in scope."""
    if vis.everything:
        return true()
    inst, io = _VIS_I, _VIS_IO
    return exists().where(inst.c.series_pk == s.series.c.pk,
                          io.c.instance_pk == inst.c.pk,
                          owned_by_visible(vis, io.c.organisation_pk))


@lru_cache(maxsize=_CACHED)
def instance_visible(vis: Visibility) -> ColumnElement[bool]:
    """The instance row is visible; needs ``study`` in scope."""
    if vis.everything:
        return true()
    io = _VIS_IO
    return exists().where(io.c.instance_pk == s.instance.c.pk,
                          owned_by_visible(vis, io.c.organisation_pk))


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
