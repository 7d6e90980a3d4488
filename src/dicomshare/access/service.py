"""The door every way in uses for patient data: decide, act, record.

DICOMweb handlers, the DIMSE service and the JSON API call :class:`Access`, never the
archive directly, so one decision procedure and one audit trail cover them all:

1. ``check``: the caller's role and token scopes allow the action (else 403);
2. the caller's :class:`Visibility` (own organisation + live grants) goes to the index,
   so nothing invisible is listed, counted or fetched; an invisible resource is a 404
   exactly like a missing one;
3. the outcome, denied or not, is written to the audit trail.

Views of one study by one caller are recorded once a minute per process, not once per
frame: a viewer fetching 500 frames is one access, not 500 records.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from dicomshare.access.grants import Grants
from dicomshare.access.policy import Action, Principal, Visibility, check, visibility
from dicomshare.archive import Archive, StoreResult, resource_name
from dicomshare.dicom.attributes import Level
from dicomshare.dicom.header import Header
from dicomshare.dicom.matching import Kind, Query
from dicomshare.errors import DicomshareError, Forbidden, NotFound
from dicomshare.storage.base import Outcome, StoredInstance, TempBlob

if TYPE_CHECKING:
    from dicomshare.access.audit import AuditLog

_COALESCE_SECONDS = 60.0


class Access:
    def __init__(self, archive: Archive, grants: Grants, audit: AuditLog | None) -> None:
        self.archive = archive
        self.grants = grants
        self.audit_log = audit
        self._recent: dict[tuple[Any, ...], float] = {}
        self._recent_lock = threading.Lock()

    def close(self) -> None:
        """Flush the audit trail (commands call this before they exit)."""
        if self.audit_log is not None:
            self.audit_log.close()

    # -- audit ---------------------------------------------------------------------------
    def record(self, action: str, who: Principal | None, outcome: str = "success", *,
               wait: bool = False, user_name: str | None = None,
               patient_ids: Iterable[str] = (), study_uids: Iterable[str] = (),
               data_organisations: Iterable[int] = (),
               details: Mapping[str, Any] | None = None) -> None:
        if self.audit_log is None:
            return
        from dicomshare.access.audit import AuditEvent

        self.audit_log.record(AuditEvent(
            action=action, outcome=outcome, principal=who, user_name=user_name,
            source=who.source if who else None,
            patient_ids=tuple(dict.fromkeys(p for p in patient_ids if p)),
            study_uids=tuple(dict.fromkeys(u for u in study_uids if u)),
            data_organisations=tuple(sorted(set(data_organisations))),
            details=dict(details or {})), wait=wait)

    def _denied(self, who: Principal, action: str, exc: DicomshareError,
                **context: Any) -> None:
        """A refusal; one about a stored study also goes to its owners' trail (an attempt
        on their data), which tells the caller nothing."""
        study = context.get("study")
        patient_id, owners = self.archive.index.study_facts(study) if study else (None, [])
        self.record(action, who, "denied", patient_ids=[patient_id] if patient_id else (),
                    study_uids=[study] if study else (), data_organisations=owners,
                    details={"reason": exc.reason, **{k: v for k, v in context.items() if v}})

    def _first_in_a_while(self, key: tuple[Any, ...]) -> bool:
        now = time.monotonic()
        with self._recent_lock:
            if len(self._recent) > 10000:
                self._recent = {k: t for k, t in self._recent.items()
                                if now - t < _COALESCE_SECONDS}
            last = self._recent.get(key)
            if last is not None and now - last < _COALESCE_SECONDS:
                return False
            self._recent[key] = now
            return True

    def _visibility(self, who: Principal, action: Action, audit_action: str,
                    **context: Any) -> Visibility:
        try:
            return self.grants.visibility(who, action)
        except Forbidden as exc:
            self._denied(who, audit_action, exc, **context)
            raise

    # -- search, retrieve ------------------------------------------------------------------
    def search(self, who: Principal, query: Query, study_uid: str | None = None,
               series_uid: str | None = None, audit: bool = True) -> list[dict[str, Any]]:
        """Visible matches. ``audit=False`` for follow-up pages of one query."""
        params = _describe_query(query, study_uid, series_uid)
        vis = self._visibility(who, Action.SEARCH, "study.search", query=params)
        found = self.archive.search(query, study_uid, series_uid, visibility=vis)
        if not audit:
            return found
        patient = [c.value for c in query.conditions
                   if c.keyword == "PatientID" and c.kind is Kind.SINGLE]
        self.record("study.search", who, patient_ids=patient,
                    study_uids=[study_uid] if study_uid else (),
                    details={"query": params, "matches": len(found)})
        return found

    def locate(self, who: Principal, action: Action, study_uid: str,
               series_uid: str | None = None, sop_uid: str | None = None,
               with_metadata: bool = False) -> list[tuple[StoredInstance, str | None]]:
        """Visible instances below a resource for VIEW or DOWNLOAD. Invisible: NotFound;
        visible for viewing only but asked for download: Forbidden."""
        name = "study.view" if action is Action.VIEW else "study.retrieve"
        where = {"study": study_uid, "series": series_uid, "instance": sop_uid}
        vis = self._visibility(who, action, name, **where)
        try:
            found = self.archive.locate(study_uid, series_uid, sop_uid, with_metadata, vis)
        except NotFound as exc:
            if action is Action.DOWNLOAD and self._viewable(who, study_uid, series_uid,
                                                            sop_uid):
                denied = Forbidden("you may view this study but not download it")
                self._denied(who, name, denied, **where)
                raise denied from None
            self._denied(who, name, exc, **where)
            raise
        if self._first_in_a_while((who.user, who.kind, name, study_uid)):
            patient_id, owners = self.archive.index.study_facts(study_uid)
            self.record(name, who, patient_ids=[patient_id] if patient_id else (),
                        study_uids=[study_uid], data_organisations=owners,
                        details={k: v for k, v in where.items() if v} |
                        {"instances": len(found)})
        return found

    def _viewable(self, who: Principal, study: str, series: str | None,
                  sop: str | None) -> bool:
        try:
            vis = self.grants.visibility(who, Action.VIEW)
        except Forbidden:
            return False
        return bool(self.archive.index.locate(study, series, sop, visibility=vis))

    # -- store, delete -----------------------------------------------------------------
    def store_access(self, who: Principal) -> Visibility:
        """Check that the caller may store at all; say where it may add to existing studies."""
        return self._visibility(who, Action.STORE, "study.store")

    def store(self, who: Principal, temps: Iterable[TempBlob], study_uid: str | None = None,
              check_header: Callable[[Header], None] | None = None,
              store_access: Visibility | None = None, report: bool = True
              ) -> list[StoreResult]:
        """Store received blobs as ``who``. ``report=False``: the caller hands the results
        to :meth:`report_stores` itself, later and together with others (DIMSE)."""
        temps = list(temps)
        if store_access is None:
            try:
                store_access = self.store_access(who)
            except Forbidden:
                for temp in temps:
                    self.archive.blobs.discard(temp)  # type: ignore[arg-type]
                raise
        results = self.archive.store_received(temps, study_uid, check_header,
                                              owner=who.organisation_pk,
                                              store_access=store_access)
        self._after_store(who, results, store_access)
        if report:
            self.report_stores(who, results)
        return results

    def _after_store(self, who: Principal, results: list[StoreResult],
                     store_access: Visibility) -> None:
        added: dict[str, tuple[str, str]] = {}
        for r in results:
            if r.ok and r.study_uid and r.outcome is Outcome.STORED:
                added[r.study_uid] = (r.patient_id or "", r.issuer_of_patient_id or "")
        if store_access.openings:
            for study, patient in added.items():
                if any(study in o.studies or patient in o.patients
                       for o in store_access.openings):
                    self.grants.reply_to_additions(who, study, patient, store_access)

    def report_stores(self, who: Principal, results: list[StoreResult]) -> None:
        """The audit record (``study.store``) and the monitoring event of stored results:
        one per request, or per study and second of a DICOM association (PS3.15 A.5.3.2
        DICOM Instances Transferred counts a study's instances, not each instance)."""
        if not results:
            return
        stored = [r for r in results if r.ok]
        refused = [r for r in results if not r.ok]
        # Not waited for: an fsync per request would halve single-instance STOW rates; the
        # writer commits within milliseconds (a crash can lose the newest read/store records).
        self.record("study.store", who, "success" if stored else "failure",
                    patient_ids=[r.patient_id for r in stored if r.patient_id],
                    study_uids=[r.study_uid for r in stored if r.study_uid],
                    data_organisations=[who.organisation_pk] if who.organisation_pk else (),
                    details={"stored": sum(r.outcome is Outcome.STORED for r in stored),
                             "already_present": sum(r.outcome is Outcome.ALREADY_PRESENT
                                                    for r in stored),
                             "refused": len(refused),
                             "reasons": sorted({r.error.reason for r in refused
                                                if r.error})[:10]})
        if stored:  # webhooks and watchlists: one outbox row, never an error (monitoring/)
            from dicomshare.monitoring.events import instances_stored

            instances_stored(self.archive.index.engine, who.organisation_pk, stored)

    def delete(self, who: Principal, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None) -> list[StoredInstance]:
        """Superusers delete everything below the resource; an organisation's admins delete
        their organisation's share of it (an instance goes when nobody owns it any more)."""
        where = {"study": study_uid, "series": series_uid, "instance": sop_uid}
        try:
            check(who, Action.DELETE)
            vis = None if who.superuser else visibility(who, Action.VIEW,
                                                        self.grants.live_for(who))
            if vis is not None and not self.archive.index.locate(
                    study_uid, series_uid, sop_uid, visibility=vis):
                raise NotFound(resource_name(study_uid, series_uid, sop_uid) + " not found")
            patient_id, owners = self.archive.index.study_facts(study_uid)
            organisation = None if who.superuser else who.organisation_pk
            if organisation is not None and organisation not in owners:
                raise Forbidden("only an organisation that stored this study may delete it")
            gone = self.archive.delete(study_uid, series_uid, sop_uid,
                                       organisation=organisation)
        except DicomshareError as exc:
            self._denied(who, "study.delete", exc, **where)
            raise
        self.record("study.delete", who, wait=True,
                    patient_ids=[patient_id] if patient_id else (), study_uids=[study_uid],
                    data_organisations=owners,
                    details={k: v for k, v in where.items() if v} | {"instances": len(gone)})
        return gone


def _describe_query(query: Query, study: str | None, series: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"level": query.level.value if isinstance(query.level, Level)
                           else str(query.level)}
    for cond in query.conditions[:50]:
        if cond.kind is not Kind.UNIVERSAL:
            out[cond.keyword] = str(cond.value)[:200]
    if study:
        out["StudyInstanceUID"] = study
    if series:
        out["SeriesInstanceUID"] = series
    return out

