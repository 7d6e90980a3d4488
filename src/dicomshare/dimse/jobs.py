"""Background DICOM transfers: sending studies to a peer (C-STORE) and retrieving them from
one (C-MOVE / C-GET) as jobs, like a PACS's export and retrieve tasks.

Why: done inside an HTTP request, a large study holds a worker thread and the client for
the whole transfer, shows no progress and cannot be stopped. A job is a row
(``transfer_job``), so every server process sees it: a worker thread in each process
claims queued jobs atomically (an UPDATE guarded by the state), runs them as the user who
created them (re-read, so a disabled user or a lost permission fails the job), and writes
progress and a heartbeat at most every half second, never once per instance. Cancelling
is a state change the running job notices on its next write: a send stops between
instances, a retrieve sends C-CANCEL. A running job whose worker died (no heartbeat for
``transfer_stale_seconds``) becomes ``interrupted`` and is never re-run by itself: a
half-done C-STORE into someone else's PACS is for a person to retry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from dicomshare import clock
from dicomshare.access.identity import Identities
from dicomshare.access.policy import Action, Principal, check, parse_scopes
from dicomshare.access.service import Access
from dicomshare.archive import Archive
from dicomshare.background import Worker
from dicomshare.dimse import scu
from dicomshare.dimse.aes import AERegistry
from dicomshare.errors import Conflict, DicomshareError, Forbidden, InvalidInput, NotFound
from dicomshare.storage import schema as s

log = logging.getLogger(__name__)
_J = s.transfer_job
_SELECT = select(_J, s.user.c.name.label("owner")).select_from(
    _J.outerjoin(s.user, _J.c.created_by_user_pk == s.user.c.pk))
KINDS = ("send", "retrieve")
METHODS = ("move", "get")
ACTIVE = ("queued", "running")
RETRYABLE = ("failed", "cancelled", "interrupted")
FLUSH_SECONDS = 0.5  # progress and heartbeat are written at most this often
MAX_STUDIES = 1000
INTERRUPTED = ("the server process running the job stopped (no heartbeat); it is not re-run "
               "by itself: retry it")
STOPPED = "the server stopped during the transfer; retry the job to run it again"


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    state: str
    ae_title: str
    study_uids: tuple[str, ...]
    method: str | None
    owner: str | None
    organisation_pk: int
    created_by_user_pk: int
    retry_of: int | None
    total: int | None
    completed: int
    failed: int
    warning: int
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state,
                "ae_title": self.ae_title, "study_uids": list(self.study_uids),
                "method": self.method, "owner": self.owner, "retry_of": self.retry_of,
                "created_at": clock.iso(self.created_at),
                "started_at": clock.iso(self.started_at),
                "finished_at": clock.iso(self.finished_at),
                "progress": {"total": self.total, "completed": self.completed,
                             "failed": self.failed, "warning": self.warning},
                "error": self.error, "result": self.result}


def _job(row: Any) -> Job:
    return Job(row.pk, row.kind, row.state, row.ae_title, tuple(json.loads(row.study_uids)),
               row.method, row.owner, row.organisation_pk, row.created_by_user_pk,
               row.retry_of_pk, row.total, row.completed, row.failed, row.warning, row.error,
               json.loads(row.result) if row.result else None, clock.aware(row.created_at),
               clock.aware(row.started_at), clock.aware(row.finished_at))


# -- the reports, as the synchronous routes return them -------------------------------------
def send_result(report: scu.SendReport) -> dict[str, Any]:
    """``POST /api/send``'s response (web/api.py SendResponse)."""
    return {"destination": report.destination, "succeeded": report.count("success"),
            "warnings": report.count("warning"), "failed": report.count("failure"),
            "error": report.error, "instances": [
                {"sop_instance_uid": r.sop_uid, "sop_class_uid": r.sop_class_uid,
                 "study_uid": r.study_uid, "series_uid": r.series_uid,
                 "transfer_syntax_uid": r.transfer_syntax_uid, "sent_as": r.sent_as,
                 "outcome": r.outcome, "status": r.status, "comment": r.comment}
                for r in report.instances]}


def retrieve_result(source: str, reports: Sequence[scu.RetrieveReport]) -> dict[str, Any]:
    """``POST /api/remote-aes/{title}/retrieve``'s response (RetrieveResponse)."""
    return {"source": source, "studies": [
        {"study_uid": r.study_uid, "method": r.method, "outcome": r.outcome,
         "status": r.status, "comment": r.comment, "completed": r.completed,
         "failed": r.failed, "warning": r.warning, "stored": r.stored,
         "already_present": r.already_present,
         "refused": [{"sop_instance_uid": u, "reason": why} for u, why in r.refused]}
        for r in reports]}


def _send_error(report: scu.SendReport) -> str:
    failed = [r for r in report.instances if r.outcome == "failure"]
    parts = [report.error] if report.error else []
    if failed:
        first = failed[0]
        parts.append(f"{len(failed)} of {len(report.instances)} instances not stored by "
                     f"{report.destination}; first {first.sop_uid}: {first.comment or 'failed'}")
    return "; ".join(parts) or "the send failed"


def _retrieve_error(reports: Sequence[scu.RetrieveReport]) -> str | None:
    bad = [r for r in reports if r.outcome != "success"]
    if not bad:
        return None
    first = bad[0]
    status = f"0x{first.status:04X}" if first.status is not None else "no status"
    return (f"{len(bad)} of {len(reports)} studies not retrieved completely; first "
            f"{first.study_uid}: {first.outcome} ({status}) {first.comment}".strip())


# -- the API's side -------------------------------------------------------------------------
class TransferJobs:
    """Creating, reading, cancelling and retrying jobs, with the callers' rights: a job is
    seen by its creator, its organisation's admins and superusers; others get 404."""

    def __init__(self, archive: Archive, access: Access,
                 wake: Callable[[], None] | None = None) -> None:
        self.archive = archive
        self.access = access
        self.engine: Engine = archive.index.engine
        self.registry = AERegistry(self.engine)
        self._wake = wake

    def create(self, who: Principal, kind: str, ae_title: str, study_uids: Sequence[str],
               method: str | None = None, retry_of: int | None = None) -> Job:
        """The synchronous route's up-front checks, then a queued job: an unusable peer
        or (send) a study ``who`` may not download is NotFound, (retrieve) no right to
        store is Forbidden."""
        check(who, Action.REMOTE)
        if who.user_pk is None or who.organisation_pk is None:
            raise Forbidden("background transfers run for a user: use a user's token")
        uids = list(dict.fromkeys(study_uids))
        if not uids:
            raise InvalidInput("no study given")
        if len(uids) > MAX_STUDIES:
            raise InvalidInput(f"at most {MAX_STUDIES} studies per job, got {len(uids)}")
        if any(not 0 < len(uid) <= 64 for uid in uids):
            raise InvalidInput("a Study Instance UID has 1 to 64 characters")
        peer = self.registry.usable_by(who, ae_title)
        total: int | None = None
        if kind == "send":
            method = None
            total = sum(len(self.access.locate(who, Action.DOWNLOAD, uid)) for uid in uids)
        elif kind == "retrieve":
            if method not in METHODS:
                raise InvalidInput(f"unknown retrieve method {method!r}: move or get")
            self.access.store_access(who)
        else:
            raise InvalidInput(f"unknown job kind {kind!r}: send or retrieve")
        with self.engine.begin() as conn:
            inserted = conn.execute(_J.insert().values(
                kind=kind, state="queued", organisation_pk=who.organisation_pk,
                created_by_user_pk=who.user_pk, scopes=",".join(sorted(who.scopes))[:100],
                ae_title=peer.ae_title, study_uids=json.dumps(uids), method=method,
                retry_of_pk=retry_of, total=total, created_at=clock.now()))
            pk = int(inserted.inserted_primary_key[0])  # type: ignore[index]
        self.access.record("job.created", who, wait=True, study_uids=uids[:100], details={
            "job": pk, "kind": kind, "ae_title": peer.ae_title, "method": method,
            "study_uids": uids[:100], "retry_of": retry_of})
        if self._wake is not None:
            self._wake()
        return self.get(who, pk)

    def get(self, who: Principal, job_id: int) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(_SELECT.where(_J.c.pk == job_id)).first()
        if row is None or not _may_see(who, row.created_by_user_pk, row.organisation_pk):
            raise NotFound(f"no job {job_id}")
        return _job(row)

    def list_jobs(self, who: Principal, limit: int = 100, offset: int = 0) -> list[Job]:
        """Newest first: the caller's own; its organisation's for admins; all for
        superusers."""
        stmt = _SELECT.order_by(_J.c.pk.desc()).limit(limit).offset(offset)
        if not who.superuser:
            mine = _J.c.created_by_user_pk == (who.user_pk if who.user_pk is not None else -1)
            stmt = stmt.where(mine | (_J.c.organisation_pk == who.organisation_pk)
                              if who.role == "admin" else mine)
        with self.engine.connect() as conn:
            return [_job(row) for row in conn.execute(stmt)]

    def cancel(self, who: Principal, job_id: int) -> Job:
        """Queued or running -> cancelled (a running job stops at its next check);
        Conflict when it has finished already."""
        self.get(who, job_id)
        with self.engine.begin() as conn:
            done = conn.execute(update(_J).where(_J.c.pk == job_id, _J.c.state.in_(ACTIVE))
                                .values(state="cancelled", finished_at=clock.now(),
                                        error=f"cancelled by {who.user}")).rowcount
        if done != 1:
            state = self.get(who, job_id).state
            raise Conflict(f"job {job_id} is {state} already: only queued or running jobs "
                           "can be cancelled")
        self.access.record("job.cancelled", who, wait=True, details={"job": job_id})
        return self.get(who, job_id)

    def retry(self, who: Principal, job_id: int) -> Job:
        """A failed, cancelled or interrupted job queued again as a new job of ``who``'s,
        after the same checks as a new one."""
        job = self.get(who, job_id)
        if job.state not in RETRYABLE:
            raise Conflict(f"job {job_id} is {job.state}: only failed, cancelled or "
                           "interrupted jobs can be retried")
        return self.create(who, job.kind, job.ae_title, job.study_uids, job.method,
                           retry_of=job.id)


def _may_see(who: Principal, owner_pk: int | None, organisation_pk: int | None) -> bool:
    return (who.superuser or (owner_pk is not None and owner_pk == who.user_pk)
            or (who.role == "admin" and organisation_pk == who.organisation_pk))


# -- the worker -----------------------------------------------------------------------------
class TransferWorker(Worker):
    """Runs transfer jobs in the background of one process, one at a time. A running job
    stops at its next check once the worker is stopping, and becomes interrupted."""

    thread_name = "transfer-worker"

    def __init__(self, archive: Archive, access: Access, poll_seconds: float = 1.0,
                 stale_seconds: float | None = None) -> None:
        super().__init__(poll_seconds)
        self.archive = archive
        self.access = access
        self.engine: Engine = archive.index.engine
        self.stale = float(stale_seconds if stale_seconds is not None
                           else archive.settings.transfer_stale_seconds)
        self.beat_seconds = max(FLUSH_SECONDS, min(10.0, self.stale / 4))
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[-100:]
        self.jobs = TransferJobs(archive, access, self.wake.set)

    def run_once(self) -> bool:
        """Mark abandoned jobs interrupted, claim one queued job and run it; False when
        there is none."""
        self._sweep()
        with self.engine.connect() as conn:
            candidates = conn.execute(select(_J.c.pk).where(_J.c.state == "queued")
                                      .order_by(_J.c.pk).limit(5)).scalars().all()
        for pk in candidates:
            if self.stopping.is_set():  # leave it to another process, or the next start
                return False
            with self.engine.begin() as conn:
                now = clock.now()
                claimed = conn.execute(update(_J).where(_J.c.pk == pk, _J.c.state == "queued")
                                       .values(state="running", worker=self.name,
                                               started_at=now, heartbeat_at=now)).rowcount
            if claimed == 1:
                self._run(pk)
                return True
        return False

    def _sweep(self) -> None:
        """Running jobs without a heartbeat for ``stale`` seconds: their worker died."""
        limit = clock.now() - timedelta(seconds=self.stale)
        abandoned = (_J.c.state == "running") & (_J.c.heartbeat_at < limit)
        with self.engine.connect() as conn:
            found = conn.execute(select(_J.c.pk).where(abandoned)).scalars().all()
        if not found:
            return
        with self.engine.begin() as conn:
            conn.execute(update(_J).where(_J.c.pk.in_(found), abandoned).values(
                state="interrupted", error=INTERRUPTED, finished_at=clock.now()))
        log.warning("transfer jobs %s interrupted: their worker stopped", list(found))

    def _run(self, pk: int) -> None:
        with self.engine.connect() as conn:
            row = conn.execute(select(_J).where(_J.c.pk == pk)).one()
        uids: list[str] = json.loads(row.study_uids)
        run = _Run(self, pk, row.total, len(uids))
        state, error, result = "failed", None, None
        settings = self.archive.settings
        try:
            who = self._principal(row)
            peer = self.jobs.registry.usable_by(who, row.ae_title)
            run.start()
            if row.kind == "send":
                report = scu.send(self.archive, settings, peer, uids, who, self.access,
                                  progress=run.sent, cancelled=run.cancelled)
                result = send_result(report)
                run.total = len(report.instances)
                state, error = ("succeeded", None) if report.ok else \
                    ("failed", _send_error(report))
            else:
                self.access.store_access(who)
                reports = scu.retrieve(self.archive, settings, peer, uids, row.method, who,
                                       self.access, progress=run.retrieving,
                                       cancelled=run.cancelled)
                self.access.record("remote.retrieve", who, wait=True, details={
                    "ae_title": peer.ae_title, "study_uids": uids[:100],
                    "method": row.method, "job": pk})
                result = retrieve_result(peer.ae_title, reports)
                run.total = sum(r.completed + r.failed + r.warning for r in reports)
                error = _retrieve_error(reports)
                state = "failed" if error else "succeeded"
        except DicomshareError as exc:
            error = exc.reason
        except Exception as exc:  # noqa: BLE001 - recorded on the job, reported in the log
            log.exception("transfer job %d failed", pk)
            error = f"internal error ({type(exc).__name__}): {exc}"[:500]
        finally:
            run.stop()
        if self.stopping.is_set() and state != "succeeded":
            state, error = "interrupted", STOPPED
        self._finish(run, state, error, result)

    def _principal(self, row: Any) -> Principal:
        """The job's creator as they are now, within the scopes they created it with."""
        try:
            who = Identities(self.engine).active_user(row.created_by_user_pk, "job",
                                                      parse_scopes(row.scopes))
            check(who, Action.REMOTE)
        except Forbidden as exc:
            raise Forbidden(f"the job's creator may no longer use remote archives: "
                            f"{exc.reason}") from None
        return replace(who, source=f"job {row.pk}")

    def _finish(self, run: _Run, state: str, error: str | None,
                result: dict[str, Any] | None) -> None:
        """The outcome; a job cancelled (or declared interrupted) meanwhile keeps its
        state and gets the report of what was done before it stopped."""
        values = run.values() | {"result": json.dumps(result) if result is not None else None}
        mine = (_J.c.pk == run.pk) & (_J.c.worker == self.name)
        with self.engine.begin() as conn:
            done = conn.execute(update(_J).where(mine, _J.c.state == "running").values(
                state=state, error=error, finished_at=clock.now(), **values)).rowcount
            if done == 0:
                conn.execute(update(_J).where(mine, _J.c.state.in_(("cancelled",
                                                                    "interrupted")))
                             .values(**values))


class _Run:
    """One running job's counters, heartbeat and cancellation check. A thread of its own
    writes the heartbeat (a DIMSE call can block longer than the stale limit) and progress
    not yet written, so a count is in the database within half a second."""

    def __init__(self, worker: TransferWorker, pk: int, total: int | None,
                 studies: int) -> None:
        self.worker = worker
        self.pk = pk
        self.total = total
        self.studies = studies
        self.counts = {"success": 0, "failure": 0, "warning": 0}
        self.reports: dict[str, scu.RetrieveReport] = {}
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.last = time.monotonic()
        self.dirty = False  # progress not written yet
        self.beat = threading.Thread(target=self._beat, name=f"transfer-job-{pk}",
                                     daemon=True)

    def start(self) -> None:
        self.beat.start()

    def stop(self) -> None:
        self.done.set()
        if self.beat.is_alive():
            self.beat.join(10)

    def sent(self, result: scu.InstanceResult) -> None:
        with self.lock:
            outcome = result.outcome if result.outcome in self.counts else "failure"
            self.counts[outcome] += 1
            self.dirty = True
        self._maybe_flush()

    def retrieving(self, report: scu.RetrieveReport) -> None:
        with self.lock:
            self.reports[report.study_uid] = report
            done = list(self.reports.values())
            self.counts = {"success": sum(r.completed for r in done),
                           "failure": sum(r.failed for r in done),
                           "warning": sum(r.warning for r in done)}
            totals = [r.completed + r.failed + r.warning
                      + ((r.remaining or 0) if r.status is None else 0)
                      for r in done if r.status is not None or r.remaining is not None]
            if len(totals) == self.studies:  # known once every study has started
                self.total = sum(totals)
            self.dirty = True
        self._maybe_flush()

    def cancelled(self) -> bool:
        if not (self.cancel.is_set() or self.worker.stopping.is_set()):
            self._maybe_flush()
        return self.cancel.is_set() or self.worker.stopping.is_set()

    def values(self) -> dict[str, Any]:
        with self.lock:
            self.dirty = False
            return {"total": self.total, "completed": self.counts["success"],
                    "failed": self.counts["failure"], "warning": self.counts["warning"],
                    "heartbeat_at": clock.now()}

    def _maybe_flush(self) -> None:
        if time.monotonic() - self.last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Progress and heartbeat; a job no longer running here (cancelled) stops."""
        self.last = time.monotonic()
        try:
            with self.worker.engine.begin() as conn:
                running = conn.execute(update(_J).where(
                    _J.c.pk == self.pk, _J.c.worker == self.worker.name,
                    _J.c.state == "running").values(**self.values())).rowcount
        except Exception:  # noqa: BLE001 - a missed beat is not the transfer's failure
            log.warning("transfer job %d: cannot write progress", self.pk, exc_info=True)
            return
        if running == 0:
            self.cancel.set()

    def _beat(self) -> None:
        while not self.done.wait(FLUSH_SECONDS):
            if self.dirty or time.monotonic() - self.last >= self.worker.beat_seconds:
                self.flush()
