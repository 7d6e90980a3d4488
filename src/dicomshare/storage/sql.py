"""The Index on SQLAlchemy Core: one implementation for SQLite and PostgreSQL.

Only two things differ between the engines and live in their small subclasses: how an
"insert unless present" is spelled, and how concurrent writers are serialised. The
matching rules themselves are in :mod:`dicomshare.dicom.matching`; this module turns
conditions on indexed columns into SQL and hands the rest to ``matches_json``.

Computed attributes (ModalitiesInStudy, NumberOf*Related*) are derived at query time
from the rows, never kept as counters, so concurrent ingest cannot make them wrong.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    or_,
    select,
    true,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Insert

from dicomshare.access.policy import EVERYTHING, Visibility
from dicomshare.dicom.attributes import (
    COMPUTED_KEYS,
    DEFAULT_RETURN,
    PATIENT_KEYS,
    Level,
    parse_tag,
    tag_hex,
    vr_of,
)
from dicomshare.dicom.matching import Condition, Kind, Query, matches_json
from dicomshare.errors import InvalidQuery, NotFound
from dicomshare.storage import schema as s
from dicomshare.storage.base import InstanceRecord, Outcome, StoredInstance
from dicomshare.storage.visibility import (
    instance_visible,
    may_add_to,
    owners_of_study,
    series_visible,
    study_visible,
    study_visible_by_row,
)

# keyword -> (level, column)
COLUMNS = {
    "StudyInstanceUID": (Level.STUDY, s.study.c.study_instance_uid),
    "PatientName": (Level.STUDY, s.study.c.patient_name_lc),
    "PatientID": (Level.STUDY, s.study.c.patient_id),
    "IssuerOfPatientID": (Level.STUDY, s.study.c.issuer_of_patient_id),
    "PatientBirthDate": (Level.STUDY, s.study.c.patient_birth_date),
    "PatientSex": (Level.STUDY, s.study.c.patient_sex),
    "StudyDate": (Level.STUDY, s.study.c.study_date),
    "StudyTime": (Level.STUDY, s.study.c.study_time),
    "AccessionNumber": (Level.STUDY, s.study.c.accession_number),
    "ReferringPhysicianName": (Level.STUDY, s.study.c.referring_physician_name_lc),
    "StudyDescription": (Level.STUDY, s.study.c.study_description),
    "StudyID": (Level.STUDY, s.study.c.study_id),
    "SeriesInstanceUID": (Level.SERIES, s.series.c.series_instance_uid),
    "Modality": (Level.SERIES, s.series.c.modality),
    "ModalitiesInStudy": (Level.SERIES, s.series.c.modality),
    "SeriesNumber": (Level.SERIES, s.series.c.series_number),
    "SeriesDescription": (Level.SERIES, s.series.c.series_description),
    "BodyPartExamined": (Level.SERIES, s.series.c.body_part_examined),
    "PerformedProcedureStepStartDate": (
        Level.SERIES, s.series.c.performed_procedure_step_start_date),
    "PerformedProcedureStepStartTime": (
        Level.SERIES, s.series.c.performed_procedure_step_start_time),
    "SOPInstanceUID": (Level.IMAGE, s.instance.c.sop_instance_uid),
    "SOPClassUID": (Level.IMAGE, s.instance.c.sop_class_uid),
    "SOPClassesInStudy": (Level.IMAGE, s.instance.c.sop_class_uid),
    "InstanceNumber": (Level.IMAGE, s.instance.c.instance_number),
    "Rows": (Level.IMAGE, s.instance.c.rows),
    "Columns": (Level.IMAGE, s.instance.c.columns),
    "BitsAllocated": (Level.IMAGE, s.instance.c.bits_allocated),
    "NumberOfFrames": (Level.IMAGE, s.instance.c.number_of_frames),
}
_DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.IMAGE: 2}
_COUNTS = {"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
           "NumberOfSeriesRelatedInstances", "NumberOfPatientRelatedStudies",
           "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"}
_STUDY_VALUES = ("StudyInstanceUID", "PatientName", "PatientID", "IssuerOfPatientID",
                 "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
                 "ReferringPhysicianName", "StudyDescription", "StudyID")
_SERIES_VALUES = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                  "BodyPartExamined", "PerformedProcedureStepStartDate",
                  "PerformedProcedureStepStartTime")
_INSTANCE_VALUES = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns",
                    "BitsAllocated", "NumberOfFrames")


def _now() -> datetime:
    return datetime.now(UTC)


class SqlIndex:
    """Index over SQLAlchemy; subclasses fill in dialect specifics."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Ingest statements are built once and executed with parameters.
        self._insert_study = self._insert_ignore(s.study, "study_instance_uid")
        self._insert_series = self._insert_ignore(s.series, "series_instance_uid")
        self._insert_instance = self._insert_ignore(s.instance, "sop_instance_uid") \
            .returning(s.instance.c.pk)
        self._study_pk = select(s.study.c.pk).where(
            s.study.c.study_instance_uid == bindparam("uid"))
        self._series_row = select(s.series.c.pk, s.series.c.study_pk).where(
            s.series.c.series_instance_uid == bindparam("uid"))
        self._instance_sha = select(s.instance.c.sha256, s.instance.c.pk).where(
            s.instance.c.sop_instance_uid == bindparam("uid"))
        self._insert_instance_owner = self._insert_ignore(
            s.instance_owner, ["instance_pk", "organisation_pk"])
        self._insert_study_owner = self._insert_ignore(
            s.study_owner, ["study_pk", "organisation_pk"])
        self._study_patient = select(s.study.c.patient_id, s.study.c.issuer_of_patient_id) \
            .where(s.study.c.pk == bindparam("pk"))

    # -- dialect hooks -------------------------------------------------------------------
    def _insert_ignore(self, table: Any, key: str | list[str]) -> Insert:
        """INSERT that does nothing when a row with the same ``key`` exists."""
        raise NotImplementedError

    def _write_lock(self) -> AbstractContextManager[Any]:
        return nullcontext()

    # -- ingest ----------------------------------------------------------------------------
    def add(self, records: Sequence[InstanceRecord]) -> list[Outcome]:
        now = _now()
        parents: dict[str, int] = {}  # study / series UID -> pk, within this transaction
        admitted: set[tuple[int, int | None, int]] = set()  # (study, owner, access) let in
        owning: set[tuple[int, int]] = set()  # (study, organisation) known to be an owner
        with self._write_lock(), self.engine.begin() as conn:
            return [self._add_one(conn, rec, now, parents, admitted, owning)
                    for rec in records]

    def _add_one(self, conn: Connection, rec: InstanceRecord, now: datetime,
                 parents: dict[str, int], admitted: set[tuple[int, int | None, int]],
                 owning: set[tuple[int, int]]) -> Outcome:
        """Four to six statements on the common path (known study and series, new
        instance): the study, the caller's right to add to it, the series, the instance
        and its owner; the study's owner when it is not one yet."""
        h = rec.header
        v = h.values
        study_pk = parents.get(h.study_uid)
        if study_pk is None:
            study_pk = conn.execute(self._study_pk, {"uid": h.study_uid}).scalar_one_or_none()
            if study_pk is not None and not self._may_add(conn, rec, study_pk, admitted,
                                                          owning):
                # Someone else's study: only a copy of what is already there is let in.
                known = conn.execute(self._instance_sha, {"uid": h.sop_uid}).first()
                if known is not None and known[0] == rec.sha256:
                    self._own(conn, rec, known[1], study_pk, owning)
                    return Outcome.ALREADY_PRESENT
                return Outcome.FORBIDDEN
        study_pk = study_pk or self._parent(
            conn, self._study_pk, self._insert_study, h.study_uid,
            {**{_col(k): v.get(k) for k in _STUDY_VALUES}, "created_at": now,
             "study_instance_uid": h.study_uid,
             "issuer_universal_id": h.issuer_universal_id,
             "updated_at": now, "attributes": _dumps(h.study_json),
             "patient_name": v.get("PatientName"),
             "referring_physician_name": v.get("ReferringPhysicianName"),
             "patient_name_lc": _lower(v.get("PatientName")),
             "referring_physician_name_lc": _lower(v.get("ReferringPhysicianName"))})
        parents[h.study_uid] = study_pk
        series_pk = parents.get(h.series_uid)
        if series_pk is None:
            found = conn.execute(self._series_row, {"uid": h.series_uid}).first()
            if found is None:
                conn.execute(self._insert_series, {
                    **{_col(k): v.get(k) for k in _SERIES_VALUES}, "study_pk": study_pk,
                    "series_instance_uid": h.series_uid,
                    "created_at": now, "attributes": _dumps(h.series_json)})
                found = conn.execute(self._series_row, {"uid": h.series_uid}).one()
            series_pk, owner = int(found[0]), found[1]
            if owner != study_pk:  # the series already belongs to another study
                conn.execute(delete(s.study).where(  # drop the study row made for it, if empty
                    s.study.c.pk == study_pk,
                    ~exists().where(s.series.c.study_pk == s.study.c.pk)))
                parents.pop(h.study_uid, None)
                return Outcome.CONFLICT
            parents[h.series_uid] = series_pk
        inst_row = {_col(k): v.get(k) for k in _INSTANCE_VALUES}
        inst_row.update(sop_instance_uid=h.sop_uid, series_pk=series_pk,
                        sop_class_uid=h.sop_class_uid, transfer_syntax_uid=h.transfer_syntax_uid,
                        blob_key=rec.blob_key, size=rec.size, sha256=rec.sha256,
                        metadata=h.metadata_text(), created_at=now)
        # rowcount is -1 for INSERT .. ON CONFLICT on psycopg: ask for the new row instead.
        inserted = conn.execute(self._insert_instance, inst_row).first()
        if inserted is None:  # stored before (or by a concurrent writer)
            other_sha, other_pk = conn.execute(self._instance_sha, {"uid": h.sop_uid}).one()
            if other_sha != rec.sha256:
                return Outcome.CONFLICT
            self._own(conn, rec, other_pk, study_pk, owning)  # identical bytes: a co-owner
            return Outcome.ALREADY_PRESENT
        self._own(conn, rec, inserted[0], study_pk, owning)
        return Outcome.STORED

    def _own(self, conn: Connection, rec: InstanceRecord, instance_pk: int,
             study_pk: int, owning: set[tuple[int, int]]) -> None:
        if rec.owner is not None:
            conn.execute(self._insert_instance_owner,
                         {"instance_pk": instance_pk, "organisation_pk": rec.owner})
            if (study_pk, rec.owner) not in owning:
                conn.execute(self._insert_study_owner,
                             {"study_pk": study_pk, "organisation_pk": rec.owner})
                owning.add((study_pk, rec.owner))

    def _may_add(self, conn: Connection, rec: InstanceRecord, study_pk: int,
                 admitted: set[tuple[int, int | None, int]],
                 owning: set[tuple[int, int]]) -> bool:
        if rec.store_access is None or rec.store_access.everything:
            return True
        key = (study_pk, rec.owner, id(rec.store_access))
        if key in admitted:
            return True
        patient_id, issuer = conn.execute(self._study_patient, {"pk": study_pk}).one()
        owners = owners_of_study(conn, study_pk)
        ok = may_add_to(rec.store_access, rec.owner, rec.header.study_uid,
                        (patient_id or "", issuer or ""), owners)
        if ok:
            admitted.add(key)
        if rec.owner is not None and rec.owner in owners:
            owning.add((study_pk, rec.owner))  # its owner row exists: not inserted again
        return ok

    def _parent(self, conn: Connection, find: Any, insert: Insert, uid: str,
                row: dict[str, Any]) -> int:
        """The pk of a study or series row, inserting it first when it is new."""
        pk = conn.execute(find, {"uid": uid}).scalar_one_or_none()
        if pk is None:
            conn.execute(insert, row)
            pk = conn.execute(find, {"uid": uid}).scalar_one()
        return int(pk)

    # -- search ----------------------------------------------------------------------------
    def search(self, query: Query, study_uid: str | None = None,
               series_uid: str | None = None, visibility: Visibility = EVERYTHING
               ) -> list[dict[str, Any]]:
        if visibility.nothing:
            return []
        if query.level is Level.PATIENT:
            return self._search_patients(query, visibility)
        if query.level not in _DEPTH:
            raise InvalidQuery(f"searching at the {query.level.value} level is not supported")
        stmt, residual = self._select(query, study_uid, series_uid, visibility)
        with self.engine.connect() as conn:
            if residual:
                rows = []
                skip = query.offset
                for row in conn.execute(stmt).mappings():
                    attrs = _row_json(query.level, row)
                    if all(matches_json(c, attrs, query.fuzzy) for c in residual):
                        if skip:
                            skip -= 1
                            continue
                        rows.append(row)
                        if query.limit is not None and len(rows) >= query.limit:
                            break
            else:
                if query.offset:
                    stmt = stmt.offset(query.offset)
                if query.limit is not None:
                    stmt = stmt.limit(query.limit)
                rows = list(conn.execute(stmt).mappings())
            return self._results(conn, query, rows, study_uid, series_uid, visibility)

    def _search_patients(self, query: Query, vis: Visibility) -> list[dict[str, Any]]:
        """PATIENT level (C-FIND): studies grouped by (PatientID, IssuerOfPatientID).

        A patient matches when one of its studies does; its attributes are those of its
        newest study, and its counts cover all its studies, matching or not.
        """
        stmt, residual = self._select(replace(query, level=Level.STUDY), None, None, vis)
        key_cols = (s.study.c.patient_id, s.study.c.issuer_of_patient_id)
        with self.engine.connect() as conn:
            if residual:
                seen: dict[tuple[Any, Any], None] = {}  # ordered, newest study first
                rows = conn.execute(stmt.add_columns(*key_cols)).mappings()
                for row in rows:
                    key = (row["patient_id"], row["issuer_of_patient_id"])
                    if key not in seen and all(matches_json(c, json.loads(row["study_json"]),
                                                            query.fuzzy) for c in residual):
                        seen[key] = None
                keys = list(seen)[query.offset:]
                if query.limit is not None:
                    keys = keys[:query.limit]
            else:
                matched = stmt.with_only_columns(s.study.c.pk).order_by(None)
                grouped = (select(*key_cols).where(s.study.c.pk.in_(matched))
                           .group_by(*key_cols).order_by(*key_cols).offset(query.offset))
                if query.limit is not None:
                    grouped = grouped.limit(query.limit)
                keys = [(pid, issuer) for pid, issuer in conn.execute(grouped)]
            return self._patient_results(conn, query, keys, vis)

    def _patient_results(self, conn: Connection, query: Query, keys: list[tuple[Any, Any]],
                         vis: Visibility) -> list[dict[str, Any]]:
        if not keys:
            return []
        ids = {pid for pid, _ in keys if pid is not None}
        who = or_(s.study.c.patient_id.in_(ids), s.study.c.patient_id.is_(None)) \
            if any(pid is None for pid, _ in keys) else s.study.c.patient_id.in_(ids)
        counted = conn.execute(
            select(s.study.c.patient_id, s.study.c.issuer_of_patient_id,
                   func.count(func.distinct(s.study.c.pk)),
                   func.count(func.distinct(s.series.c.pk)), func.count(s.instance.c.pk),
                   func.max(s.study.c.pk))
            .select_from(s.study.join(s.series, s.series.c.study_pk == s.study.c.pk)
                         .join(s.instance, s.instance.c.series_pk == s.series.c.pk))
            .where(who, instance_visible(vis))
            .group_by(s.study.c.patient_id, s.study.c.issuer_of_patient_id))
        stats = {(pid, issuer): (n_st, n_se, n_in, latest)
                 for pid, issuer, n_st, n_se, n_in, latest in counted}
        latest_pks = [stats[k][3] for k in keys if k in stats]
        attributes = dict(conn.execute(select(s.study.c.pk, s.study.c.attributes)
                                       .where(s.study.c.pk.in_(latest_pks))).all())
        defaults = [*PATIENT_KEYS, *COMPUTED_KEYS[Level.PATIENT]]
        wanted = _wanted_tags(query, defaults)
        out = []
        for key in keys:
            if key not in stats:  # its studies were deleted meanwhile
                continue
            n_st, n_se, n_in, latest = stats[key]
            study_json = json.loads(attributes.get(latest, "{}"))
            ds = {k: v for k, v in study_json.items() if k.startswith("0010") or k == "00080005"}
            ds.update({"00201200": {"vr": "IS", "Value": [n_st]},
                       "00201202": {"vr": "IS", "Value": [n_se]},
                       "00201204": {"vr": "IS", "Value": [n_in]}})
            out.append(_shape(ds, wanted, query.include_all, defaults))
        return out

    def _select(self, query: Query, study_uid: str | None, series_uid: str | None,
                vis: Visibility) -> tuple[Select[Any], list[Condition]]:
        level = query.level
        cols: list[Any] = [s.study.c.pk.label("study_pk"), s.study.c.attributes.label("study_json"),
                           s.study.c.study_instance_uid]
        stmt: Select[Any]
        if level is Level.STUDY:
            stmt = select(*cols).select_from(s.study)
            order: list[Any] = [s.study.c.study_date.desc(), s.study.c.study_time.desc(),
                                s.study.c.pk.desc()]
        else:
            cols += [s.series.c.pk.label("series_pk"), s.series.c.attributes.label("series_json"),
                     s.series.c.series_instance_uid]
            joined = s.series.join(s.study, s.series.c.study_pk == s.study.c.pk)
            order = [s.series.c.series_number, s.series.c.pk]
            if level is Level.IMAGE:
                cols += [s.instance.c.pk.label("instance_pk"),
                         s.instance.c.metadata.label("instance_json")]
                joined = s.instance.join(joined, s.instance.c.series_pk == s.series.c.pk)
                order += [s.instance.c.instance_number, s.instance.c.pk]
            stmt = select(*cols).select_from(joined)
        if study_uid:
            stmt = stmt.where(s.study.c.study_instance_uid == study_uid)
        if series_uid:
            stmt = stmt.where(s.series.c.series_instance_uid == series_uid)
        if not vis.everything:
            if level is Level.STUDY and _narrow(query):
                stmt = stmt.where(study_visible_by_row(vis))
            else:
                stmt = stmt.where({Level.STUDY: study_visible, Level.SERIES: series_visible,
                                   Level.IMAGE: instance_visible}[level](vis))
        residual: list[Condition] = []
        for cond in query.conditions:
            if cond.kind is Kind.UNIVERSAL:
                continue
            name = cond.keyword
            if name in _COUNTS:
                raise InvalidQuery(f"{name} can be returned but not matched")
            mapped = COLUMNS.get(name) if not cond.is_nested else None
            if mapped is None:
                residual.append(cond)
                continue
            col_level, column = mapped
            clause = _clause(cond, column, query.fuzzy)
            if _DEPTH[col_level] <= _DEPTH[level]:
                stmt = stmt.where(clause)
            else:
                stmt = stmt.where(_exists_below(level, col_level, clause))
        return stmt.order_by(*order), residual

    def _results(self, conn: Connection, query: Query, rows: list[Any], study_uid: str | None,
                 series_uid: str | None, vis: Visibility) -> list[dict[str, Any]]:
        """PS3.18 10.6.3.3: each level's attributes, plus those of the levels above that
        are not fixed by the URL (e.g. PatientName in ``/series`` results)."""
        level = query.level
        defaults = list(DEFAULT_RETURN[level])
        with_study = level is Level.STUDY or not study_uid
        with_series = level is Level.SERIES or (level is Level.IMAGE and not series_uid)
        if with_study and level is not Level.STUDY:
            defaults += DEFAULT_RETURN[Level.STUDY]
        if with_series and level is Level.IMAGE:
            defaults += DEFAULT_RETURN[Level.SERIES]
        defaults = list(dict.fromkeys(defaults))
        wanted = _wanted_tags(query, defaults)
        groups = _owner_groups(rows, vis)
        stats = self._study_stats(conn, groups) if with_study else {}
        counts = self._series_counts(conn, groups) if with_series else {}
        out = []
        for r in rows:
            ds = json.loads(r["study_json"]) if with_study else {}
            ds["0020000D"] = _uid(r["study_instance_uid"])
            if with_study:
                ds.update(stats.get(r["study_pk"], _empty_study_stats()))
            if level is not Level.STUDY:
                if with_series:
                    ds.update(json.loads(r["series_json"]))
                    ds["00201209"] = {"vr": "IS", "Value": [counts.get(r["series_pk"], 0)]}
                ds["0020000E"] = _uid(r["series_instance_uid"])
            if level is Level.IMAGE:
                inst = json.loads(r["instance_json"])
                ds.update({k: v for k, v in inst.items() if "BulkDataURI" not in v})
            out.append(_shape(ds, wanted, query.include_all, defaults))
        return out

    def _study_stats(self, conn: Connection,
                     groups: dict[frozenset[int] | None, list[Any]]
                     ) -> dict[int, dict[str, Any]]:
        """Counts, ModalitiesInStudy and SOPClassesInStudy of the result's studies, over
        the instances each may show."""
        stats: dict[int, dict[str, Any]] = defaultdict(_empty_study_stats)
        pks = list(dict.fromkeys(r["study_pk"] for rows in groups.values() for r in rows))
        if not pks:
            return stats
        visible = _owned_in_result(groups)
        joined = s.series.join(s.instance, s.instance.c.series_pk == s.series.c.pk)
        counted = conn.execute(
            select(s.series.c.study_pk, func.count(func.distinct(s.series.c.pk)),
                   func.count(s.instance.c.pk))
            .select_from(joined).where(s.series.c.study_pk.in_(pks), visible)
            .group_by(s.series.c.study_pk))
        for pk, n_series, n_inst in counted:
            stats[pk]["00201206"] = {"vr": "IS", "Value": [n_series]}
            stats[pk]["00201208"] = {"vr": "IS", "Value": [n_inst]}
        kinds = conn.execute(
            select(s.series.c.study_pk, s.series.c.modality, s.instance.c.sop_class_uid)
            .select_from(joined).where(s.series.c.study_pk.in_(pks), visible).distinct())
        modalities: dict[int, set[str]] = defaultdict(set)
        classes: dict[int, set[str]] = defaultdict(set)
        for pk, modality, sop_class in kinds:
            if modality:
                modalities[pk].add(modality)
            classes[pk].add(sop_class)
        for pk in pks:
            if modalities[pk]:
                stats[pk]["00080061"] = {"vr": "CS", "Value": sorted(modalities[pk])}
            if classes[pk]:
                stats[pk]["00080062"] = {"vr": "UI", "Value": sorted(classes[pk])}
        return stats

    def _series_counts(self, conn: Connection,
                       groups: dict[frozenset[int] | None, list[Any]]) -> dict[int, int]:
        pks = list(dict.fromkeys(r["series_pk"] for rows in groups.values() for r in rows))
        if not pks:
            return {}
        found = conn.execute(
            select(s.instance.c.series_pk, func.count())
            .select_from(s.instance.join(s.series, s.instance.c.series_pk == s.series.c.pk))
            .where(s.instance.c.series_pk.in_(pks), _owned_in_result(groups))
            .group_by(s.instance.c.series_pk))
        return {pk: n for pk, n in found}

    # -- retrieve, delete, check -----------------------------------------------------------
    def _located(self, study_uid: str, series_uid: str | None, sop_uid: str | None,
                 extra: Sequence[Any] = (), vis: Visibility = EVERYTHING) -> Select[Any]:
        stmt = (
            select(s.study.c.study_instance_uid, s.series.c.series_instance_uid,
                   s.instance.c.sop_instance_uid, s.instance.c.sop_class_uid,
                   s.instance.c.transfer_syntax_uid, s.instance.c.blob_key, s.instance.c.size,
                   s.instance.c.sha256, s.instance.c.number_of_frames, *extra)
            .select_from(s.instance.join(s.series, s.instance.c.series_pk == s.series.c.pk)
                         .join(s.study, s.series.c.study_pk == s.study.c.pk))
            .where(s.study.c.study_instance_uid == study_uid)
            .order_by(s.series.c.series_number, s.series.c.pk, s.instance.c.instance_number,
                      s.instance.c.pk)
        )
        if series_uid:
            stmt = stmt.where(s.series.c.series_instance_uid == series_uid)
        if sop_uid:
            stmt = stmt.where(s.instance.c.sop_instance_uid == sop_uid)
        if not vis.everything:
            stmt = stmt.where(instance_visible(vis))
        return stmt

    def locate(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
               with_metadata: bool = False, visibility: Visibility = EVERYTHING
               ) -> list[tuple[StoredInstance, str | None]]:
        if visibility.nothing:
            return []
        extra = [s.instance.c.metadata] if with_metadata else []
        with self.engine.connect() as conn:
            rows = conn.execute(self._located(study_uid, series_uid, sop_uid, extra,
                                              visibility)).all()
        return [(StoredInstance(*row[:9]), row[9] if with_metadata else None) for row in rows]

    def remove(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, organisation: int | None = None
               ) -> list[StoredInstance]:
        with self._write_lock(), self.engine.begin() as conn:
            rows = conn.execute(self._located(study_uid, series_uid, sop_uid,
                                              [s.instance.c.pk])).all()
            if organisation is not None:
                rows = self._disown(conn, rows, organisation)
            gone = [StoredInstance(*row[:9]) for row in rows]
            uids = [g.sop_uid for g in gone]
            for start in range(0, len(uids), 500):
                conn.execute(delete(s.instance)
                             .where(s.instance.c.sop_instance_uid.in_(uids[start:start + 500])))
            conn.execute(delete(s.series).where(
                ~exists().where(s.instance.c.series_pk == s.series.c.pk),
                s.series.c.study_pk.in_(select(s.study.c.pk)
                                        .where(s.study.c.study_instance_uid == study_uid))))
            conn.execute(delete(s.study).where(
                s.study.c.study_instance_uid == study_uid,
                ~exists().where(s.series.c.study_pk == s.study.c.pk)))
        return gone

    def _disown(self, conn: Connection, rows: Sequence[Any], organisation: int) -> list[Any]:
        """Drop one organisation's ownership of ``rows``; return the rows left unowned.
        Raises NotFound when the organisation owns none of them."""
        pks = [row[9] for row in rows]
        owned: set[int] = set()
        for start in range(0, len(pks), 500):
            owned |= set(conn.execute(
                select(s.instance_owner.c.instance_pk).where(
                    s.instance_owner.c.organisation_pk == organisation,
                    s.instance_owner.c.instance_pk.in_(pks[start:start + 500]))).scalars())
        if not owned:
            raise NotFound("nothing stored by your organisation is here")
        mine = sorted(owned)
        still_owned: set[int] = set()
        for start in range(0, len(mine), 500):
            chunk = mine[start:start + 500]
            conn.execute(delete(s.instance_owner).where(
                s.instance_owner.c.organisation_pk == organisation,
                s.instance_owner.c.instance_pk.in_(chunk)))
            still_owned |= set(conn.execute(
                select(s.instance_owner.c.instance_pk)
                .where(s.instance_owner.c.instance_pk.in_(chunk))).scalars())
        study_pks = conn.execute(select(s.study.c.pk).where(
            s.study.c.study_instance_uid == rows[0][0])).scalars().all()
        conn.execute(delete(s.study_owner).where(
            s.study_owner.c.organisation_pk == organisation,
            s.study_owner.c.study_pk.in_(study_pks),
            ~exists().where(s.instance_owner.c.organisation_pk == organisation,
                            s.instance_owner.c.instance_pk == s.instance.c.pk,
                            s.instance.c.series_pk == s.series.c.pk,
                            s.series.c.study_pk == s.study_owner.c.study_pk)))
        return [row for row in rows if row[9] in owned and row[9] not in still_owned]

    def adopt(self, sop_uid: str) -> list[str]:
        """Give an instance nobody owns to its study's owners, or to the only organisation
        when the study has none; return the new owners' names. ``check --repair`` re-indexes
        orphan blobs this way: the uploader is unknown, the study's owners are its home."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(s.instance.c.pk, s.series.c.study_pk)
                .join(s.series, s.series.c.pk == s.instance.c.series_pk)
                .where(s.instance.c.sop_instance_uid == sop_uid)).first()
            if row is None or conn.execute(select(s.instance_owner.c.instance_pk).where(
                    s.instance_owner.c.instance_pk == row[0]).limit(1)).first():
                return []
            owners = owners_of_study(conn, row[1])
            if not owners:
                orgs = conn.execute(select(s.organisation.c.pk).limit(2)).scalars().all()
                owners = set(orgs) if len(orgs) == 1 else set()
            for org in sorted(owners):
                conn.execute(self._insert_instance_owner,
                             {"instance_pk": row[0], "organisation_pk": org})
                conn.execute(self._insert_study_owner,
                             {"study_pk": row[1], "organisation_pk": org})
            return sorted(conn.execute(select(s.organisation.c.name).where(
                s.organisation.c.pk.in_(owners))).scalars())

    def study_facts(self, study_uid: str) -> tuple[str | None, list[int]]:
        """(PatientID, owner organisations) of a study, for the audit trail."""
        with self.engine.connect() as conn:
            row = conn.execute(select(s.study.c.pk, s.study.c.patient_id).where(
                s.study.c.study_instance_uid == study_uid)).first()
            if row is None:
                return None, []
            return row[1], sorted(owners_of_study(conn, row[0]))

    def all_instances(self) -> Iterator[StoredInstance]:
        stmt = (
            select(s.study.c.study_instance_uid, s.series.c.series_instance_uid,
                   s.instance.c.sop_instance_uid, s.instance.c.sop_class_uid,
                   s.instance.c.transfer_syntax_uid, s.instance.c.blob_key, s.instance.c.size,
                   s.instance.c.sha256, s.instance.c.number_of_frames)
            .select_from(s.instance.join(s.series, s.instance.c.series_pk == s.series.c.pk)
                         .join(s.study, s.series.c.study_pk == s.study.c.pk))
            .order_by(s.instance.c.pk)
        )
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(stmt):
                yield StoredInstance(*row)

    def counts(self) -> dict[str, int]:
        """Totals for the status page and tests."""
        with self.engine.connect() as conn:
            return {
                name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for name, table in (("studies", s.study), ("series", s.series),
                                    ("instances", s.instance))
            }


def _col(keyword: str) -> str:
    return COLUMNS[keyword][1].name


def _lower(value: str | None) -> str | None:
    return value.lower() if value else value


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _empty_study_stats() -> dict[str, Any]:
    return {"00201206": {"vr": "IS", "Value": [0]}, "00201208": {"vr": "IS", "Value": [0]}}


def _owner_groups(rows: list[Any], vis: Visibility
                  ) -> dict[frozenset[int] | None, list[Any]]:
    """Result rows by the set of owners whose instances they may show (None: all)."""
    if not rows:
        return {}
    if vis.everything:
        return {None: rows}
    groups: dict[frozenset[int] | None, list[Any]] = defaultdict(list)
    for row in rows:
        patient = ("", "")
        if vis.openings and any(o.patients for o in vis.openings):
            study = json.loads(row["study_json"])
            patient = (_first(study, "00100020"), _first(study, "00100021"))
        groups[vis.owners_for(row["study_instance_uid"], patient)].append(row)
    return groups


_NARROWING = {"StudyInstanceUID", "PatientID", "AccessionNumber", "SeriesInstanceUID",
              "SOPInstanceUID"}


def _narrow(query: Query) -> bool:
    """An exact value or UID list on a selective indexed key: few candidate studies."""
    return any(c.keyword in _NARROWING and c.kind in (Kind.SINGLE, Kind.LIST)
               and not c.is_nested for c in query.conditions)


def _owned_in_result(groups: dict[frozenset[int] | None, list[Any]]) -> Any:
    """Instances (``instance`` and ``series`` in scope) whose owner is visible for their
    study: one condition for a whole page of results, with IN lists no longer than it."""
    if None in groups:
        return true()
    by_owner: dict[int, set[int]] = defaultdict(set)
    everywhere = {r["study_pk"] for rows in groups.values() for r in rows}
    for owners, rows in groups.items():
        for owner in owners or ():
            by_owner[owner] |= {r["study_pk"] for r in rows}
    parts = [(s.instance_owner.c.organisation_pk == owner) if studies == everywhere else
             and_(s.instance_owner.c.organisation_pk == owner,
                  s.series.c.study_pk.in_(sorted(studies)))
             for owner, studies in sorted(by_owner.items())]
    if not parts:
        return false()
    return exists().where(s.instance_owner.c.instance_pk == s.instance.c.pk, or_(*parts))


def _first(ds: dict[str, Any], tag: str) -> str:
    values = ds.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _row_json(level: Level, row: Any) -> dict[str, Any]:
    ds: dict[str, Any] = json.loads(row["study_json"])
    if level is not Level.STUDY:
        ds.update(json.loads(row["series_json"]))
    if level is Level.IMAGE:
        ds.update(json.loads(row["instance_json"]))
    return ds


def _wanted_tags(query: Query, defaults: list[str]) -> set[str]:
    tags = {tag_hex(parse_tag(k)) for k in defaults}
    tags |= {tag_hex(t) for t in query.include}
    tags |= {tag_hex(c.path[0]) for c in query.conditions}
    return tags


def _shape(ds: dict[str, Any], wanted: set[str], include_all: bool,
           defaults: list[str]) -> dict[str, Any]:
    """Keep what the client asked for; required attributes appear even when empty."""
    ds["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
    if include_all:
        return dict(sorted(ds.items()))
    out = {k: v for k, v in ds.items() if k in wanted}
    for key in defaults:
        tag = tag_hex(parse_tag(key))
        if tag not in out and key not in ("RetrieveURL", "RequestAttributesSequence",
                                          "TimezoneOffsetFromUTC", "SpecificCharacterSet",
                                          "NumberOfFrames"):
            out[tag] = {"vr": vr_of(parse_tag(key))}
    return dict(sorted(out.items()))


def _clause(cond: Condition, column: Any, fuzzy: bool) -> ColumnElement[bool]:
    """One condition on one column, following matching.matches_value exactly."""
    numeric = column.type.python_type is int
    if cond.kind is Kind.LIST:
        return column.in_([_typed(v, numeric) for v in cond.value])
    if cond.kind is Kind.RANGE:
        low, high = cond.value
        parts = []
        if low:
            parts.append(column >= low)
        if high:
            parts.append(func.substr(column, 1, len(high)) <= high)
        return and_(*parts)
    ci = cond.vr == "PN"
    # PN columns used for matching hold lower-cased values (see schema.py).
    target = column if ci and column.name.endswith("_lc") else \
        func.lower(column) if ci else column
    if cond.kind is Kind.WILDCARD:
        pattern = (cond.value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                   .replace("*", "%").replace("?", "_"))
        clause = target.like(pattern.lower() if ci else pattern, escape="\\")
        if set(cond.value) == {"*"}:
            return or_(clause, column.is_(None))
        return clause
    if ci and fuzzy:
        value = cond.value.lower().replace("%", "\\%").replace("_", "\\_")
        return or_(target.like(f"{value}%", escape="\\"), target.like(f"%^{value}%", escape="\\"),
                   target.like(f"% {value}%", escape="\\"))
    return target == (cond.value.lower() if ci else _typed(cond.value, numeric))


def _typed(value: str, numeric: bool) -> Any:
    if not numeric:
        return value
    try:
        return int(value)
    except ValueError:
        raise InvalidQuery(f"{value!r} is not a number") from None


def _exists_below(level: Level, col_level: Level, clause: ColumnElement[bool]) -> Any:
    """A condition on a lower level: "has at least one series/instance that matches"."""
    if col_level is Level.SERIES:
        return exists().where(s.series.c.study_pk == s.study.c.pk, clause)
    if level is Level.STUDY:
        return exists().where(s.series.c.study_pk == s.study.c.pk,
                              s.instance.c.series_pk == s.series.c.pk, clause)
    return exists().where(s.instance.c.series_pk == s.series.c.pk, clause)
