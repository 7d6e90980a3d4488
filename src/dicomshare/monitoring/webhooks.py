"""Webhooks per organisation: subscriptions, signed delivery with retries, the delivery log.

An organisation's admins subscribe a URL to some of :data:`~dicomshare.monitoring.events.
EVENTS`. Each event for the organisation becomes one ``webhook_delivery`` row (the JSON
body, fixed once) that the monitoring worker POSTs, retrying on failure after the delays
of :func:`retry_schedule`; every attempt is kept in ``webhook_attempt`` and written to the
audit trail (:data:`AUDIT_ACTIONS`: ids, event kind and HTTP status, no PHI), since an
attempt sends news of patients' studies out of the archive.

Signature (see docs/monitoring.md): ``X-Dicomshare-Timestamp: <unix seconds>`` and
``X-Dicomshare-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>``.
The timestamp is signed too, so a receiver refusing old timestamps (say > 5 minutes)
refuses replays. The secret is stored in clear: signing needs it (unlike a token, a hash
would not do); it is shown once, at creation.

SSRF: only http(s) URLs without credentials; the host's addresses must be public unless
``DICOMSHARE_WEBHOOK_ALLOW_PRIVATE=1`` (loopback, private, link-local ... addresses, as
for tests or an intranet receiver). Checked at creation and again before every attempt;
redirects are never followed (a 3xx is a failed attempt).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine

from dicomshare import __version__, clock
from dicomshare.access.audit import AuditEvent, AuditLog
from dicomshare.access.policy import Principal
from dicomshare.errors import InvalidInput, NotFound
from dicomshare.monitoring import events
from dicomshare.storage import schema as s

log = logging.getLogger(__name__)
w, d, a = s.webhook, s.webhook_delivery, s.webhook_attempt
SENDER = "system:webhook-sender"  # the audit trail's actor for delivery attempts

DEFAULT_RETRY_SECONDS = (10.0, 30.0, 120.0, 600.0, 3600.0)  # after the first attempt
DEFAULT_TIMEOUT_SECONDS = 5.0
MAX_WEBHOOKS_PER_ORGANISATION = 20
SIGNATURE_HEADER = "X-Dicomshare-Signature"
TIMESTAMP_HEADER = "X-Dicomshare-Timestamp"


def retry_schedule() -> tuple[float, ...]:
    """Delays before the 2nd, 3rd ... attempt; ``DICOMSHARE_WEBHOOK_RETRY_SECONDS``
    ("10,30,120,600,3600") overrides the default (tests use fractions of a second)."""
    text = os.environ.get("DICOMSHARE_WEBHOOK_RETRY_SECONDS", "").strip()
    if not text:
        return DEFAULT_RETRY_SECONDS
    try:
        return tuple(max(0.0, float(x)) for x in text.split(",") if x.strip())
    except ValueError:
        return DEFAULT_RETRY_SECONDS


def max_attempts() -> int:
    return 1 + len(retry_schedule())


def timeout_seconds() -> float:
    try:
        return max(0.5, float(os.environ.get("DICOMSHARE_WEBHOOK_TIMEOUT", "")))
    except ValueError:
        return DEFAULT_TIMEOUT_SECONDS


def allow_private() -> bool:
    return os.environ.get("DICOMSHARE_WEBHOOK_ALLOW_PRIVATE", "").strip().lower() in (
        "1", "true", "yes", "on")


# -- URLs and signatures ------------------------------------------------------------------
def check_url(url: str, private_ok: bool | None = None, resolve: bool = True) -> str:
    """The URL, if webhooks may call it; InvalidInput with the reason otherwise."""
    url = url.strip()
    if len(url) > 2000:
        raise InvalidInput("the webhook URL is longer than 2000 characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidInput("a webhook URL must be http:// or https://")
    if not parts.hostname:
        raise InvalidInput("the webhook URL has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("a webhook URL may not carry credentials; the signature "
                           "authenticates the sender")
    try:
        _ = parts.port
    except ValueError:
        raise InvalidInput("the webhook URL's port is invalid") from None
    if resolve:
        refused = refused_address(parts.hostname, parts.port or
                                  (443 if parts.scheme.lower() == "https" else 80), private_ok)
        if refused:
            raise InvalidInput(refused)
    return url


def refused_address(host: str, port: int, private_ok: bool | None = None) -> str | None:
    """Why the host may not be called (None: it may): unresolvable, or an address that is
    not public while private addresses are not allowed."""
    private_ok = allow_private() if private_ok is None else private_ok
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return f"the webhook host {host[:100]!r} cannot be resolved"
    if private_ok:
        return None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            return (f"the webhook host {host[:100]!r} has a non-public address ({ip}); "
                    "set DICOMSHARE_WEBHOOK_ALLOW_PRIVATE=1 to allow private receivers")
    return None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC of "<timestamp>." + body."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str,
           max_age: float | None = 300.0) -> bool:
    """What a receiver does (a reference implementation, used by the tests)."""
    if max_age is not None:
        try:
            if abs(time.time() - int(timestamp)) > max_age:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# -- subscriptions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Webhook:
    id: int
    organisation_pk: int
    url: str
    events: tuple[str, ...]
    created_at: Any

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "events": list(self.events),
                "created_at": clock.iso(clock.aware(self.created_at))}


def _clean_events(names: list[str]) -> tuple[str, ...]:
    chosen = {n.strip().lower() for n in names if n.strip()}
    unknown = chosen - set(events.EVENTS)
    if unknown or not chosen:
        raise InvalidInput(f"webhook events are {', '.join(events.EVENTS)}; got "
                           f"{', '.join(sorted(unknown or chosen)) or 'none'}")
    return tuple(e for e in events.EVENTS if e in chosen)


def _webhook(row: Any) -> Webhook:
    return Webhook(row.pk, row.organisation_pk, row.url,
                   tuple(e for e in row.events.split(",") if e), row.created_at)


class Webhooks:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, who: Principal, url: str, event_names: list[str],
               secret: str | None = None) -> tuple[Webhook, str]:
        """A subscription for the caller's organisation, and its secret (shown once)."""
        if who.organisation_pk is None:
            raise InvalidInput("webhooks belong to an organisation; the caller has none")
        url = check_url(url)
        chosen = _clean_events(event_names)
        if secret is None or not secret.strip():
            secret = secrets.token_urlsafe(32)
        elif not 16 <= len(secret) <= 200:
            raise InvalidInput("a webhook secret has 16 to 200 characters")
        with self.engine.begin() as conn:
            count = conn.execute(select(func.count()).select_from(w).where(
                w.c.organisation_pk == who.organisation_pk)).scalar_one()
            if count >= MAX_WEBHOOKS_PER_ORGANISATION:
                raise InvalidInput(f"an organisation has at most "
                                   f"{MAX_WEBHOOKS_PER_ORGANISATION} webhooks")
            pk = conn.execute(insert(w).values(
                organisation_pk=who.organisation_pk, url=url, events=",".join(chosen),
                secret=secret, created_by_user_pk=who.user_pk, created_at=clock.now())
            ).inserted_primary_key[0]  # type: ignore[index]
        events.invalidate()
        return self.get(who, int(pk)), secret

    def listing(self, who: Principal) -> list[Webhook]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(w).where(w.c.organisation_pk == who.organisation_pk)
                                .order_by(w.c.pk)).all()
        return [_webhook(r) for r in rows]

    def get(self, who: Principal, webhook_id: int) -> Webhook:
        """One of the caller's organisation's webhooks; others' are NotFound, like missing
        ones."""
        with self.engine.connect() as conn:
            row = conn.execute(select(w).where(
                w.c.pk == webhook_id, w.c.organisation_pk == who.organisation_pk)).first()
        if row is None:
            raise NotFound(f"no webhook {webhook_id}")
        return _webhook(row)

    def delete(self, who: Principal, webhook_id: int) -> Webhook:
        hook = self.get(who, webhook_id)
        with self.engine.begin() as conn:
            mine = select(d.c.pk).where(d.c.webhook_pk == hook.id)
            conn.execute(delete(a).where(a.c.delivery_pk.in_(mine)))
            conn.execute(delete(d).where(d.c.webhook_pk == hook.id))
            conn.execute(delete(w).where(w.c.pk == hook.id))
        events.invalidate()
        return hook

    # -- the delivery log --------------------------------------------------------------
    def deliveries(self, who: Principal, webhook_id: int, state: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        """The webhook's deliveries, newest first, each with its attempts."""
        hook = self.get(who, webhook_id)
        stmt = select(d).where(d.c.webhook_pk == hook.id).order_by(d.c.pk.desc()).limit(limit)
        if state:
            stmt = stmt.where(d.c.state == state)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
            tries: dict[int, list[dict[str, Any]]] = {}
            if rows:
                for t in conn.execute(select(a).where(a.c.delivery_pk.in_([r.pk for r in rows]))
                                      .order_by(a.c.delivery_pk, a.c.number)):
                    tries.setdefault(t.delivery_pk, []).append({
                        "number": t.number, "started_at": clock.iso(clock.aware(t.started_at)),
                        "duration_ms": t.duration_ms, "status_code": t.status_code,
                        "error": t.error})
        return [_delivery_json(r, tries.get(r.pk, [])) for r in rows]

    def delivery(self, who: Principal, webhook_id: int, delivery_id: int) -> dict[str, Any]:
        hook = self.get(who, webhook_id)
        with self.engine.connect() as conn:
            row = conn.execute(select(d).where(d.c.pk == delivery_id,
                                               d.c.webhook_pk == hook.id)).first()
            if row is None:
                raise NotFound(f"no delivery {delivery_id} of webhook {webhook_id}")
            tries = [{"number": t.number, "started_at": clock.iso(clock.aware(t.started_at)),
                      "duration_ms": t.duration_ms, "status_code": t.status_code,
                      "error": t.error}
                     for t in conn.execute(select(a).where(a.c.delivery_pk == row.pk)
                                           .order_by(a.c.number))]
        return _delivery_json(row, tries)

    def redeliver(self, who: Principal, webhook_id: int, delivery_id: int) -> dict[str, Any]:
        """Send a delivery again now (one more attempt; a failure then ends it again)."""
        hook = self.get(who, webhook_id)
        with self.engine.begin() as conn:
            done = conn.execute(update(d).where(d.c.pk == delivery_id,
                                                d.c.webhook_pk == hook.id)
                                .values(state="pending", next_attempt_at=clock.now()))
        if done.rowcount != 1:
            raise NotFound(f"no delivery {delivery_id} of webhook {webhook_id}")
        events.wake.set()
        return self.delivery(who, webhook_id, delivery_id)


def _delivery_json(row: Any, tries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": row.pk, "event": row.event, "event_id": row.event_id, "state": row.state,
            "attempts": row.attempts, "status_code": row.status_code, "error": row.error,
            "created_at": clock.iso(clock.aware(row.created_at)),
            "last_attempt_at": clock.iso(clock.aware(row.last_attempt_at)),
            "next_attempt_at": clock.iso(clock.aware(row.next_attempt_at)),
            "delivered_at": clock.iso(clock.aware(row.delivered_at)),
            "payload": json.loads(row.body), "attempt_log": tries}


# -- sending -----------------------------------------------------------------------------
def attempt(engine: Engine, delivery_pk: int, client: httpx.Client,
            audit: AuditLog | None = None) -> bool:
    """One attempt at one (claimed) delivery: POST, record the attempt, schedule the next
    one or end the delivery, and write the result to the audit trail. True when
    delivered."""
    with engine.connect() as conn:
        row = conn.execute(select(d.c.body, d.c.event, d.c.attempts, w.c.pk.label("hook"),
                                  w.c.url, w.c.secret, w.c.organisation_pk,
                                  s.organisation.c.name.label("organisation"))
                           .join(w, w.c.pk == d.c.webhook_pk)
                           .join(s.organisation, s.organisation.c.pk == w.c.organisation_pk)
                           .where(d.c.pk == delivery_pk)).first()
    if row is None:  # the webhook was deleted meanwhile
        return False
    body = row.body.encode()
    started = clock.now()
    t0 = time.monotonic()
    status: int | None = None
    error: str | None = None
    kind: str | None = None  # why an attempt failed, in a word (for the audit trail)
    try:
        parts = urlsplit(row.url)
        refused = refused_address(parts.hostname or "", parts.port or
                                  (443 if parts.scheme == "https" else 80))
        if refused:
            raise _Refused(refused)
        stamp = str(int(time.time()))
        response = client.post(row.url, content=body, headers={
            "Content-Type": "application/json", "User-Agent": f"dicomshare/{__version__}",
            "X-Dicomshare-Event": row.event, "X-Dicomshare-Delivery": str(delivery_pk),
            TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(row.secret, stamp, body)})
        status = response.status_code
        if response.is_redirect or 300 <= status < 400:
            kind = "redirect"
            error = (f"redirect ({status}) to {response.headers.get('location', '?')[:200]!r} "
                     "not followed")
        elif not 200 <= status < 300:
            kind, error = "http-status", f"HTTP {status}"
    except _Refused as exc:
        kind, error = "address-refused", str(exc)
    except httpx.TimeoutException as exc:
        kind, error = "timeout", f"timed out ({type(exc).__name__})"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        kind, error = "connection", f"{type(exc).__name__}: {exc}"[:500]
    duration = int((time.monotonic() - t0) * 1000)
    number = row.attempts + 1
    state = _finish(engine, delivery_pk, number, started, duration, status, error)
    if audit is not None:
        _audit(audit, row, delivery_pk, number, state, status, kind)
    return error is None


# What became of a delivery after an attempt -> the audit action that says so.
AUDIT_ACTIONS = {"delivered": "webhook.delivered", "pending": "webhook.attempt-failed",
                 "failed": "webhook.given-up"}


def _audit(audit: AuditLog, row: Any, delivery_pk: int, number: int, state: str,
           status: int | None, kind: str | None) -> None:
    """One record per attempt. Details: event kind, ids, attempt number, HTTP status and a
    one-word reason; never the payload (UIDs), the URL or the receiver's answer. The actor
    is the sender acting for the webhook's organisation, so its admins and auditors find
    the record in their part of the trail."""
    sender = Principal(user=SENDER, organisation=row.organisation, role="system",
                       organisation_pk=row.organisation_pk, kind="job")
    details: dict[str, Any] = {"event": row.event, "webhook_id": row.hook,
                               "delivery_id": delivery_pk, "attempt": number,
                               "status_code": status}
    if kind is not None:
        details["reason"] = kind
    try:  # waited for: a sender thread can afford it, and the record survives a crash
        audit.record(AuditEvent(AUDIT_ACTIONS[state], "success" if state == "delivered"
                                else "failure", sender, details=details), wait=True)
    except Exception:  # the attempt is recorded in webhook_attempt; never break sending
        log.exception("could not audit webhook delivery %s", delivery_pk)


class _Refused(Exception):
    pass


def _finish(engine: Engine, delivery_pk: int, number: int, started: Any, duration: int,
            status: int | None, error: str | None) -> str:
    """Record the attempt; the delivery's state after it (``delivered``, ``pending`` for a
    retry, ``failed`` when given up, also when the webhook was deleted meanwhile)."""
    now = clock.now()
    values: dict[str, Any] = {"attempts": number, "status_code": status, "error": error,
                              "last_attempt_at": started}
    if error is None:
        values |= {"state": "delivered", "delivered_at": now, "next_attempt_at": None}
    else:
        schedule = retry_schedule()
        if number >= 1 + len(schedule):
            values |= {"state": "failed", "next_attempt_at": None}
        else:
            values |= {"state": "pending",
                       "next_attempt_at": now + timedelta(seconds=schedule[number - 1])}
    with engine.begin() as conn:
        if conn.execute(update(d).where(d.c.pk == delivery_pk).values(**values)).rowcount != 1:
            # the webhook was deleted during the attempt: nothing will follow
            return "delivered" if error is None else "failed"
        conn.execute(insert(a).values(delivery_pk=delivery_pk, number=number,
                                      started_at=started, duration_ms=duration,
                                      status_code=status, error=error))
    return str(values["state"])
