"""A person's imaging history, and the priors of a study, as the caller may see them.

Every study row of every record of the person is found by PatientID (indexed), then
narrowed to the caller's visibility row by row (``study_visible_by_row``: the studies of
one patient are few, so testing each costs less than computing every visible study):
studies the caller may not see are neither listed nor counted. Series (modality, body
part) come only from visible series; source organisations only among the owners whose
data the caller sees; consult states only of consults the caller's organisation is party
to.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.engine import Connection

from dicomshare.access.policy import Principal, Visibility
from dicomshare.config import Settings
from dicomshare.dicom.json import first, values
from dicomshare.dimse import scu
from dicomshare.dimse.aes import RemoteAE
from dicomshare.errors import InvalidInput, NotFound, RemoteError
from dicomshare.patients.identity import Patients, Record, record_studies, study_qualifiers
from dicomshare.storage import schema as s
from dicomshare.storage.visibility import series_visible, study_visible_by_row

_DATE = re.compile(r"^\d{8}$")
REPORT_MODALITIES = frozenset({"SR", "DOC"})


@dataclass(frozen=True)
class Filters:
    modalities: frozenset[str] = frozenset()
    date_from: str | None = None
    date_to: str | None = None

    @staticmethod
    def parse(modality: list[str] | None, date_from: str | None,
              date_to: str | None) -> Filters:
        mods = frozenset(m.strip().upper() for x in modality or [] for m in x.split(",")
                         if m.strip())
        for name, value in (("from", date_from), ("to", date_to)):
            if value is not None and not _DATE.match(value.replace("-", "")):
                raise InvalidInput(f"{name} is a date: YYYYMMDD or YYYY-MM-DD")
        return Filters(mods, date_from.replace("-", "") if date_from else None,
                       date_to.replace("-", "") if date_to else None)


def studies(conn: Connection, patients: Patients, who: Principal, vis: Visibility,
            records: list[Record], filters: Filters = Filters()) -> list[dict[str, Any]]:
    """The visible studies of ``records`` in time order (oldest first)."""
    if not records:
        return []
    st = s.study
    conds: list[Any] = [or_(*[record_studies(x) for x in records]), study_visible_by_row(vis)]
    if filters.date_from:
        conds.append(st.c.study_date >= filters.date_from)
    if filters.date_to:
        conds.append(st.c.study_date <= filters.date_to)
    if filters.modalities:
        conds.append(exists().where(s.series.c.study_pk == st.c.pk,
                                    s.series.c.modality.in_(sorted(filters.modalities))))
    rows = conn.execute(select(
        st.c.pk, st.c.study_instance_uid, st.c.study_date, st.c.study_time,
        st.c.study_description, st.c.accession_number, st.c.patient_id,
        st.c.issuer_of_patient_id, st.c.issuer_universal_id, st.c.patient_name
    ).where(*conds)).all()
    if not rows:
        return []
    pks = [row.pk for row in rows]
    series: dict[int, list[Any]] = defaultdict(list)
    for ser in conn.execute(select(
            s.series.c.study_pk, s.series.c.modality, s.series.c.body_part_examined)
            .select_from(s.series.join(st, st.c.pk == s.series.c.study_pk))
            .where(s.series.c.study_pk.in_(pks), series_visible(vis))):
        series[ser.study_pk].append(ser)
    owners: dict[int, set[int]] = defaultdict(set)
    for study_pk, org in conn.execute(select(
            s.study_owner.c.study_pk, s.study_owner.c.organisation_pk)
            .where(s.study_owner.c.study_pk.in_(pks))):
        owners[study_pk].add(org)
    wanted = sorted({o for orgs in owners.values() for o in orgs})
    org_names = {pk: name for pk, name in conn.execute(select(
        s.organisation.c.pk, s.organisation.c.name).where(s.organisation.c.pk.in_(wanted)))}
    consults = _consults(conn, who, [row.study_instance_uid for row in rows])
    merged = patients.merged_into(conn, [x.pk for x in records])
    by_key = {x.pk: x for x in records}
    out = []
    for row in rows:
        patient = (row.patient_id or "", row.issuer_of_patient_id or "")
        seen = owners[row.pk] if vis.everything else \
            owners[row.pk] & vis.owners_for(row.study_instance_uid, patient)
        rec = _record_of(records, row, owners[row.pk])
        mods = sorted({x.modality for x in series[row.pk] if x.modality})
        parts = sorted({x.body_part_examined.upper() for x in series[row.pk]
                        if x.body_part_examined})
        out.append({
            "study_uid": row.study_instance_uid, "study_date": row.study_date,
            "study_time": row.study_time, "description": row.study_description,
            "accession_number": row.accession_number, "modalities": mods,
            "body_parts": parts, "patient_id": row.patient_id,
            "issuer_of_patient_id": row.issuer_of_patient_id,
            "patient_name": row.patient_name,
            "record": rec.ref if rec else None,
            "merged_into": by_key[merged[rec.pk]].ref if rec and rec.pk in merged and
            merged[rec.pk] in by_key else None,
            "organisations": sorted(org_names.get(o, str(o)) for o in seen),
            "reported": bool(REPORT_MODALITIES & set(mods)),
            "consults": consults.get(row.study_instance_uid, []),
        })
    shown = {e["record"] for e in out}
    for e in out:  # a merge target the caller sees nothing of stays unnamed
        if e["merged_into"] not in shown:
            e["merged_into"] = None
    out.sort(key=lambda e: (e["study_date"] or "", e["study_time"] or "", e["study_uid"]))
    return out


def _record_of(records: list[Record], row: Any, owners: set[int]) -> Record | None:
    quals = study_qualifiers(row.issuer_of_patient_id, row.issuer_universal_id, owners)
    for rec in records:
        if rec.patient_id == row.patient_id and rec.qualifier in quals:
            return rec
    return None


def _consults(conn: Connection, who: Principal, uids: list[str]) -> dict[str, list[Any]]:
    """Consult states per study, of consults the caller's organisation is party to."""
    c, cs = s.consult, s.consult_study
    stmt = select(cs.c.study_instance_uid, c.c.pk, c.c.state, c.c.urgency).select_from(
        cs.join(c, c.c.pk == cs.c.consult_pk)).where(cs.c.study_instance_uid.in_(uids))
    if not who.superuser:
        org = who.organisation_pk if who.organisation_pk is not None else -1
        stmt = stmt.where(or_(c.c.requester_organisation_pk == org,
                              c.c.specialist_organisation_pk == org))
    found: dict[str, list[Any]] = defaultdict(list)
    for uid, pk, state, urgency in conn.execute(stmt):
        found[uid].append({"id": pk, "state": state, "urgency": urgency})
    return found


def timeline(patients: Patients, who: Principal, ref: str,
             filters: Filters) -> dict[str, Any]:
    patients.sync()
    rec = patients.record(who, ref)
    vis = patients.visibility(who)
    with patients.engine.connect() as conn:
        person = patients.person_records(conn, rec)
        entries = studies(conn, patients, who, vis, person, filters)
        shown = [x for x in person if patients.visible(conn, x, vis)]
    patients.access.record(
        "patient.timeline", who, patient_ids=[x.patient_id for x in shown],
        details={"patient": ref, "studies": len(entries),
                 "filters": {"modality": sorted(filters.modalities),
                             "from": filters.date_from, "to": filters.date_to}})
    return {"patient": rec.as_json(), "records": [x.as_json() for x in shown],
            "studies": entries}


# -- priors -------------------------------------------------------------------------------------
def current_study(patients: Patients, conn: Connection, vis: Visibility,
                  uid: str) -> tuple[Any, list[Record]]:
    """The visible study ``uid`` and the records it belongs to (NotFound if invisible)."""
    st = s.study
    row = conn.execute(select(st).where(st.c.study_instance_uid == uid,
                                        study_visible_by_row(vis))).first()
    if row is None:
        raise NotFound(f"study {uid} not found")
    owners = [o for (o,) in conn.execute(select(s.study_owner.c.organisation_pk).where(
        s.study_owner.c.study_pk == row.pk))]
    quals = study_qualifiers(row.issuer_of_patient_id, row.issuer_universal_id, owners)
    return row, patients._where(conn, s.patient_record.c.patient_id == row.patient_id,
                                s.patient_record.c.qualifier.in_(quals))


def priors(patients: Patients, who: Principal, uid: str, settings: Settings,
           peers: list[RemoteAE]) -> dict[str, Any]:
    """Earlier studies of the same person with a modality or body part in common: the
    visible local ones, plus what the ``peers`` answer to a C-FIND on the person's visible
    PatientIDs (studies not held here)."""
    patients.sync()
    vis = patients.visibility(who)
    with patients.engine.connect() as conn:
        row, records = current_study(patients, conn, vis, uid)
        person_pks: set[int] = set()
        for rec in records:
            person_pks |= patients.person(conn, rec.pk)
        person = patients._by_pks(conn, person_pks)
        everything = studies(conn, patients, who, vis, person)
        shown = [x for x in person if patients.visible(conn, x, vis)]
    current = next((e for e in everything if e["study_uid"] == uid), None)
    mods = set(current["modalities"]) if current else set()
    parts = set(current["body_parts"]) if current else set()
    when = (row.study_date or "", row.study_time or "")
    local = [e for e in everything if e["study_uid"] != uid
             and (not when[0] or (e["study_date"] or "", e["study_time"] or "") < when)
             and (not (mods or parts) or mods & set(e["modalities"])
                  or parts & set(e["body_parts"]))]
    local.reverse()  # newest prior first
    for e in local:
        e["source"] = "local"
    remote, errors = _remote_priors(settings, peers, shown, when[0], mods,
                                    {e["study_uid"] for e in everything})
    patients.access.record("patient.priors", who, patient_ids=[x.patient_id for x in shown],
                           study_uids=[uid], details={
                               "local": len(local), "remote": len(remote),
                               "peers": [p.ae_title for p in peers]})
    return {"study_uid": uid, "modalities": sorted(mods), "body_parts": sorted(parts),
            "priors": local + remote, "remote_errors": errors}


def _remote_priors(settings: Settings, peers: list[RemoteAE], records: list[Record],
                   before: str, mods: set[str], known: set[str]
                   ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    found: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    seen = set(known)
    ids = sorted({x.patient_id for x in records})
    for peer in peers:
        for pid in ids:
            keys = {"PatientID": pid}
            if before:
                keys["StudyDate"] = f"-{before}"
            try:
                matches = scu.find(settings, peer, "study", keys)
            except RemoteError as exc:
                errors.append({"remote": peer.ae_title, "error": exc.reason})
                break
            for m in matches:
                study_uid = first(m, "0020000D")
                if not study_uid or study_uid in seen:
                    continue
                modalities = [str(v) for v in values(m, "00080061") if v]
                if mods and modalities and not mods & set(modalities):
                    continue
                seen.add(study_uid)
                found.append({"source": "remote", "remote": peer.ae_title,
                              "study_uid": study_uid, "study_date": first(m, "00080020"),
                              "study_time": first(m, "00080030"),
                              "description": first(m, "00081030"),
                              "accession_number": first(m, "00080050"),
                              "modalities": modalities, "patient_id": first(m, "00100020")})
    found.sort(key=lambda e: (e["study_date"] or "", e["study_time"] or ""), reverse=True)
    return found, errors


