"""The monitoring worker: one daemon thread per process that fans queued events out to
webhook deliveries and watchlist notifications, and a few sender threads that POST the
deliveries (each attempt audited). Nothing here runs on a request's path: a hanging or
failing receiver delays only its own deliveries.

Fan-out of a ``stored`` event, per subscriber (a webhook's organisation, a watcher):

- its visibility is computed as for a request (own organisation + live grants; a
  watcher's user grants too), for SEARCH;
- ``new-study``: some instance of this event is visible to it, and no visible instance of
  the study is older than the event's oldest one (so the first arrival a subscriber may
  see is new to it, a later one is not); ``new-series`` likewise per series;
- the payload carries UIDs, event name and time, nothing else (docs/monitoring.md);
- watches (patients, cohort queries) notify their user of a study new to that user,
  a cohort watch only when what the user may see of the study matches its query.

Claims make several processes safe: an event is taken with ``UPDATE ... SET processed_at
WHERE processed_at IS NULL`` in the transaction that writes its deliveries; a delivery by
moving its ``next_attempt_at`` past a lease before it is sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from dicomshare import clock
from dicomshare.access.audit import AuditLog
from dicomshare.access.grants import live_grants
from dicomshare.access.policy import Action, Principal, Visibility, allowed, visibility
from dicomshare.config import Settings
from dicomshare.monitoring import cohort, events
from dicomshare.monitoring import webhooks as wh
from dicomshare.monitoring.watch import watched_by
from dicomshare.sharing.notify import notify, server_link
from dicomshare.storage import schema as s
from dicomshare.storage.visibility import instance_visible

log = logging.getLogger(__name__)

_POLL_SECONDS = 1.0
_PRUNE_EVERY_SECONDS = 3600.0
EVENT_RETENTION = timedelta(days=7)  # processed outbox rows
DELIVERY_RETENTION = timedelta(days=30)  # finished deliveries and their attempts
_SENDERS = 4
_worker: MonitorWorker | None = None
_worker_lock = threading.Lock()
me, w, d = s.monitor_event, s.webhook, s.webhook_delivery


def start_monitor(engine: Engine, settings: Settings, audit: AuditLog | None = None) -> None:
    """Start this process's worker once (recording deliveries in ``audit``, the app's
    trail, or a handle of its own). Cheap to call often."""
    global _worker
    if _worker is not None:
        return
    with _worker_lock:
        if _worker is None:
            _worker = MonitorWorker(engine, settings, audit)
            _worker.start()


class MonitorWorker(threading.Thread):
    def __init__(self, engine: Engine, settings: Settings,
                 audit: AuditLog | None = None) -> None:
        super().__init__(name="dicomshare-monitor", daemon=True)
        self.engine = engine
        self.settings = settings
        self.pool = ThreadPoolExecutor(_SENDERS, thread_name_prefix="dicomshare-webhook")
        self.in_flight: dict[int, int] = {}  # delivery -> its webhook
        self.lock = threading.Lock()
        self.client = httpx.Client(follow_redirects=False, trust_env=False, timeout=httpx.Timeout(
            wh.timeout_seconds(), connect=min(3.0, wh.timeout_seconds())))
        # Appends from several handles and processes chain safely, so a handle of its own
        # does when the caller has none to share.
        self.audit = audit if audit is not None else AuditLog.open(settings, engine)

    def run(self) -> None:
        pruned = 0.0
        while True:
            events.wake.wait(_POLL_SECONDS)
            events.wake.clear()
            try:
                while fan_out_pending(self.engine, self.settings) > 0:
                    pass
                self.send_due()
                if time.monotonic() - pruned > _PRUNE_EVERY_SECONDS:
                    pruned = time.monotonic()
                    prune(self.engine)
            except Exception:  # the database is away: try again on the next round
                log.exception("monitoring worker round failed")

    def send_due(self) -> None:
        now = clock.now()
        lease = now + timedelta(seconds=wh.timeout_seconds() * 2 + 30)
        with self.lock:
            busy = set(self.in_flight.values())  # webhooks with an attempt under way
        if len(busy) >= _SENDERS:
            return
        with self.engine.connect() as conn:
            due = conn.execute(select(d.c.pk, d.c.webhook_pk).where(
                d.c.state == "pending", d.c.next_attempt_at <= now)
                .order_by(d.c.next_attempt_at).limit(100)).all()
        for pk, hook in due:
            # One attempt per webhook at a time: a hanging receiver holds one sender, and
            # the others keep serving the other webhooks.
            if hook in busy or len(busy) >= _SENDERS:
                continue
            busy.add(hook)
            with self.engine.begin() as conn:
                claimed = conn.execute(update(d).where(
                    d.c.pk == pk, d.c.state == "pending", d.c.next_attempt_at <= now)
                    .values(next_attempt_at=lease)).rowcount
            if claimed != 1:
                continue  # another process took it
            with self.lock:
                self.in_flight[pk] = hook
            self.pool.submit(self._send, pk)

    def _send(self, pk: int) -> None:
        try:
            wh.attempt(self.engine, pk, self.client, self.audit)
        except Exception:
            log.exception("webhook delivery %s failed", pk)
        finally:
            with self.lock:
                self.in_flight.pop(pk, None)
            events.wake.set()  # a retry may be due soon


def prune(engine: Engine) -> None:
    """Forget processed events after :data:`EVENT_RETENTION` and finished deliveries
    (with their attempts) after :data:`DELIVERY_RETENTION`."""
    now = clock.now()
    with engine.begin() as conn:
        conn.execute(delete(me).where(me.c.processed_at < now - EVENT_RETENTION))
        old = select(d.c.pk).where(d.c.state.in_(("delivered", "failed")),
                                   d.c.created_at < now - DELIVERY_RETENTION)
        conn.execute(delete(s.webhook_attempt).where(s.webhook_attempt.c.delivery_pk.in_(old)))
        conn.execute(delete(d).where(d.c.pk.in_(old)))


# -- fan-out ------------------------------------------------------------------------------
def fan_out_pending(engine: Engine, settings: Settings, batch: int = 20) -> int:
    """Turn up to ``batch`` queued events into deliveries and notifications."""
    with engine.connect() as conn:
        pks = conn.execute(select(me.c.pk).where(me.c.processed_at.is_(None))
                           .order_by(me.c.pk).limit(batch)).scalars().all()
    done = 0
    for pk in pks:
        with engine.begin() as conn:
            claimed = conn.execute(update(me).where(me.c.pk == pk, me.c.processed_at.is_(None))
                                   .values(processed_at=clock.now())).rowcount
            if claimed != 1:
                continue
            row = conn.execute(select(me).where(me.c.pk == pk)).one()
            try:
                fan_out(conn, settings, row)
            except Exception:  # a bad row must not block the queue
                log.exception("could not fan out monitoring event %s", pk)
        done += 1
    return done


def fan_out(conn: Connection, settings: Settings, row: Any) -> None:
    payload = json.loads(row.payload)
    at = clock.aware(row.created_at)
    if row.kind == events.STORED:
        _fan_out_stored(conn, settings, row.pk, at, payload)
        return
    data = payload.get("data", {})
    for hook in _hooks(conn, row.kind, payload.get("organisations", [])):
        _deliver(conn, hook, f"{row.pk}.{row.kind}", row.kind, at, data)


def _hooks(conn: Connection, event: str, organisations: list[int] | None = None) -> list[Any]:
    stmt = select(w.c.pk, w.c.organisation_pk, w.c.events, s.organisation.c.name).join(
        s.organisation, s.organisation.c.pk == w.c.organisation_pk).order_by(w.c.pk)
    if organisations is not None:
        stmt = stmt.where(w.c.organisation_pk.in_(organisations))
    return [h for h in conn.execute(stmt) if event in h.events.split(",")]


def _deliver(conn: Connection, hook: Any, event_id: str, event: str, at: datetime | None,
             data: dict[str, Any]) -> None:
    body = json.dumps({"id": event_id, "event": event, "occurred_at": clock.iso(at),
                       "organisation": hook.name, "data": data}, sort_keys=True)
    exists = conn.execute(select(d.c.pk).where(d.c.webhook_pk == hook.pk,
                                               d.c.event_id == event_id)).first()
    if exists is None:
        conn.execute(insert(d).values(webhook_pk=hook.pk, event_id=event_id, event=event,
                                      body=body, state="pending", attempts=0,
                                      next_attempt_at=clock.now(), created_at=clock.now()))


def _org_visibility(conn: Connection, organisation_pk: int, name: str) -> Visibility:
    who = Principal(user=f"organisation:{organisation_pk}", organisation=name, role="clinician",
                    organisation_pk=organisation_pk, kind="cli")
    return visibility(who, Action.SEARCH, live_grants(conn, who))


def _user_visibility(conn: Connection, user_pk: int) -> tuple[Principal, Visibility] | None:
    u, o = s.user, s.organisation
    row = conn.execute(select(u.c.pk, u.c.name, u.c.role, u.c.superuser, u.c.disabled_at,
                              o.c.name.label("org"), o.c.pk.label("org_pk"))
                       .join(o, o.c.pk == u.c.organisation_pk).where(u.c.pk == user_pk)).first()
    if row is None or row.disabled_at is not None:
        return None
    who = Principal(row.name, row.org, row.role, user_pk=row.pk, organisation_pk=row.org_pk,
                    superuser=bool(row.superuser), kind="cli")
    if not allowed(who, Action.SEARCH):
        return None
    return who, visibility(who, Action.SEARCH, live_grants(conn, who))


def _new_to(conn: Connection, vis: Visibility, study_uid: str, sops: list[str]
            ) -> tuple[bool, list[str]]:
    """(whether the study is new to this visibility, the series new to it) for the
    event's instances ``sops`` of the study."""
    i, se, st = s.instance, s.series, s.study
    base = (select(se.c.series_instance_uid, func.min(i.c.created_at))
            .select_from(i.join(se, se.c.pk == i.c.series_pk).join(st, st.c.pk == se.c.study_pk))
            .where(st.c.study_instance_uid == study_uid, instance_visible(vis))
            .group_by(se.c.series_instance_uid))
    mine = dict(conn.execute(base.where(i.c.sop_instance_uid.in_(sops))).tuples().all())
    if not mine:
        return False, []
    first = min(clock.aware(t) for t in mine.values())
    older = dict(conn.execute(base.where(i.c.sop_instance_uid.not_in(sops))).tuples().all())
    new_series = [uid for uid, t in mine.items()
                  if uid not in older or clock.aware(older[uid]) >= clock.aware(t)]
    study_new = all(clock.aware(t) >= first for t in older.values())
    return study_new, sorted(new_series)


def _fan_out_stored(conn: Connection, settings: Settings, event_pk: int,
                    at: datetime | None, payload: dict[str, Any]) -> None:
    hooks = _hooks(conn, events.NEW_STUDY) + _hooks(conn, events.NEW_SERIES)
    cohorts = cohort.all_watches(conn)
    followers = _Followers(conn)
    org_vis: dict[int, Visibility] = {}
    base = server_link(settings).rstrip("/") + settings.dicomweb_root.rstrip("/")
    for entry in payload.get("studies", []):
        study = entry["study"]
        sops = [sop for sops in entry["series"].values() for sop in sops]
        if not sops:
            continue
        seen: dict[int, tuple[bool, list[str]]] = {}
        for hook in {h.pk: h for h in hooks}.values():
            org = hook.organisation_pk
            if org not in org_vis:
                org_vis[org] = _org_visibility(conn, org, hook.name)
            if org not in seen:
                seen[org] = _new_to(conn, org_vis[org], study, sops)
            study_new, new_series = seen[org]
            names = hook.events.split(",")
            if study_new and events.NEW_STUDY in names:
                _deliver(conn, hook, f"{event_pk}.new-study.{study}", events.NEW_STUDY, at,
                         {"study_instance_uid": study, "series_instance_uids": new_series,
                          "study_url": f"{base}/studies/{study}"})
            if events.NEW_SERIES in names:
                for series in new_series:
                    _deliver(conn, hook, f"{event_pk}.new-series.{series}",
                             events.NEW_SERIES, at,
                             {"study_instance_uid": study, "series_instance_uid": series,
                              "series_url": f"{base}/studies/{study}/series/{series}"})
        patient_id, issuer = (entry.get("patient") or ["", ""])[:2]
        for watch in watched_by(conn, patient_id, issuer):
            found = followers.new_to(watch.user_pk, study, sops)
            who = found[0] if found else None
            if who is not None and who.organisation_pk is not None:
                # The subject goes by e-mail: no PatientID, no label (either may be PHI).
                notify(conn, who.organisation_pk, who.user_pk, "watch-new-study",
                       "A new study of a patient you follow arrived",
                       {"watch_id": watch.id, "label": watch.label,
                        "patient_id": watch.patient_id,
                        "issuer_of_patient_id": watch.issuer_of_patient_id,
                        "study_instance_uid": study})
        if cohorts:
            _fan_out_cohorts(conn, cohorts, followers, study, sops)


def _fan_out_cohorts(conn: Connection, watches: list[cohort.CohortWatch],
                     followers: _Followers, study: str, sops: list[str]) -> None:
    """Notify each cohort watch whose query the study matches, over what its follower may
    see, when the study is new to that follower: once per watch and study, since only
    the first arrival a follower may see is new to it."""
    everything = cohort.study_facts(conn, study)
    seen: dict[int, cohort.StudyFacts | None] = {}
    for watch in watches:
        if not watch.query.matches(everything):  # cannot match what the follower sees
            continue
        found = followers.new_to(watch.user_pk, study, sops)
        if found is None:
            continue
        who, vis = found
        if who.organisation_pk is None:
            continue
        if watch.user_pk not in seen:  # what this follower may see of the study
            seen[watch.user_pk] = cohort.study_facts(conn, study, vis)
        if watch.query.matches(seen[watch.user_pk]):
            # Details: UIDs, the watch's own id and label; the e-mail only the subject.
            notify(conn, who.organisation_pk, who.user_pk, cohort.KIND, cohort.SUBJECT,
                   {"watch_id": watch.id, "label": watch.label,
                    "study_instance_uid": study})


class _Followers:
    """Watchers' visibility and what is new to them, computed once per event."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.users: dict[int, tuple[Principal, Visibility] | None] = {}
        self.new: dict[tuple[int, str], bool] = {}

    def _user(self, user_pk: int) -> tuple[Principal, Visibility] | None:
        if user_pk not in self.users:
            self.users[user_pk] = _user_visibility(self.conn, user_pk)
        return self.users[user_pk]

    def new_to(self, user_pk: int, study: str, sops: list[str]
               ) -> tuple[Principal, Visibility] | None:
        """The follower and its visibility, if it may search and the study is new to it;
        else None."""
        found = self._user(user_pk)
        if found is None:
            return None
        if (user_pk, study) not in self.new:
            self.new[user_pk, study] = _new_to(self.conn, found[1], study, sops)[0]
        return found if self.new[user_pk, study] else None
