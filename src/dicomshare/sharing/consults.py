"""Second-opinion consults: a clinician asks a specialist organisation (or one of its
users) about some studies; the specialist accepts or declines, discusses in a comment
thread and answers with an opinion stored in the study as a DICOM object.

States and who moves them (anything else is a Conflict, 409, with the reason)::

    requested --accept (specialist)--> accepted --opinion (specialist)--> answered
    requested|accepted --decline (specialist)--> declined
    requested|accepted|answered|declined --close (requester)--> closed

Access: opening a consult grants the specialist (its organisation, or the named user)
view, download and add-series on the studies at once, through :meth:`Grants.create` with
the requester as the grantor: a specialist decides whether to accept after looking at
the images, and one mechanism (grants) covers looking and answering. Declining or closing
the consult revokes those grants. The opinion is stored through :meth:`Access.store` with
the specialist's principal: the add-series grant lets it into the requester's study, and
:meth:`Grants.reply_to_additions` opens the new series back to the requester's
organisation, so the requester reads the report over DICOMweb like any other series.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from dicomshare import __version__, clock
from dicomshare.access.grants import Grants
from dicomshare.access.policy import Action, Principal, check, parse_permissions
from dicomshare.access.service import Access
from dicomshare.errors import Conflict, DicomshareError, Forbidden, InvalidInput, NotFound
from dicomshare.monitoring.events import emit
from dicomshare.sharing.common import (
    Record,
    addressed_to,
    audit_details,
    find_recipient,
    of_organisation,
    with_names,
)
from dicomshare.sharing.notify import notify
from dicomshare.storage import schema as s

URGENCIES = ("routine", "urgent", "emergency")
STATES = ("requested", "accepted", "declined", "answered", "closed")
FORMATS = ("sr", "pdf")
CONSULT_PERMISSIONS = ("view", "download", "add-series")
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
MAX_STUDIES = 50

c = s.consult
cs = s.consult_study
cc = s.consult_comment
_LISTED = with_names(
    c, {"req_org": c.c.requester_organisation_pk, "spec_org": c.c.specialist_organisation_pk},
    {"req_user": c.c.requester_user_pk, "spec_user": c.c.specialist_user_pk})


def _as_requester(who: Principal) -> Any:
    return of_organisation(c.c.requester_organisation_pk, who)


def _as_specialist(who: Principal) -> Any:
    return addressed_to(c.c.specialist_organisation_pk, c.c.specialist_user_pk, who)


@dataclass(frozen=True)
class Consult(Record):
    studies: tuple[tuple[str, int | None], ...]  # (study UID, grant id)

    def role_of(self, who: Principal) -> str:
        r = self.row
        if who.organisation_pk == r.requester_organisation_pk:
            return "requester"
        return "specialist"

    def as_json(self, who: Principal) -> dict[str, Any]:
        r = self.row
        opinion = None
        if r.opinion_sop_instance_uid:
            opinion = {"study_uid": r.opinion_study_instance_uid,
                       "sop_instance_uid": r.opinion_sop_instance_uid}
        return {
            "id": r.pk, "state": r.state, "urgency": r.urgency, "question": r.question,
            "role": self.role_of(who),
            "requester_organisation": r.req_org_name, "requester_user": r.req_user_name,
            "specialist_organisation": r.spec_org_name, "specialist_user": r.spec_user_name,
            "studies": [uid for uid, _ in self.studies],
            "grants": [g for _, g in self.studies if g is not None],
            "decline_reason": r.decline_reason, "opinion": opinion,
            "created_at": clock.iso(clock.aware(r.created_at)),
            "accepted_at": clock.iso(clock.aware(r.accepted_at)),
            "declined_at": clock.iso(clock.aware(r.declined_at)),
            "answered_at": clock.iso(clock.aware(r.answered_at)),
            "closed_at": clock.iso(clock.aware(r.closed_at)),
        }


class Consults:
    def __init__(self, engine: Engine, grants: Grants, access: Access) -> None:
        self.engine = engine
        self.grants = grants
        self.access = access

    # -- opening -----------------------------------------------------------------------------
    def request(self, who: Principal, *, studies: list[str], question: str, urgency: str,
                specialist_organisation: str, specialist_user: str | None) -> Consult:
        """Open a consult. Its grants are made first and revoked again if anything after
        fails, so no consult exists without its grants and no grant outlives a failure."""
        where = {"specialist_organisation": specialist_organisation,
                 "specialist_user": specialist_user, "urgency": urgency}
        made: list[int] = []
        try:
            check(who, Action.SHARE)
            studies = list(dict.fromkeys(studies))
            if not 0 < len(studies) <= MAX_STUDIES:
                raise InvalidInput(f"a consult covers 1 to {MAX_STUDIES} studies")
            if urgency not in URGENCIES:
                raise InvalidInput(f"urgency is one of {', '.join(URGENCIES)}")
            if not question.strip():
                raise InvalidInput("the question is empty")
            perms = parse_permissions(CONSULT_PERMISSIONS)
            with self.engine.connect() as conn:
                org_pk, user_pk = find_recipient(conn, specialist_organisation,
                                                 specialist_user)
                if org_pk == who.organisation_pk:
                    raise InvalidInput("ask a specialist of another organisation")
                for uid in studies:  # all or nothing: check each before granting any
                    self.grants.check_shareable(conn, who, uid, None, perms)
            for uid in studies:
                made.append(self.grants.create(
                    who, study_uid=uid,
                    organisation=None if specialist_user else specialist_organisation,
                    user=specialist_user, permissions=CONSULT_PERMISSIONS).id)
            with self.engine.begin() as conn:
                pk = int(conn.execute(insert(c).values(
                    requester_organisation_pk=who.organisation_pk, requester_user_pk=who.user_pk,
                    specialist_organisation_pk=org_pk, specialist_user_pk=user_pk,
                    question=question, urgency=urgency, state="requested",
                    created_at=clock.now())).inserted_primary_key[0])  # type: ignore[index]
                conn.execute(insert(cs), [{"consult_pk": pk, "study_instance_uid": uid,
                                           "grant_pk": g} for uid, g in zip(studies, made,
                                                                            strict=True)])
                notify(conn, org_pk, user_pk, "consult-updated",
                       f"New {urgency} consult request from {who.organisation}",
                       {"consult_id": pk, "state": "requested",
                        "from_organisation": who.organisation})
                emit(conn, "consult-updated", [who.organisation_pk, org_pk],
                     {"consult_id": pk, "event": "requested", "state": "requested"})
        except DicomshareError as exc:
            if made:
                self._revoke(who, made)
            self._record("consult.request", who, "denied", None,
                         {"reason": exc.reason, **where, "studies": studies[:MAX_STUDIES]})
            raise
        consult = self._get(pk)
        self._record("consult.request", who, "success", consult,
                     {**where, "grants": made})
        for g in made:
            grant = self.grants.get(g)
            self.access.record("grant.create", who, wait=True,
                               study_uids=[grant.study_uid or ""],
                               details={**grant.as_json(), "consult_id": pk})
        return consult

    # -- reading -----------------------------------------------------------------------------
    def _get(self, consult_id: int, where: Any = None) -> Consult:
        stmt = _LISTED.where(c.c.pk == consult_id)
        if where is not None:
            stmt = stmt.where(where)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
            if row is None:
                raise NotFound(f"no consult {consult_id}")
            return Consult(row, self._studies(conn, consult_id))

    @staticmethod
    def _studies(conn: Connection, consult_id: int) -> tuple[tuple[str, int | None], ...]:
        return tuple((r[0], r[1]) for r in conn.execute(
            select(cs.c.study_instance_uid, cs.c.grant_pk).where(cs.c.consult_pk == consult_id)
            .order_by(cs.c.study_instance_uid)))

    def get(self, who: Principal, consult_id: int) -> Consult:
        """A consult the caller is a party to; others answer NotFound like missing ones."""
        check(who, Action.VIEW)
        return self._get(consult_id, or_(_as_requester(who), _as_specialist(who)))

    def find(self, who: Principal, role: str | None = None,
             state: str | None = None) -> list[Consult]:
        check(who, Action.VIEW)
        if role not in (None, "requester", "specialist"):
            raise InvalidInput("role is requester or specialist")
        if state is not None and state not in STATES:
            raise InvalidInput(f"state is one of {', '.join(STATES)}")
        where = {"requester": _as_requester(who), "specialist": _as_specialist(who)}.get(
            role or "", or_(_as_requester(who), _as_specialist(who)))
        stmt = _LISTED.where(where).order_by(c.c.pk.desc()).limit(1000)
        if state is not None:
            stmt = stmt.where(c.c.state == state)
        with self.engine.connect() as conn:
            return [Consult(r, self._studies(conn, r.pk)) for r in conn.execute(stmt)]

    # -- moving it on ------------------------------------------------------------------------
    def accept(self, who: Principal, consult_id: int) -> Consult:
        return self._transition(who, consult_id, "accept", "specialist", ("requested",),
                                "accepted", {"accepted_at": clock.now()})

    def decline(self, who: Principal, consult_id: int, reason: str | None) -> Consult:
        return self._transition(who, consult_id, "decline", "specialist",
                                ("requested", "accepted"), "declined",
                                {"declined_at": clock.now(),
                                 "decline_reason": (reason or "").strip()[:4000] or None},
                                revoke=True)

    def close(self, who: Principal, consult_id: int) -> Consult:
        return self._transition(who, consult_id, "close", "requester",
                                ("requested", "accepted", "answered", "declined"), "closed",
                                {"closed_at": clock.now()}, revoke=True)

    def _party(self, who: Principal, consult_id: int, side: str, action: str) -> Consult:
        """The consult, when the caller may act on it as ``side``. A caller who is no party
        gets NotFound; the other party gets Forbidden saying who may do it."""
        consult = self.get(who, consult_id)
        if consult.role_of(who) != side:
            raise Forbidden(f"only the {side} may {action} a consult")
        return consult

    def _transition(self, who: Principal, consult_id: int, verb: str, side: str,
                    sources: tuple[str, ...], target: str, values: dict[str, Any],
                    revoke: bool = False) -> Consult:
        """Move the consult from one of ``sources`` to ``target``, only if nobody moved it
        since it was read (the update checks the state), and tell the other party in the
        same transaction; ``revoke``: the move ends the specialist's access."""
        consult: Consult | None = None
        try:
            consult = self._party(who, consult_id, side, verb)
            if consult.state not in sources:
                raise Conflict(f"consult {consult_id} is {consult.state}; it cannot be "
                               f"{_PAST[verb]} (only when {' or '.join(sources)})")
            with self.engine.begin() as conn:
                done = conn.execute(update(c).where(c.c.pk == consult_id,
                                                    c.c.state == consult.state)
                                    .values(state=target, **values))
                if done.rowcount != 1:
                    raise Conflict(f"consult {consult_id} changed meanwhile; reload it")
                self._notify_other(conn, who, consult, target)
        except DicomshareError as exc:
            self._record(f"consult.{verb}", who, "denied", consult,
                         {"consult_id": consult_id, "reason": exc.reason})
            raise
        revoked = self._revoke(who, [g for _, g in consult.studies if g is not None]) \
            if revoke else []
        done_consult = self._get(consult_id)
        self._record(f"consult.{verb}", who, "success", done_consult,
                     {"consult_id": consult_id, "state": target,
                      "revoked_grants": revoked} if revoked else
                     {"consult_id": consult_id, "state": target})
        return done_consult

    def _notify_other(self, conn: Connection, who: Principal, consult: Consult,
                      what: str) -> None:
        r = consult.row
        if consult.role_of(who) == "requester":
            org, user = r.specialist_organisation_pk, r.specialist_user_pk
        else:
            org, user = r.requester_organisation_pk, r.requester_user_pk
        subject = f"Consult #{consult.id}: {_NEWS.get(what, what)} by {who.organisation}"
        notify(conn, org, user, "consult-updated", subject,
               {"consult_id": consult.id, "event": what, "by_organisation": who.organisation})
        emit(conn, "consult-updated", [r.requester_organisation_pk, r.specialist_organisation_pk],
             {"consult_id": consult.id, "event": what})

    def _revoke(self, who: Principal, grant_ids: list[int]) -> list[int]:
        """Revoke the consult's grants (and any re-share made from them, though its grants
        carry no re-share)."""
        live = self.grants.end(grant_ids)
        for pk in live:
            grant = self.grants.get(pk)
            self.access.record("grant.revoke", who, wait=True, study_uids=[grant.study_uid or ""],
                               details={**grant.as_json(), "why": "the consult ended"})
        return live

    # -- the thread ------------------------------------------------------------------------
    def comments(self, who: Principal, consult_id: int) -> list[dict[str, Any]]:
        self.get(who, consult_id)
        author = s.user.alias("author")
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(cc.c.pk, author.c.name, s.organisation.c.name, cc.c.body,
                       cc.c.created_at)
                .select_from(cc.outerjoin(author, cc.c.author_user_pk == author.c.pk)
                             .join(s.organisation, cc.c.organisation_pk == s.organisation.c.pk))
                .where(cc.c.consult_pk == consult_id).order_by(cc.c.pk)).all()
        return [{"id": r[0], "author": r[1], "organisation": r[2], "body": r[3],
                 "created_at": clock.iso(clock.aware(r[4]))} for r in rows]

    def comment(self, who: Principal, consult_id: int, body: str) -> dict[str, Any]:
        consult: Consult | None = None
        try:
            consult = self.get(who, consult_id)
            if not body.strip():
                raise InvalidInput("the comment is empty")
            if consult.state not in ("requested", "accepted", "answered"):
                raise Conflict(f"consult {consult_id} is {consult.state}; its thread is "
                               "closed")
            with self.engine.begin() as conn:
                pk = int(conn.execute(insert(cc).values(
                    consult_pk=consult_id, author_user_pk=who.user_pk,
                    organisation_pk=who.organisation_pk, body=body,
                    created_at=clock.now())).inserted_primary_key[0])  # type: ignore[index]
                self._notify_other(conn, who, consult, "comment")
        except DicomshareError as exc:
            self._record("consult.comment", who, "denied", consult,
                         {"consult_id": consult_id, "reason": exc.reason})
            raise
        self._record("consult.comment", who, "success", consult,
                     {"consult_id": consult_id, "comment_id": pk})
        return next(x for x in self.comments(who, consult_id) if x["id"] == pk)

    # -- the answer ------------------------------------------------------------------------
    def opinion(self, who: Principal, consult_id: int, text: str, fmt: str = "sr",
                study_uid: str | None = None) -> Consult:
        consult: Consult | None = None
        try:
            consult = self._party(who, consult_id, "specialist", "answer")
            if fmt not in FORMATS:
                raise InvalidInput(f"format is one of {', '.join(FORMATS)}")
            if not text.strip():
                raise InvalidInput("the opinion is empty")
            if consult.state != "accepted":
                raise Conflict(f"consult {consult_id} is {consult.state}; an opinion is "
                               "given on an accepted consult (accept it first)"
                               if consult.state == "requested" else
                               f"consult {consult_id} is {consult.state}; it takes no "
                               "opinion now")
            uids = [uid for uid, _ in consult.studies]
            if study_uid is None:
                if len(uids) != 1:
                    raise InvalidInput("the consult has several studies: say which one the "
                                       "opinion goes into (study_uid)")
                study_uid = uids[0]
            elif study_uid not in uids:
                raise InvalidInput(f"study {study_uid} is not part of consult {consult_id}")
            ds = self._document(who, consult, study_uid, text, fmt)
            temp = self.access.archive.new_temp()
            temp.write(_encode(ds))
            result = self.access.store(who, [temp], study_uid)[0]
            if result.error is not None:
                raise result.error
            self._open_to_requester(who, consult, study_uid)
            with self.engine.begin() as conn:
                done = conn.execute(update(c).where(c.c.pk == consult_id,
                                                    c.c.state == "accepted")
                                    .values(state="answered", answered_at=clock.now(),
                                            opinion_sop_instance_uid=ds.SOPInstanceUID,
                                            opinion_study_instance_uid=study_uid))
                if done.rowcount != 1:
                    raise Conflict(f"consult {consult_id} changed meanwhile; reload it")
                self._notify_other(conn, who, consult, "answered")
        except DicomshareError as exc:
            self._record("consult.opinion", who, "denied", consult,
                         {"consult_id": consult_id, "reason": exc.reason})
            raise
        done_consult = self._get(consult_id)
        self._record("consult.opinion", who, "success", done_consult,
                     {"consult_id": consult_id, "format": fmt,
                      "sop_instance_uid": str(ds.SOPInstanceUID), "study_uid": study_uid})
        return done_consult

    def _open_to_requester(self, who: Principal, consult: Consult, study_uid: str) -> None:
        """Make sure the requester reads the opinion. :meth:`Grants.reply_to_additions`
        opened it to the organisation that owns the study, which is the requester unless
        the requester itself holds the study through a re-share: then open it here."""
        pk = self.grants.open_back(who, consult.row.requester_organisation_pk, study_uid)
        if pk is None:
            return
        self.access.record("grant.create", who, wait=True, study_uids=[study_uid],
                           details={**self.grants.get(pk).as_json(),
                                    "consult_id": consult.id})

    def _document(self, who: Principal, consult: Consult, study_uid: str, text: str,
                  fmt: str) -> Dataset:
        """The opinion as a DICOM object of the study: patient and study modules copied
        from a stored instance, a new series, the current study's instances as evidence."""
        found = self.access.locate(who, Action.VIEW, study_uid)
        first = found[0][0]
        with self.access.archive.blobs.open(first.blob_key) as stream:
            source = pydicom.dcmread(stream, stop_before_pixels=True, force=True)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        for keyword in _COPIED:
            if keyword in source:
                setattr(ds, keyword, source[keyword].value)
            elif keyword in _TYPE2:
                setattr(ds, keyword, "")
        ds.StudyInstanceUID = study_uid
        now = clock.now()
        ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesNumber = 9000 + consult.id % 1000
        ds.InstanceNumber = 1
        ds.Manufacturer = "dicomshare"
        ds.SoftwareVersions = __version__
        ds.InstitutionName = who.organisation[:64]
        ds.SeriesDescription = f"Second opinion (consult {consult.id})"[:64]
        if fmt == "sr":
            _sr(ds, who, consult, text, found)
        else:
            _pdf(ds, who, consult, text)
        return ds

    def _record(self, action: str, who: Principal, outcome: str, consult: Consult | None,
                details: dict[str, Any]) -> None:
        studies = [uid for uid, _ in consult.studies] if consult else []
        patients: list[str] = []
        for uid in studies[:MAX_STUDIES]:
            patient_id, _ = self.access.archive.index.study_facts(uid)
            if patient_id:
                patients.append(patient_id)
        orgs = [consult.row.requester_organisation_pk] if consult else []
        self.access.record(action, who, outcome, wait=True, patient_ids=patients,
                           study_uids=studies, data_organisations=orgs,
                           details=audit_details(details))


_PAST = {"accept": "accepted", "decline": "declined", "close": "closed"}
_NEWS = {"requested": "new request", "accepted": "accepted", "declined": "declined",
         "answered": "opinion given", "closed": "closed", "comment": "new comment"}
_COPIED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
           "OtherPatientIDsSequence", "PatientAge", "StudyDate", "StudyTime", "AccessionNumber",
           "ReferringPhysicianName", "StudyID", "StudyDescription")
_TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"}


def _code(value: str, scheme: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return Sequence([item])


def _text_item(relationship: str, code: tuple[str, str, str], text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = _code(*code)
    item.TextValue = text
    return item


def _sr(ds: Dataset, who: Principal, consult: Consult, text: str,
        found: list[Any]) -> None:
    """A Basic Text SR: a report container holding the request and the opinion."""
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.Modality = "SR"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = who.user[:64]
    observer.VerifyingOrganization = who.organisation[:64]
    observer.VerificationDateTime = ds.ContentDate + ds.ContentTime
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    ds.VerifyingObserverSequence = Sequence([observer])
    author = Dataset()
    author.ObserverType = "PSN"
    author.PersonName = who.user[:64]
    author.InstitutionName = who.organisation[:64]
    author.PersonIdentificationCodeSequence = Sequence()
    author.InstitutionCodeSequence = Sequence()
    ds.AuthorObserverSequence = Sequence([author])
    ds.PerformedProcedureCodeSequence = Sequence()
    series: dict[str, list[Any]] = {}
    for inst, _ in found:
        series.setdefault(inst.series_uid, []).append(inst)
    evidence = Dataset()
    evidence.StudyInstanceUID = ds.StudyInstanceUID
    evidence.ReferencedSeriesSequence = Sequence()
    for series_uid, instances in series.items():
        ref = Dataset()
        ref.SeriesInstanceUID = series_uid
        ref.ReferencedSOPSequence = Sequence()
        for inst in instances:
            sop = Dataset()
            sop.ReferencedSOPClassUID = inst.sop_class_uid
            sop.ReferencedSOPInstanceUID = inst.sop_uid
            ref.ReferencedSOPSequence.append(sop)
        evidence.ReferencedSeriesSequence.append(ref)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _code("18748-4", "LN", "Diagnostic imaging report")
    ds.ContinuityOfContent = "SEPARATE"
    observer_name = Dataset()
    observer_name.RelationshipType = "HAS OBS CONTEXT"
    observer_name.ValueType = "PNAME"
    observer_name.ConceptNameCodeSequence = _code("121008", "DCM", "Person Observer Name")
    observer_name.PersonName = who.user[:64]
    ds.ContentSequence = Sequence([
        observer_name,
        _text_item("HAS OBS CONTEXT", ("121009", "DCM", "Person Observer's Organization Name"),
                   who.organisation),
        _text_item("CONTAINS", ("121062", "DCM", "Request"), consult.row.question),
        _text_item("CONTAINS", ("121076", "DCM", "Conclusions"), text),
    ])


def _pdf(ds: Dataset, who: Principal, consult: Consult, text: str) -> None:
    """An Encapsulated PDF holding the request and the opinion."""
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.Modality = "DOC"
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.AcquisitionDateTime = ds.ContentDate + ds.ContentTime
    ds.DocumentTitle = f"Second opinion (consult {consult.id})"
    ds.ConceptNameCodeSequence = _code("18748-4", "LN", "Diagnostic imaging report")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    lines = [f"Second opinion - consult {consult.id}", "",
             f"Patient: {ds.get('PatientName', '')}  ID: {ds.get('PatientID', '')}",
             f"Study: {ds.StudyInstanceUID}", "", "Question:", *_wrap(consult.row.question),
             "", f"Opinion of {who.user} ({who.organisation}):", *_wrap(text)]
    document = minimal_pdf(lines)
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")


def _wrap(text: str, width: int = 90) -> list[str]:
    import textwrap

    out: list[str] = []
    for paragraph in text.splitlines() or [""]:
        out.extend(textwrap.wrap(paragraph, width) or [""])
    return out


def minimal_pdf(lines: list[str], per_page: int = 60) -> bytes:
    """A plain PDF 1.4 of text lines in Helvetica (Latin-1; other characters become '?')."""
    pages = [lines[i:i + per_page] for i in range(0, len(lines), per_page)] or [[]]
    objects: list[bytes] = []
    font = 3
    page_ids = [4 + 2 * k for k in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % p for p in page_ids)
                   + b"] /Count %d >>" % len(pages))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
                   b"/Encoding /WinAnsiEncoding >>")
    for k, page in enumerate(pages):
        ops = [b"BT /F1 10 Tf 14 TL 50 800 Td"]
        for line in page:
            raw = line.encode("latin-1", "replace")
            raw = raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
            ops.append(b"(" + raw + b") Tj T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
                       b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>"
                       % (font, page_ids[k] + 1))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream
                       + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


def _encode(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
