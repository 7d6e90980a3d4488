"""Patient records, the links that join them into persons, and merges (ADT A40/A47).

- A **record** is a PatientID qualified by its issuer (``issuer:<IssuerOfPatientID>``, or
  ``issuer:<IssuerOfPatientID>&<UniversalEntityID>&<type>`` when the study carries
  IssuerOfPatientIDQualifiersSequence) or, when the study has neither, by each
  organisation that stored it (``org:<pk>``): the same
  PatientID from two organisations is two records until linked. Records are derived from
  the study rows by :meth:`Patients.sync` (incremental: the studies after the highest
  ``last_study_pk`` seen), and get an opaque, stable ``ref`` for URLs.
- A **person** is a connected component of the records joined by confirmed links and live
  merges; it is computed on every read, so unlinking (or undoing a merge) restores the
  previous view exactly. Nothing here touches study rows or stored DICOM.
- **Conflicts** are refused: a person may hold at most one live record per qualifier (one
  issuer saying two IDs are two people wins over a name match; a merge is the way to say
  the issuer's two IDs are one person), and never both ends of a rejected link.
- A caller sees a record when it may see at least one study of it (Access visibility);
  anything else answers 404, like what does not exist.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from dicomshare import clock
from dicomshare.access.policy import Action, Principal, Visibility
from dicomshare.access.service import Access
from dicomshare.errors import Conflict, Forbidden, InvalidInput, NotFound
from dicomshare.patients import matching
from dicomshare.storage import schema as s
from dicomshare.storage.visibility import study_visible_by_row

r = s.patient_record
lk = s.patient_link
mg = s.patient_merge
mk = s.patient_match_key
gap = s.patient_sync_gap
LINK_STATES = ("proposed", "confirmed", "rejected", "unlinked")
_SYNC_BATCH = 5000
_GAP_MAX = 1000
_GAP_TTL = timedelta(minutes=10)
_SYNC_LOCK = threading.Lock()


def qualifier_of(issuer: str | None, organisation_pk: int | None,
                 universal: str | None = None) -> str:
    """The qualifier of a record: the issuer in HL7's HD form (namespace, then the
    universal ID and its type when known), else the storing organisation."""
    if universal:
        return f"issuer:{issuer or ''}&{universal}"
    return f"issuer:{issuer}" if issuer else f"org:{organisation_pk}"


def study_qualifiers(issuer: str | None, universal: str | None,
                     owners: Iterable[int]) -> list[str]:
    """The qualifiers of the records a study row belongs to (one per owner without issuer)."""
    issuer = (issuer or "").strip() or None
    if issuer or universal:
        return [qualifier_of(issuer, None, universal)]
    return [qualifier_of(None, o) for o in sorted(set(owners))]


def person_of(conn: Connection, start: int) -> set[int]:
    """The records joined to record ``start`` by confirmed links and live merges."""
    seen = {start}
    frontier = [start]
    while frontier:
        edges: list[Any] = list(conn.execute(select(lk.c.record_a_pk, lk.c.record_b_pk).where(
            lk.c.state == "confirmed",
            or_(lk.c.record_a_pk.in_(frontier), lk.c.record_b_pk.in_(frontier)))))
        edges += conn.execute(select(mg.c.old_record_pk, mg.c.new_record_pk).where(
            mg.c.undone_at.is_(None),
            or_(mg.c.old_record_pk.in_(frontier), mg.c.new_record_pk.in_(frontier)))).all()
        frontier = [x for e in edges for x in e if x not in seen]
        seen.update(frontier)
    return seen


def same_person_ids(conn: Connection, patient_id: str, issuer: str) -> set[tuple[str, str]]:
    """Every (PatientID, issuer or "") of the persons a PatientID + issuer belongs to:
    itself, plus the identifiers of records joined to its records by confirmed links and
    live merges. Without an issuer, every organisation's record of that PatientID counts."""
    rec = s.patient_record
    where = (rec.c.issuer_of_patient_id == issuer) if issuer else \
        rec.c.issuer_of_patient_id.is_(None)
    found = {(patient_id, issuer)}
    starts = conn.execute(select(rec.c.pk).where(rec.c.patient_id == patient_id, where)
                          ).scalars().all()
    pks: set[int] = set()
    for start in starts:
        if start not in pks:
            pks |= person_of(conn, start)
    pks -= set(starts)
    for chunk in (sorted(pks)[i:i + 500] for i in range(0, len(pks), 500)):
        found |= {(row[0], row[1] or "") for row in conn.execute(
            select(rec.c.patient_id, rec.c.issuer_of_patient_id).where(rec.c.pk.in_(chunk)))}
    return found


@dataclass(frozen=True)
class Record:
    pk: int
    ref: str
    patient_id: str
    qualifier: str
    issuer: str | None
    organisation_pk: int | None
    organisation: str | None
    name: str | None
    birth_date: str | None
    sex: str | None
    other_ids: tuple[tuple[str, str], ...]
    universal_id: str | None = None  # UniversalEntityID&type of the issuer, when known

    @property
    def demographics(self) -> matching.Demographics:
        return matching.Demographics(self.patient_id, self.issuer or "", self.qualifier,
                                     self.name, self.birth_date, self.sex, self.other_ids)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.ref, "patient_id": self.patient_id,
                "issuer_of_patient_id": self.issuer,
                "issuer_universal_id": self.universal_id, "organisation": self.organisation,
                "qualifier": "issuer" if self.issuer or self.universal_id else "organisation",
                "patient_name": self.name, "birth_date": self.birth_date, "sex": self.sex}


def record_studies(rec: Record, study: Any = s.study) -> ColumnElement[bool]:
    """The study rows of a record (``study`` in scope)."""
    if rec.universal_id:
        return and_(study.c.patient_id == rec.patient_id,
                    study.c.issuer_universal_id == rec.universal_id,
                    func.coalesce(study.c.issuer_of_patient_id, "") == (rec.issuer or ""))
    if rec.issuer:
        return and_(study.c.patient_id == rec.patient_id,
                    study.c.issuer_of_patient_id == rec.issuer,
                    study.c.issuer_universal_id.is_(None))
    so = s.study_owner.alias("rec_so")
    return and_(study.c.patient_id == rec.patient_id,
                func.coalesce(study.c.issuer_of_patient_id, "") == "",
                study.c.issuer_universal_id.is_(None),
                exists().where(so.c.study_pk == study.c.pk,
                               so.c.organisation_pk == rec.organisation_pk))


def _record(row: Any) -> Record:
    try:
        others = tuple((str(a), str(b)) for a, b in json.loads(row.other_ids or "[]"))
    except (ValueError, TypeError):
        others = ()
    return Record(row.pk, row.ref, row.patient_id, row.qualifier, row.issuer_of_patient_id,
                  row.organisation_pk, row.org_name, row.patient_name,
                  row.patient_birth_date, row.patient_sex, others, row.issuer_universal_id)


_RECORDS = select(r, s.organisation.c.name.label("org_name")).select_from(
    r.outerjoin(s.organisation, r.c.organisation_pk == s.organisation.c.pk))


class Patients:
    def __init__(self, engine: Engine, access: Access) -> None:
        self.engine = engine
        self.access = access

    # -- records -----------------------------------------------------------------------------
    def sync(self, full: bool = False) -> int:
        """Make or refresh the records of studies added since the last sync (all of them
        with ``full``), and propose links for what changed. Returns the records touched."""
        with _SYNC_LOCK:
            try:
                return self._sync(full)
            except IntegrityError:  # another process made the same record: once more
                return self._sync(full)

    def _sync(self, full: bool) -> int:
        touched: set[int] = set()
        with self.engine.begin() as conn:
            if not full:
                touched |= self._recheck_gaps(conn)
            mark = 0 if full else int(conn.execute(
                select(func.coalesce(func.max(r.c.last_study_pk), 0))).scalar_one())
            while True:
                rows = self._study_rows(conn, s.study.c.pk > mark, limit=_SYNC_BATCH)
                if not rows:
                    break
                touched |= self._upsert(conn, [x for x in rows if x.patient_id])
                if not full:
                    self._note_gaps(conn, mark, {x.pk for x in rows})
                mark = rows[-1].pk
                if len(rows) < _SYNC_BATCH:
                    break
            if touched:
                self._propose(conn, touched)
        return len(touched)

    def _study_rows(self, conn: Connection, where: ColumnElement[bool],
                    limit: int | None = None) -> list[Any]:
        return list(conn.execute(
            select(s.study.c.pk, s.study.c.patient_id, s.study.c.issuer_of_patient_id,
                   s.study.c.issuer_universal_id, s.study.c.patient_name,
                   s.study.c.patient_birth_date, s.study.c.patient_sex,
                   s.study.c.attributes, s.study_owner.c.organisation_pk)
            .select_from(s.study.outerjoin(
                s.study_owner, s.study_owner.c.study_pk == s.study.c.pk))
            .where(where).order_by(s.study.c.pk).limit(limit)))

    def _note_gaps(self, conn: Connection, mark: int, pks: set[int]) -> None:
        """Remember the pks a batch stepped over (the newest first, at most _GAP_MAX): a
        transaction still open may commit a study there after this sync."""
        missing: list[int] = []
        for pk in range(max(pks) - 1, mark, -1):
            if pk not in pks:
                missing.append(pk)
                if len(missing) >= _GAP_MAX:
                    break
        if missing:
            conn.execute(delete(gap).where(gap.c.study_pk.in_(missing)))
            now = clock.now()
            conn.execute(insert(gap), [{"study_pk": pk, "seen_at": now} for pk in missing])

    def _recheck_gaps(self, conn: Connection) -> set[int]:
        """Sync the studies that have appeared in earlier gaps; forget expired gaps (a
        rolled-back insert or a deleted study never fills its pk)."""
        known = conn.execute(select(gap.c.study_pk, gap.c.seen_at)).all()  # reads first:
        if not known:  # no write lock on the common path
            return set()
        expiry = clock.now() - _GAP_TTL
        if any(clock.aware(seen) < expiry for _, seen in known):
            conn.execute(delete(gap).where(gap.c.seen_at < expiry))
        pks = sorted(pk for pk, _ in known)
        rows = [x for i in range(0, len(pks), 500)
                for x in self._study_rows(conn, s.study.c.pk.in_(pks[i:i + 500]))]
        if not rows:
            return set()
        conn.execute(delete(gap).where(gap.c.study_pk.in_(sorted({x.pk for x in rows}))))
        return self._upsert(conn, [x for x in rows if x.patient_id])

    def _upsert(self, conn: Connection, rows: Sequence[Any]) -> set[int]:
        """Records for a batch of study rows (the newest study's demographics win), with
        their match keys; returns the records made or changed."""
        latest: dict[tuple[str, str], tuple[Any, str | None, int | None]] = {}
        for row in rows:
            issuer = (row.issuer_of_patient_id or "").strip() or None
            universal = row.issuer_universal_id
            org = None if issuer or universal else row.organisation_pk
            if not issuer and not universal and org is None:
                continue  # neither issuer nor owner: an archive from before ownership
            latest[(row.patient_id, qualifier_of(issuer, org, universal))] = (row, issuer, org)
        if not latest:
            return set()
        existing: dict[tuple[str, str], tuple[int, int]] = {}
        pids = sorted({pid for pid, _ in latest})
        for i in range(0, len(pids), 500):
            for pk, pid, qual, last in conn.execute(select(
                    r.c.pk, r.c.patient_id, r.c.qualifier, r.c.last_study_pk)
                    .where(r.c.patient_id.in_(pids[i:i + 500]))):
                existing[(pid, qual)] = (pk, last)
        now = clock.now()
        new_rows: list[dict[str, Any]] = []
        changed: dict[int, dict[str, Any]] = {}
        for (pid, qual), (row, issuer, org) in latest.items():
            values = {"patient_name": row.patient_name,
                      "patient_birth_date": row.patient_birth_date,
                      "patient_sex": row.patient_sex, "last_study_pk": row.pk,
                      "other_ids": json.dumps(matching.other_ids(row.attributes)),
                      "updated_at": now}
            found = existing.get((pid, qual))
            if found is None:
                new_rows.append({"ref": secrets.token_urlsafe(12), "patient_id": pid,
                                 "qualifier": qual, "issuer_of_patient_id": issuer,
                                 "issuer_universal_id": row.issuer_universal_id,
                                 "organisation_pk": org, "created_at": now, **values})
            elif found[1] < row.pk:
                changed[found[0]] = values
        for pk, values in changed.items():
            conn.execute(update(r).where(r.c.pk == pk).values(**values))
        if new_rows:
            conn.execute(insert(r), new_rows)
        refs = [x["ref"] for x in new_rows]
        made = [int(pk) for i in range(0, len(refs), 500) for (pk,) in conn.execute(
            select(r.c.pk).where(r.c.ref.in_(refs[i:i + 500])))]
        touched = set(changed) | set(made)
        self._index_keys(conn, touched)
        return touched

    def _index_keys(self, conn: Connection, pks: set[int]) -> None:
        recs = self._by_pks(conn, pks)
        wanted = sorted(pks)
        for i in range(0, len(wanted), 500):
            conn.execute(delete(mk).where(mk.c.record_pk.in_(wanted[i:i + 500])))
        keys = [{"record_pk": x.pk, "key": k} for x in recs
                for k in matching.match_keys(x.demographics)]
        if keys:
            conn.execute(insert(mk), keys)

    def _propose(self, conn: Connection, pks: Iterable[int]) -> None:
        """Proposals for changed records: records sharing a match key are candidates,
        :func:`matching.evidence` decides; a pair with any link row is never re-proposed."""
        wanted = sorted(set(pks))
        other = mk.alias("other")
        pairs: set[tuple[int, int]] = set()
        for i in range(0, len(wanted), 500):
            for a, b in conn.execute(
                    select(mk.c.record_pk, other.c.record_pk)
                    .select_from(mk.join(other, and_(other.c.key == mk.c.key,
                                                     other.c.record_pk != mk.c.record_pk)))
                    .where(mk.c.record_pk.in_(wanted[i:i + 500]))):
                pairs.add((min(a, b), max(a, b)))
        if not pairs:
            return
        recs = {x.pk: x for x in self._by_pks(conn, {p for pair in pairs for p in pair})}
        for a_pk, b_pk in sorted(pairs):
            a, b = recs[a_pk], recs[b_pk]
            why = matching.evidence(a.demographics, b.demographics)
            if why is None or self._pair_rows(conn, a_pk, b_pk):
                continue
            link_pk = conn.execute(insert(lk).values(
                record_a_pk=a_pk, record_b_pk=b_pk, state="proposed", origin="rule",
                evidence=json.dumps(why), created_at=clock.now()).returning(lk.c.pk)
            ).scalar_one()
            self.access.record("patient.link.propose", None, patient_ids=[
                a.patient_id, b.patient_id], details={"link": link_pk, **why})

    def _pair_rows(self, conn: Connection, a: int, b: int) -> list[Any]:
        a, b = sorted((a, b))
        return list(conn.execute(select(lk).where(lk.c.record_a_pk == a,
                                                  lk.c.record_b_pk == b)))

    def _where(self, conn: Connection, *conds: Any) -> list[Record]:
        return [_record(row) for row in conn.execute(_RECORDS.where(*conds).limit(1000))]

    def _by_pks(self, conn: Connection, pks: Iterable[int]) -> list[Record]:
        wanted = sorted(set(pks))
        out: list[Record] = []
        for i in range(0, len(wanted), 500):
            out += self._where(conn, r.c.pk.in_(wanted[i:i + 500]))
        return out

    # -- visibility ----------------------------------------------------------------------------
    def visibility(self, who: Principal) -> Visibility:
        return self.access.grants.visibility(who, Action.SEARCH)

    def visible(self, conn: Connection, rec: Record, vis: Visibility) -> bool:
        return conn.execute(select(s.study.c.pk).where(
            record_studies(rec), study_visible_by_row(vis)).limit(1)).first() is not None

    def record(self, who: Principal, ref: str) -> Record:
        """The record ``ref`` if the caller sees one of its studies; NotFound otherwise."""
        vis = self.visibility(who)
        with self.engine.connect() as conn:
            found = self._where(conn, r.c.ref == ref)
            if not found or not self.visible(conn, found[0], vis):
                raise NotFound(f"no patient {ref!r}")
            return found[0]

    def find(self, who: Principal, patient_id: str | None, issuer: str | None = None,
             name: str | None = None, limit: int = 100,
             vis: Visibility | None = None) -> list[Record]:
        """Visible records by PatientID (and issuer) or by a name prefix. A caller that
        passes its ``vis`` has synced already (one request, many lookups)."""
        if not patient_id and not name:
            raise InvalidInput("give patient_id or name")
        if vis is None:
            self.sync()
            vis = self.visibility(who)
        conds: list[Any] = []
        if patient_id:
            conds.append(r.c.patient_id == patient_id)
        if issuer:
            conds.append(r.c.issuer_of_patient_id == issuer)
        with self.engine.connect() as conn:
            if name:
                pids = conn.execute(select(s.study.c.patient_id).distinct().where(
                    s.study.c.patient_name_lc.like(_prefix(name.lower()), escape="\\"),
                    study_visible_by_row(vis)).limit(limit)).scalars().all()
                conds.append(r.c.patient_id.in_([p for p in pids if p]))
            recs = self._where(conn, *conds)
            return [x for x in recs if self.visible(conn, x, vis)][:limit]

    # -- persons -------------------------------------------------------------------------------
    def person(self, conn: Connection, start: int) -> set[int]:
        return person_of(conn, start)

    def person_records(self, conn: Connection, rec: Record) -> list[Record]:
        return self._by_pks(conn, self.person(conn, rec.pk))

    def merged_into(self, conn: Connection, pks: Iterable[int]) -> dict[int, int]:
        """old record pk -> new record pk, for live merges."""
        return {int(a): int(b) for a, b in conn.execute(
            select(mg.c.old_record_pk, mg.c.new_record_pk).where(
                mg.c.undone_at.is_(None), mg.c.old_record_pk.in_(sorted(set(pks)))))}

    def _check_joinable(self, conn: Connection, a: int, b: int,
                        retiring: int | None = None) -> None:
        """Refuse a link (or a merge retiring ``retiring``) that would give one person two
        records of one qualifier or join the ends of a rejected link (docs/patients.md,
        "Conflicts")."""
        left, right = self.person(conn, a), self.person(conn, b)
        if left & right:
            raise Conflict("these records are already linked into one person")
        union = left | right
        retired = set(self.merged_into(conn, union)) | {retiring} - {None}
        seen: dict[str, int] = {}
        for rec in self._by_pks(conn, union - retired):
            if rec.qualifier in seen:
                raise Conflict(
                    f"the person would hold two patient IDs of one issuer ({rec.patient_id} "
                    "and another): a record belongs to one person only; merge the IDs first "
                    "if the issuer made them one patient")
            seen[rec.qualifier] = rec.pk
        if retiring is not None:
            return  # a merge is the issuer's word on its own IDs: rejections do not bind it
        rejected = conn.execute(select(lk.c.pk).where(
            lk.c.state == "rejected", lk.c.record_a_pk.in_(sorted(union)),
            lk.c.record_b_pk.in_(sorted(union)))).first()
        if rejected is not None:
            raise Conflict(f"link {rejected[0]} between two of these records was rejected")

    # -- links ---------------------------------------------------------------------------------
    def links(self, who: Principal, state: str | None = None,
              ref: str | None = None) -> list[dict[str, Any]]:
        """Links whose two records the caller may see (all, or of one record)."""
        if state is not None and state not in LINK_STATES:
            raise InvalidInput(f"state is one of {', '.join(LINK_STATES)}")
        self.sync()
        vis = self.visibility(who)
        with self.engine.connect() as conn:
            stmt = select(lk).order_by(lk.c.pk.desc()).limit(500)
            if state:
                stmt = stmt.where(lk.c.state == state)
            if ref is not None:
                rec = self._where(conn, r.c.ref == ref)
                if not rec or not self.visible(conn, rec[0], vis):
                    raise NotFound(f"no patient {ref!r}")
                stmt = stmt.where(or_(lk.c.record_a_pk == rec[0].pk,
                                      lk.c.record_b_pk == rec[0].pk))
            rows = conn.execute(stmt).all()
            recs = {x.pk: x for x in self._by_pks(
                conn, [p for row in rows for p in (row.record_a_pk, row.record_b_pk)])}
            shown = {pk for pk, x in recs.items() if self.visible(conn, x, vis)}
            users = self._user_names(conn, rows)
            return [_link_json(row, recs, users) for row in rows
                    if row.record_a_pk in shown and row.record_b_pk in shown]

    def _user_names(self, conn: Connection, rows: Iterable[Any]) -> dict[int, str]:
        pks = {p for row in rows for p in (row.created_by_user_pk, row.decided_by_user_pk,
                                           getattr(row, "unlinked_by_user_pk", None)) if p}
        if not pks:
            return {}
        return {pk: name for pk, name in conn.execute(select(s.user.c.pk, s.user.c.name)
                                                      .where(s.user.c.pk.in_(sorted(pks))))}

    def _may_decide(self, who: Principal) -> None:
        if not (who.superuser or who.role in ("admin", "clinician")):
            raise Forbidden("only clinicians and admins link patient records")

    def _visible_pair(self, conn: Connection, vis: Visibility, a: Record, b: Record) -> None:
        for x in (a, b):
            if not self.visible(conn, x, vis):
                raise NotFound(f"no patient {x.ref!r}")

    def _link_row(self, conn: Connection, who: Principal, link_id: int,
                  vis: Visibility) -> tuple[Any, Record, Record]:
        row = conn.execute(select(lk).where(lk.c.pk == link_id)).first()
        if row is None:
            raise NotFound(f"no patient link {link_id}")
        pair = self._by_pks(conn, [row.record_a_pk, row.record_b_pk])
        a, b = (pair[0], pair[1]) if pair[0].pk == row.record_a_pk else (pair[1], pair[0])
        try:
            self._visible_pair(conn, vis, a, b)
        except NotFound:
            raise NotFound(f"no patient link {link_id}") from None
        return row, a, b

    def decide(self, who: Principal, link_id: int, decision: str) -> dict[str, Any]:
        """Confirm or reject a proposal, or unlink a confirmed link."""
        target = {"confirm": "confirmed", "reject": "rejected", "unlink": "unlinked"}[decision]
        action = f"patient.link.{decision}"
        vis = self.visibility(who)
        try:
            self._may_decide(who)
            with self.engine.begin() as conn:
                row, a, b = self._link_row(conn, who, link_id, vis)
                allowed = {"confirm": ("proposed",), "reject": ("proposed",),
                           "unlink": ("confirmed",)}[decision]
                if row.state not in allowed:
                    raise Conflict(f"link {link_id} is {row.state}; only a "
                                   f"{' or '.join(allowed)} link can be {target}")
                if decision == "confirm":
                    self._check_joinable(conn, a.pk, b.pk)
                values: dict[str, Any] = {"state": target}
                if decision == "unlink":
                    values |= {"unlinked_at": clock.now(), "unlinked_by_user_pk": who.user_pk}
                else:
                    values |= {"decided_at": clock.now(), "decided_by_user_pk": who.user_pk}
                conn.execute(update(lk).where(lk.c.pk == link_id).values(**values))
        except (Conflict, Forbidden, NotFound) as exc:
            self.access.record(action, who, "denied", details={"link": link_id,
                                                              "reason": exc.reason})
            raise
        self.access.record(action, who, wait=True, patient_ids=[a.patient_id, b.patient_id],
                           details={"link": link_id, "records": [a.ref, b.ref],
                                    "evidence": json.loads(row.evidence)})
        return self.link(who, link_id)

    def link(self, who: Principal, link_id: int) -> dict[str, Any]:
        vis = self.visibility(who)
        with self.engine.connect() as conn:
            row, a, b = self._link_row(conn, who, link_id, vis)
            return _link_json(row, {a.pk: a, b.pk: b}, self._user_names(conn, [row]))

    def manual_link(self, who: Principal, ref_a: str, ref_b: str,
                    note: str | None) -> dict[str, Any]:
        """Link two records by hand (confirmed at once), with the caller's note as evidence."""
        vis = self.visibility(who)
        try:
            self._may_decide(who)
            with self.engine.begin() as conn:
                a, b = self._pair(conn, vis, ref_a, ref_b)
                if a.qualifier == b.qualifier:
                    raise Conflict("both records have one issuer: merge them instead")
                self._check_joinable(conn, a.pk, b.pk)
                open_rows = [x for x in self._pair_rows(conn, a.pk, b.pk)
                             if x.state == "proposed"]
                now = clock.now()
                evidence = {"rule": "manual", "note": (note or "")[:1000]}
                if open_rows:
                    link_id = int(open_rows[0].pk)
                    conn.execute(update(lk).where(lk.c.pk == link_id).values(
                        state="confirmed", decided_at=now, decided_by_user_pk=who.user_pk))
                else:
                    lo, hi = sorted((a.pk, b.pk))
                    link_id = int(conn.execute(insert(lk).values(
                        record_a_pk=lo, record_b_pk=hi, state="confirmed", origin="manual",
                        evidence=json.dumps(evidence), created_at=now,
                        created_by_user_pk=who.user_pk, decided_at=now,
                        decided_by_user_pk=who.user_pk).returning(lk.c.pk)).scalar_one())
        except (Conflict, Forbidden, NotFound) as exc:
            self.access.record("patient.link.manual", who, "denied",
                               details={"records": [ref_a, ref_b], "reason": exc.reason})
            raise
        self.access.record("patient.link.manual", who, wait=True,
                           patient_ids=[a.patient_id, b.patient_id],
                           details={"link": link_id, "records": [a.ref, b.ref], **evidence})
        return self.link(who, link_id)

    def _pair(self, conn: Connection, vis: Visibility, ref_a: str,
              ref_b: str) -> tuple[Record, Record]:
        if ref_a == ref_b:
            raise InvalidInput("a record cannot be linked to itself")
        found = {x.ref: x for x in self._where(conn, r.c.ref.in_([ref_a, ref_b]))}
        for ref in (ref_a, ref_b):
            if ref not in found:
                raise NotFound(f"no patient {ref!r}")
        a, b = found[ref_a], found[ref_b]
        self._visible_pair(conn, vis, a, b)
        return a, b

    # -- merges (ADT A40 / A47) ----------------------------------------------------------------
    def merge(self, who: Principal, old_ref: str, new_ref: str,
              reason: str | None) -> dict[str, Any]:
        """Show the old identifier's studies under the new one (same issuer)."""
        vis = self.visibility(who)
        try:
            if not (who.superuser or who.role == "admin"):
                raise Forbidden("only admins merge patient identifiers")
            with self.engine.begin() as conn:
                old, new = self._pair(conn, vis, old_ref, new_ref)
                if old.qualifier != new.qualifier:
                    raise InvalidInput("a merge joins two IDs of one issuer; link records of "
                                       "different issuers instead")
                if self.merged_into(conn, [old.pk]):
                    raise Conflict(f"{old.patient_id} is merged already; undo that first")
                self._check_joinable(conn, old.pk, new.pk, retiring=old.pk)
                merge_id = int(conn.execute(insert(mg).values(
                    old_record_pk=old.pk, new_record_pk=new.pk, reason=(reason or "")[:1000],
                    created_at=clock.now(), created_by_user_pk=who.user_pk)
                    .returning(mg.c.pk)).scalar_one())
        except (Conflict, Forbidden, NotFound, InvalidInput) as exc:
            self.access.record("patient.merge", who, "denied",
                               details={"old": old_ref, "new": new_ref, "reason": exc.reason})
            raise
        self.access.record("patient.merge", who, wait=True,
                           patient_ids=[old.patient_id, new.patient_id],
                           details={"merge": merge_id, "old": old.ref, "new": new.ref,
                                    "why": reason})
        return self.merge_json(who, merge_id)

    def undo_merge(self, who: Principal, merge_id: int) -> dict[str, Any]:
        vis = self.visibility(who)
        try:
            if not (who.superuser or who.role == "admin"):
                raise Forbidden("only admins undo patient merges")
            with self.engine.begin() as conn:
                row, old, new = self._merge_row(conn, vis, merge_id)
                if row.undone_at is not None:
                    raise Conflict(f"merge {merge_id} is undone already")
                conn.execute(update(mg).where(mg.c.pk == merge_id).values(
                    undone_at=clock.now(), undone_by_user_pk=who.user_pk))
        except (Conflict, Forbidden, NotFound) as exc:
            self.access.record("patient.merge.undo", who, "denied",
                               details={"merge": merge_id, "reason": exc.reason})
            raise
        self.access.record("patient.merge.undo", who, wait=True,
                           patient_ids=[old.patient_id, new.patient_id],
                           details={"merge": merge_id, "old": old.ref, "new": new.ref})
        return self.merge_json(who, merge_id)

    def _merge_row(self, conn: Connection, vis: Visibility,
                   merge_id: int) -> tuple[Any, Record, Record]:
        row = conn.execute(select(mg).where(mg.c.pk == merge_id)).first()
        if row is None:
            raise NotFound(f"no patient merge {merge_id}")
        recs = {x.pk: x for x in self._by_pks(conn, [row.old_record_pk, row.new_record_pk])}
        old, new = recs[row.old_record_pk], recs[row.new_record_pk]
        try:
            self._visible_pair(conn, vis, old, new)
        except NotFound:
            raise NotFound(f"no patient merge {merge_id}") from None
        return row, old, new

    def merge_json(self, who: Principal, merge_id: int) -> dict[str, Any]:
        vis = self.visibility(who)
        with self.engine.connect() as conn:
            row, old, new = self._merge_row(conn, vis, merge_id)
            return {"id": row.pk, "old": old.as_json(), "new": new.as_json(),
                    "reason": row.reason, "created_at": clock.iso(row.created_at),
                    "undone_at": clock.iso(row.undone_at),
                    "state": "undone" if row.undone_at else "active"}

    # -- one record as the API shows it ---------------------------------------------------------
    def describe(self, who: Principal, ref: str) -> dict[str, Any]:
        self.sync()
        rec = self.record(who, ref)
        vis = self.visibility(who)
        with self.engine.connect() as conn:
            person = [x for x in self.person_records(conn, rec) if self.visible(conn, x, vis)]
            merged = self.merged_into(conn, [x.pk for x in person])
            refs = {x.pk: x.ref for x in person}
        self.access.record("patient.read", who, patient_ids=[x.patient_id for x in person],
                           details={"patient": ref})
        return {**rec.as_json(), "merged_into": refs.get(merged.get(rec.pk, -1)),
                "person": [{**x.as_json(), "merged_into": refs.get(merged.get(x.pk, -1))}
                           for x in person]}


def _prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _link_json(row: Any, recs: dict[int, Record], users: dict[int, str]) -> dict[str, Any]:
    try:
        evidence = json.loads(row.evidence)
    except ValueError:
        evidence = {}
    return {"id": row.pk, "state": row.state, "origin": row.origin, "evidence": evidence,
            "records": [recs[row.record_a_pk].as_json(), recs[row.record_b_pk].as_json()],
            "created_at": clock.iso(row.created_at),
            "created_by": users.get(row.created_by_user_pk),
            "decided_at": clock.iso(row.decided_at),
            "decided_by": users.get(row.decided_by_user_pk),
            "unlinked_at": clock.iso(row.unlinked_at),
            "unlinked_by": users.get(row.unlinked_by_user_pk)}
