"""The events monitoring reports, and the outbox (``monitor_event``) they wait in.

Producers only insert a row: ingest (``Access._after_store``) one ``stored`` row per
request that stored new instances, consults and share links one ``consult-updated`` /
``share-used`` row inside the transaction that changed them. The monitoring worker
(monitoring/worker.py) turns rows into webhook deliveries and watchlist notifications,
deciding per subscriber what is *new to it* and what it may see.

Semantics: an event row exists once its cause is committed (consults, links: the same
transaction; ingest: right after the index commit, so a crash in between loses the event
of those instances: at most once there). From the outbox on, delivery is at least once:
receivers deduplicate on the payload's ``id``.

When nobody subscribes (no webhook, no watch on the site) ingest inserts nothing; that
fact is cached per process for :data:`ACTIVE_CACHE_SECONDS` (one cheap query a second at
most), so a new subscription takes up to that long to be seen by the other HTTP worker
processes (``serve --workers``) and the DICOM service.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, insert, or_, select
from sqlalchemy.engine import Connection, Engine

from dicomshare import clock
from dicomshare.storage import schema as s
from dicomshare.storage.base import Outcome

if TYPE_CHECKING:
    from dicomshare.archive import StoreResult

log = logging.getLogger(__name__)

NEW_STUDY = "new-study"
NEW_SERIES = "new-series"
CONSULT_UPDATED = "consult-updated"
SHARE_USED = "share-used"
EVENTS = (NEW_STUDY, NEW_SERIES, CONSULT_UPDATED, SHARE_USED)
STORED = "stored"  # the outbox kind ingest writes; becomes new-study / new-series

ACTIVE_CACHE_SECONDS = 1.0
MAX_SOPS_PER_EVENT = 2000  # enough to date a request's instances; more are not listed

wake = threading.Event()  # set when a row is queued: this process's worker looks at once
_active: tuple[float, bool] = (0.0, False)
_active_lock = threading.Lock()


def invalidate() -> None:
    """A subscription was added or removed in this process: look again next time."""
    global _active
    with _active_lock:
        _active = (0.0, False)


def active(conn: Connection | Engine) -> bool:
    """Whether any webhook, watch or cohort watch exists (cached briefly; no query while
    cached)."""
    global _active
    now = time.monotonic()
    until, value = _active
    if now < until:
        return value
    if isinstance(conn, Engine):
        with conn.connect() as c:
            return active(c)
    value = bool(conn.execute(select(or_(
        exists().where(s.webhook.c.pk.is_not(None)), exists().where(s.watch.c.pk.is_not(None)),
        exists().where(s.cohort_watch.c.pk.is_not(None))))).scalar())
    with _active_lock:
        _active = (now + ACTIVE_CACHE_SECONDS, value)
    return value


def emit(conn: Connection, kind: str, organisation_pks: Iterable[int | None],
         data: dict[str, Any]) -> None:
    """Queue a consult-updated or share-used event for these organisations' webhooks, in
    the caller's transaction. ``data`` goes to the receivers as is: ids, states and
    times, no PHI."""
    if kind not in (CONSULT_UPDATED, SHARE_USED):
        raise ValueError(f"unknown event {kind!r}")
    orgs = sorted({o for o in organisation_pks if o is not None})
    if not orgs or not active(conn):
        return
    conn.execute(insert(s.monitor_event).values(
        kind=kind, payload=json.dumps({"organisations": orgs, "data": data}, sort_keys=True),
        created_at=clock.now()))
    wake.set()


def instances_stored(engine: Engine, owner: int | None, results: list[StoreResult]) -> None:
    """Ingest stored new instances: queue one ``stored`` row. Never raises: monitoring
    must not fail ingest (a problem is logged)."""
    try:
        studies: dict[str, dict[str, Any]] = {}
        count = 0
        for r in results:
            if not (r.ok and r.outcome is Outcome.STORED and r.study_uid and r.series_uid):
                continue
            entry = studies.setdefault(r.study_uid, {
                "study": r.study_uid,
                "patient": [r.patient_id or "", r.issuer_of_patient_id or ""], "series": {}})
            sops = entry["series"].setdefault(r.series_uid, [])
            if r.sop_uid and count < MAX_SOPS_PER_EVENT:
                sops.append(r.sop_uid)
                count += 1
        if not studies:
            return
        if not active(engine):
            return
        with engine.begin() as conn:
            conn.execute(insert(s.monitor_event).values(
                kind=STORED, payload=json.dumps({"owner": owner,
                                                 "studies": list(studies.values())}),
                created_at=clock.now()))
        wake.set()
    except Exception:  # the outbox is best effort on this path; ingest succeeded
        log.exception("could not queue a monitoring event for stored instances")
