"""The tamper-evident audit trail: who touched which patient's data, when, and from where.

Three choices shape this module:

* Recording must not slow a request down, so :meth:`AuditLog.record` only queues the event;
  one writer thread per process commits whatever is queued in one transaction. Events
  whose loss would matter (stores, deletes, grants, logins) pass ``wait=True``.
* Each record carries ``hash = HMAC-SHA256(key, prev_hash + canonical JSON)`` of its own
  content and its predecessor's hash, so editing, inserting or deleting a stored record
  breaks the chain and :meth:`AuditLog.verify` names the record. Without the key a chain
  cannot be re-forged after an edit.
* ``seq`` is gapless across every process appending to the database: appends are
  serialised with an ``flock`` (SQLite) or a transaction-scoped advisory lock (PostgreSQL).

The application never updates or deletes records; nothing here offers a way to.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Text, and_, cast, insert, or_, select, text
from sqlalchemy.engine import Engine, Row

from dicomshare.errors import DicomshareError
from dicomshare.storage import schema as s

if TYPE_CHECKING:
    from dicomshare.access.audit_export import SyslogForwarder
    from dicomshare.access.policy import Principal
    from dicomshare.config import Settings

log = logging.getLogger("dicomshare.audit")

GENESIS = "0" * 64  # prev_hash of the first record
OUTCOMES = ("success", "denied", "failure")
BATCH = 500  # records per transaction at most
# pg_advisory_xact_lock key shared by every process appending to one database ("dsaudit1").
PG_LOCK_KEY = int.from_bytes(b"dsaudit1", "big")
_RETRIES = (0.2, 1.0, 3.0)  # seconds before each new attempt at a failed commit
_PAGE = 1000  # rows per read while streaming
LINGER = 0.05  # seconds a commit waits for more records when nobody waits for it
_t = s.audit_event


class AuditError(DicomshareError):
    """The audit trail could not be written or its key could not be read."""

    http_status = 503


@dataclass(frozen=True)
class AuditEvent:
    """What happened, as the caller knows it; :meth:`AuditLog.record` adds time and chain."""

    action: str
    outcome: str = "success"  # success | denied | failure
    principal: Principal | None = None
    user_name: str | None = None  # who, when there is no principal (e.g. a failed login)
    source: str | None = None  # client address, or calling AE title / host for DICOM
    patient_ids: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    data_organisations: tuple[int, ...] = ()  # organisation pks whose data was touched
    details: Mapping[str, Any] = field(default_factory=dict)  # JSON-serialisable


@dataclass(frozen=True)
class AuditRecord:
    """One stored record, as read back."""

    seq: int
    at: datetime
    action: str
    outcome: str
    actor_user: str | None
    actor_organisation: int | None
    actor_kind: str | None
    source: str | None
    patient_id: str | None
    study_uid: str | None
    data_organisations: tuple[int, ...]
    details: dict[str, Any]
    prev_hash: str
    hash: str

    @property
    def patient_ids(self) -> tuple[str, ...]:
        """Every patient the event touched (the column holds only the first)."""
        many = self.details.get("patient_ids")
        if isinstance(many, list) and many:
            return tuple(str(p) for p in many)
        return (self.patient_id,) if self.patient_id is not None else ()

    @property
    def study_uids(self) -> tuple[str, ...]:
        many = self.details.get("study_uids")
        if isinstance(many, list) and many:
            return tuple(str(u) for u in many)
        return (self.study_uid,) if self.study_uid is not None else ()

    def content(self) -> dict[str, Any]:
        """The hashed fields: everything but ``hash``."""
        return {
            "seq": self.seq, "at": iso_utc(self.at), "action": self.action,
            "outcome": self.outcome, "actor_user": self.actor_user,
            "actor_organisation": self.actor_organisation, "actor_kind": self.actor_kind,
            "source": self.source, "patient_id": self.patient_id, "study_uid": self.study_uid,
            "data_organisations": list(self.data_organisations), "details": self.details,
            "prev_hash": self.prev_hash,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.content(), "hash": self.hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """The inverse of :meth:`as_dict` (exported JSON lines, syslog messages)."""
        return cls(
            seq=int(data["seq"]), at=parse_utc(str(data["at"])), action=data["action"],
            outcome=data["outcome"], actor_user=data.get("actor_user"),
            actor_organisation=data.get("actor_organisation"),
            actor_kind=data.get("actor_kind"), source=data.get("source"),
            patient_id=data.get("patient_id"), study_uid=data.get("study_uid"),
            data_organisations=tuple(int(o) for o in data.get("data_organisations") or ()),
            details=dict(data.get("details") or {}), prev_hash=data["prev_hash"],
            hash=data["hash"])


@dataclass
class VerifyReport:
    """The outcome of walking the chain. ``last_seq``/``last_hash`` are worth writing down:
    deleting the newest records is only detectable against such an external anchor."""

    checked: int
    problems: list[str]
    last_seq: int = 0
    last_hash: str = GENESIS

    @property
    def ok(self) -> bool:
        return not self.problems


# -- canonical form and chain ---------------------------------------------------------------
def iso_utc(at: datetime) -> str:
    """UTC, microseconds, explicit offset: identical before and after any database."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def parse_utc(value: str) -> datetime:
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(key: bytes, prev_hash: str, content: Mapping[str, Any]) -> str:
    message = prev_hash.encode("utf-8", "replace") + canonical_json(content).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify_chain(records: Iterable[tuple[int | None, AuditRecord]], key: bytes,
                 anchors: Sequence[tuple[int, str]] = ()) -> VerifyReport:
    """Walk ``(storage position, record)`` pairs in seq order and name what is wrong.

    Works on database rows and on exported copies alike (position None: not checked)."""
    report = VerifyReport(0, [])
    prev_seq, prev_hash, prev_pos = 0, GENESIS, None
    wanted = dict(anchors)
    for pos, rec in records:
        report.checked += 1
        if rec.seq > prev_seq + 1:
            gone = (f"seq {prev_seq + 1}" if rec.seq == prev_seq + 2
                    else f"seq {prev_seq + 1}..{rec.seq - 1}")
            report.problems.append(f"{gone}: missing (deleted): seq {prev_seq} is followed "
                                   f"by seq {rec.seq}")
        elif rec.seq <= prev_seq:
            report.problems.append(f"seq {rec.seq}: out of order: after seq {prev_seq}")
        if rec.prev_hash != prev_hash:
            report.problems.append(
                f"seq {rec.seq}: prev_hash does not match the hash of seq {prev_seq}: a "
                f"record before it was deleted, inserted or replaced")
        if pos is not None and prev_pos is not None and pos < prev_pos:
            # Appends are serialised, so storage order follows seq: the earlier record
            # came in after its successor.
            report.problems.append(f"seq {prev_seq}: out of order: stored after seq "
                                   f"{rec.seq} (inserted later)")
        if not _same(chain_hash(key, rec.prev_hash, rec.content()), rec.hash):
            report.problems.append(f"seq {rec.seq}: hash does not match its content: the "
                                   f"record was edited or forged (or another key is in use)")
        if rec.seq in wanted and not _same(wanted.pop(rec.seq), rec.hash):
            report.problems.append(f"seq {rec.seq}: hash differs from the anchor written "
                                   f"down earlier: the trail was rewritten")
        prev_seq, prev_hash, prev_pos = rec.seq, rec.hash, pos
        report.last_seq, report.last_hash = rec.seq, rec.hash
    for seq in sorted(wanted):
        report.problems.append(f"seq {seq}: missing although an anchor names it: the trail "
                               f"ends at seq {report.last_seq} (newest records deleted)")
    return report


def _same(a: str, b: str) -> bool:
    """Constant-time comparison that also takes edited, non-ASCII values."""
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


# -- keys -----------------------------------------------------------------------------------
def load_or_create_key(path: Path) -> bytes:
    """The audit key file, made once (see dicomshare.keys)."""
    from dicomshare.keys import KeyFileError
    from dicomshare.keys import load_or_create_key as load

    try:
        return load(path, min_bytes=16)
    except KeyFileError as exc:
        raise AuditError(str(exc)) from exc


# -- the log --------------------------------------------------------------------------------
@dataclass(eq=False)
class _Pending:
    """An event queued in this process, waiting for its seq."""

    at: datetime
    action: str
    outcome: str
    actor_user: str | None
    actor_organisation: int | None
    actor_kind: str | None
    source: str | None
    patient_id: str | None
    study_uid: str | None
    data_organisations: tuple[int, ...]
    details: dict[str, Any]
    finished: bool = False
    error: BaseException | None = None
    urgent: bool = False  # someone waits for it: commit without lingering

    def seal(self, key: bytes, seq: int, prev_hash: str) -> AuditRecord:
        rec = AuditRecord(seq, self.at, self.action, self.outcome, self.actor_user,
                          self.actor_organisation, self.actor_kind, self.source,
                          self.patient_id, self.study_uid, self.data_organisations,
                          self.details, prev_hash, "")
        return AuditRecord(**{**rec.__dict__, "hash": chain_hash(key, prev_hash, rec.content())})


def _text(value: str | None, limit: int | None = None) -> str | None:
    """Valid UTF-8 (lone surrogates become "?"), no NUL (PostgreSQL text refuses it), cut
    to the column's length: one odd value must never make a commit fail."""
    if value is None:
        return None
    clean = str(value).encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return clean[:limit] if limit is not None else clean


def _pending(event: AuditEvent) -> _Pending:
    if event.outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be one of {OUTCOMES}, not {event.outcome!r}")
    # Through JSON once now: the hash covers exactly what reads back, and later changes to
    # the caller's mapping cannot leak in.
    details: dict[str, Any] = json.loads(_text(json.dumps(
        dict(event.details), default=str, ensure_ascii=False)) or "{}")
    patients = [p for p in (_text(p) for p in event.patient_ids) if p is not None]
    studies = [u for u in (_text(u) for u in event.study_uids) if u is not None]
    if len(patients) > 1:
        details["patient_ids"] = patients
    if len(studies) > 1 or any(len(u) > 64 for u in studies):
        details["study_uids"] = studies  # all of them, and whole
    who = event.principal
    source = event.source if event.source is not None else (who.source if who else None)
    return _Pending(
        at=datetime.now(UTC), action=_text(event.action, 64) or "", outcome=event.outcome,
        actor_user=_text(who.user if who else event.user_name, 200),
        actor_organisation=who.organisation_pk if who else None,
        actor_kind=_text(who.kind, 16) if who else None,
        source=_text(source, 255),
        patient_id=patients[0] if patients else None,
        study_uid=studies[0][:64] if studies else None,
        data_organisations=tuple(sorted({int(o) for o in event.data_organisations})),
        details=details)


def _lost(item: _Pending, error: BaseException) -> None:
    """Hand the failure to a waiting caller, and the event itself to the log."""
    item.error = error
    log.error("audit record lost: %s %s", error, canonical_json(
        {"at": iso_utc(item.at), "action": item.action, "outcome": item.outcome,
         "actor_user": item.actor_user, "source": item.source, "patient_id": item.patient_id,
         "study_uid": item.study_uid, "details": item.details}))


def _row(rec: AuditRecord) -> dict[str, Any]:
    orgs = ("," + ",".join(str(o) for o in rec.data_organisations) + ","
            if rec.data_organisations else None)
    return {"seq": rec.seq, "at": rec.at, "action": rec.action, "outcome": rec.outcome,
            "actor_user": rec.actor_user, "actor_organisation_pk": rec.actor_organisation,
            "actor_kind": rec.actor_kind, "source": rec.source, "patient_id": rec.patient_id,
            "study_instance_uid": rec.study_uid, "data_organisations": orgs,
            "details": canonical_json(rec.details), "prev_hash": rec.prev_hash,
            "hash": rec.hash}


def _record(row: Row[Any]) -> AuditRecord:
    """A row as a record. Values edited into something unreadable are kept under
    ``__unreadable__`` in details, so the hash check reports the record."""
    m = row._mapping
    unreadable: dict[str, Any] = {}
    try:
        details = json.loads(m["details"])
    except (TypeError, ValueError):
        details = None
    if not isinstance(details, dict):
        details, unreadable["details"] = {}, m["details"]
    raw_orgs = m["data_organisations"] or ""
    try:
        orgs = tuple(int(o) for o in raw_orgs.strip(",").split(",") if o)
    except ValueError:
        orgs, unreadable["data_organisations"] = (), raw_orgs
    if unreadable:
        details = {**details, "__unreadable__": unreadable}
    at = m["at"]
    if isinstance(at, str):  # read as text: the stored value was not a readable time
        try:
            at = parse_utc(at.replace(" ", "T", 1))
        except ValueError:
            at = datetime(1970, 1, 1, tzinfo=UTC)
            details = {**details, "__unreadable__": {**unreadable, "at": m["at"]}}
    return AuditRecord(
        seq=int(m["seq"]), at=_utc(at), action=m["action"], outcome=m["outcome"],
        actor_user=m["actor_user"], actor_organisation=m["actor_organisation_pk"],
        actor_kind=m["actor_kind"], source=m["source"], patient_id=m["patient_id"],
        study_uid=m["study_instance_uid"], data_organisations=orgs, details=details,
        prev_hash=m["prev_hash"], hash=m["hash"])


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


class AuditLog:
    """Appends to and reads the ``audit_event`` chain of one database.

    One instance per process is enough (the server shares one); instances in other
    processes append to the same chain safely."""

    _process_lock = threading.Lock()  # appends of every instance in this process
    _held_fd: int | None = None  # the lock file descriptor while an append holds the flock

    def __init__(self, engine: Engine, key: bytes, syslog: str = "",
                 lock_path: str | None = None) -> None:
        if not key:
            raise AuditError("the audit key is empty")
        self.engine = engine
        self._key = bytes(key)
        self._postgres = engine.dialect.name == "postgresql"
        if lock_path is None and engine.dialect.name == "sqlite":
            database = engine.url.database
            lock_path = f"{database}.writelock" if database and database != ":memory:" \
                else None
        self._lock_path = lock_path
        self._forwarder: SyslogForwarder | None = None
        if syslog:
            from dicomshare.access.audit_export import SyslogForwarder  # imports this module

            self._forwarder = SyslogForwarder(syslog)
        self._reset()
        ref = weakref.ref(self)
        atexit.register(_close_at_exit, ref)
        # A forked child would start with the parent's queue (the parent's to write) and
        # no writer thread: it gets fresh state of its own.
        os.register_at_fork(after_in_child=lambda: _reset_in_child(ref))

    def _reset(self) -> None:
        """Fresh queue and thread state (at start, and in a forked child)."""
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._queued = 0
        self._done = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, settings: Settings, engine: Engine) -> AuditLog:
        """The log as configured: ``audit_key``, else ``<data_dir>/secrets/audit.key``."""
        key = (settings.audit_key.encode("utf-8") if settings.audit_key else
               load_or_create_key(Path(settings.data_dir) / "secrets" / "audit.key"))
        return cls(engine, key, settings.audit_syslog)

    # -- writing ----------------------------------------------------------------------------
    def record(self, event: AuditEvent, wait: bool = False) -> None:
        """Queue the event; with ``wait`` return only once it is committed (raises
        AuditError if it could not be)."""
        item = _pending(event)
        item.urgent = wait
        with self._cond:
            self._ensure_thread()
            self._queue.append(item)
            self._queued += 1
            self._cond.notify_all()
            if not wait:
                return
            while not item.finished:
                self._cond.wait()
        if item.error is not None:
            raise AuditError(f"the audit record could not be written: {item.error}") \
                from item.error

    def flush(self, timeout: float = 10) -> None:
        """Return once everything recorded so far is committed (or failed and was logged);
        TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._queued
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{target - self._done} audit records not yet "
                                       f"committed after {timeout} s")
                self._cond.wait(left)

    def close(self, timeout: float = 10) -> None:
        """Flush, stop the writer thread and the syslog forwarder. Recording again later
        starts a new writer."""
        with self._cond:
            thread = self._thread
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            self._stopping = False
            if self._thread is thread:
                self._thread = None
        if self._forwarder is not None:
            self._forwarder.close(timeout)

    def _ensure_thread(self) -> None:
        """Called with the condition held: the writer starts with the first record."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                # Nobody waits: linger a moment so one commit (one fsync) takes several
                # records, instead of one per request.
                deadline = time.monotonic() + LINGER
                while not self._stopping and len(self._queue) < BATCH \
                        and not any(i.urgent for i in self._queue) \
                        and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            records: list[AuditRecord] = []
            try:
                records = self._commit(batch)
            except BaseException as exc:  # a bug here must not leave waiters hanging
                for item in batch:
                    if item.error is None:
                        _lost(item, exc)
                raise
            finally:
                with self._cond:
                    for item in batch:
                        item.finished = True
                    self._done += len(batch)
                    self._cond.notify_all()
            if records and self._forwarder is not None:
                self._forwarder.send(records)

    def _commit(self, batch: list[_Pending]) -> list[AuditRecord]:
        """Commit with retries; if the batch still fails, one event at a time, so a single
        bad event cannot take the others with it. Failures are marked on the items."""
        for attempt, pause in enumerate((*_RETRIES, None)):
            try:
                return self._append(batch)
            except Exception as exc:  # noqa: BLE001 - retried, then reported per item
                error: Exception = exc
                if pause is None:
                    break
                log.warning("audit commit failed (attempt %d), retrying: %s", attempt + 1, exc)
                time.sleep(pause)
        if len(batch) == 1:
            _lost(batch[0], error)
            return []
        records: list[AuditRecord] = []
        for item in batch:
            try:
                records += self._append([item])
            except Exception as exc:  # noqa: BLE001 - reported to waiters and the log
                _lost(item, exc)
        return records

    def _append(self, batch: list[_Pending]) -> list[AuditRecord]:
        """Read the chain's end and append, as one step no other process can interleave."""
        with self._append_lock(), self.engine.begin() as conn:
            if self._postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            last = conn.execute(select(_t.c.seq, _t.c.hash).order_by(_t.c.seq.desc())
                                .limit(1)).first()
            seq, prev_hash = (int(last.seq), last.hash) if last else (0, GENESIS)
            records = []
            for item in batch:
                seq += 1
                rec = item.seal(self._key, seq, prev_hash)
                records.append(rec)
                prev_hash = rec.hash
            conn.execute(insert(_t), [_row(rec) for rec in records])
        return records

    @contextmanager
    def _append_lock(self) -> Iterator[None]:
        with self._process_lock:
            if self._lock_path is None:
                yield
                return
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                AuditLog._held_fd = fd
                yield
            finally:
                AuditLog._held_fd = None
                os.close(fd)  # closing releases the flock

    # -- reading ----------------------------------------------------------------------------
    def query(self, *, organisation: int | None = None, user: str | None = None,
              patient_id: str | None = None, study_uid: str | None = None,
              action: str | None = None, since: datetime | None = None,
              until: datetime | None = None, limit: int = 100,
              offset: int = 0) -> list[AuditRecord]:
        """Newest first. ``organisation``: records its users made or that touched its data
        (None: everything). ``since`` is inclusive, ``until`` exclusive. A patient or study
        matches any of the event's patients or studies, not only the first."""
        where: list[ColumnElement[bool]] = []
        if organisation is not None:
            org = int(organisation)
            where.append(or_(_t.c.actor_organisation_pk == org,
                             _t.c.data_organisations.like(f"%,{org},%")))
        if user is not None:
            where.append(_t.c.actor_user == user)
        if action is not None:
            where.append(_t.c.action == action)
        if since is not None:
            where.append(_t.c.at >= _utc(since))
        if until is not None:
            where.append(_t.c.at < _utc(until))
        checks: list[Callable[[AuditRecord], bool]] = []
        for value, column, key, get in (
                (patient_id, _t.c.patient_id, "patient_ids", _patients),
                (study_uid, _t.c.study_instance_uid, "study_uids", _studies)):
            if value is None:
                continue
            # The first id is a column; the others sit in details (checked exactly below).
            where.append(or_(column == value, and_(
                _t.c.details.contains(f'"{key}":[', autoescape=True),
                _t.c.details.contains(json.dumps(value, ensure_ascii=False),
                                      autoescape=True))))
            checks.append(_member(value, get))
        stmt = select(_t).where(*where).order_by(_t.c.seq.desc())
        if not checks:
            with self.engine.connect() as conn:
                rows = conn.execute(stmt.limit(limit).offset(offset)).all()
            return [_record(r) for r in rows]
        out: list[AuditRecord] = []
        skip, before = offset, None
        while len(out) < limit:
            page = stmt if before is None else stmt.where(_t.c.seq < before)
            with self.engine.connect() as conn:
                rows = conn.execute(page.limit(_PAGE)).all()
            for rec in map(_record, rows):
                if all(check(rec) for check in checks):
                    if skip:
                        skip -= 1
                    elif len(out) < limit:
                        out.append(rec)
            if len(rows) < _PAGE:
                break
            before = int(rows[-1]._mapping["seq"])
        return out

    def iter_records(self, since_seq: int = 0) -> Iterator[AuditRecord]:
        """Records with seq > ``since_seq``, oldest first, read in pages (for exports)."""
        for _pk, rec in self._rows(since_seq):
            yield rec

    def last(self) -> AuditRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(_t).order_by(_t.c.seq.desc()).limit(1)).first()
        return _record(row) if row is not None else None

    def verify(self, anchors: Sequence[tuple[int, str]] = ()) -> VerifyReport:
        """Walk the whole chain in seq order. ``anchors``: (seq, hash) pairs written down
        earlier (or taken from an export); each must still be there, unchanged."""
        failures: list[Exception] = []

        def guarded() -> Iterator[tuple[int, AuditRecord]]:
            try:
                yield from self._rows(0)
            except (ValueError, TypeError, KeyError) as exc:  # a value no driver can read
                failures.append(exc)

        report = verify_chain(guarded(), self._key, anchors)
        if failures:
            report.problems.append(f"records after seq {report.last_seq}: unreadable (the "
                                   f"table was edited): {failures[0]}")
        return report

    def _rows(self, since_seq: int) -> Iterator[tuple[int, AuditRecord]]:
        after = since_seq
        while True:
            page = select(_t).where(_t.c.seq > after).order_by(_t.c.seq).limit(_PAGE)
            with self.engine.connect() as conn:
                try:
                    rows = conn.execute(page).all()
                except ValueError:  # an edited time the driver cannot read: take it as text
                    rows = conn.execute(page.with_only_columns(
                        *(cast(c, Text).label("at") if c.name == "at" else c
                          for c in _t.c))).all()
            for row in rows:
                yield int(row._mapping["pk"]), _record(row)
            if len(rows) < _PAGE:
                return
            after = int(rows[-1]._mapping["seq"])


def _member(value: str, get: Callable[[AuditRecord], tuple[str, ...]]
            ) -> Callable[[AuditRecord], bool]:
    return lambda rec: value in get(rec)


def _patients(rec: AuditRecord) -> tuple[str, ...]:
    return rec.patient_ids


def _studies(rec: AuditRecord) -> tuple[str, ...]:
    return rec.study_uids


def _new_process_lock() -> None:
    """A child forked while a writer appended would otherwise inherit the thread lock
    locked, and a copy of the flocked descriptor that keeps every process waiting for as
    long as the child lives."""
    AuditLog._process_lock = threading.Lock()
    if AuditLog._held_fd is not None:
        try:
            os.close(AuditLog._held_fd)
        except OSError:
            pass
        AuditLog._held_fd = None


os.register_at_fork(after_in_child=_new_process_lock)


def _reset_in_child(ref: weakref.ref[AuditLog]) -> None:
    audit = ref()
    if audit is not None:
        audit._reset()
        if audit._forwarder is not None:
            audit._forwarder._reset()


def _close_at_exit(ref: weakref.ref[AuditLog]) -> None:
    """Queued records reach the database when the interpreter exits normally."""
    audit = ref()
    if audit is not None:
        try:
            audit.close(timeout=5)
        except Exception:  # noqa: BLE001 - nothing left to tell at exit
            log.exception("closing the audit log at exit failed")


__all__ = ["AuditError", "AuditEvent", "AuditLog", "AuditRecord", "VerifyReport",
           "canonical_json", "chain_hash", "load_or_create_key", "verify_chain"]
