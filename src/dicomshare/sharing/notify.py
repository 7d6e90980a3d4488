"""Notifications: rows in ``notification`` (an outbox), read in the API and, when SMTP is
configured, delivered by e-mail. Producers only insert rows, in their own transaction, so
a notification exists exactly when the event it describes was committed.

E-mail delivery runs in one daemon thread per process (:func:`start_mailer`), woken by
:func:`notify` and polling every second otherwise. Several worker processes may run one
each: a row is claimed with ``UPDATE ... SET emailed_at WHERE emailed_at IS NULL`` before
it is sent, so it goes out once. A request that causes a notification never waits for,
nor fails with, the mail server. E-mails carry the notification's subject (which
producers keep free of PHI) and a link to the server, nothing else.
"""

from __future__ import annotations

import json
import logging
import re
import smtplib
import ssl
import threading
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from dicomshare import clock
from dicomshare.access.policy import Principal
from dicomshare.config import Settings
from dicomshare.errors import InvalidInput, NotFound
from dicomshare.storage import schema as s

log = logging.getLogger(__name__)

KINDS = ("share-used", "inbox-new", "inbox-decided", "consult-updated", "upload-received",
         "watch-new-study", "watch-cohort-study")
n = s.notification

# Older queued rows are not mailed (e.g. when SMTP is configured on a server that queued
# notifications for months without it): stale news by e-mail helps nobody.
MAIL_MAX_AGE = timedelta(days=1)
_POLL_SECONDS = 1.0
_wake = threading.Event()
_mailer: Mailer | None = None
_mailer_lock = threading.Lock()


def notify(conn: Connection, organisation_pk: int, user_pk: int | None, kind: str,
           subject: str, details: dict[str, Any]) -> int:
    """Queue a notification for one user (or every user of the organisation when
    ``user_pk`` is None); return its id. ``details`` must hold no PHI the recipient may
    not see."""
    if kind not in KINDS:
        raise ValueError(f"unknown notification kind {kind!r}")
    result = conn.execute(insert(s.notification).values(
        organisation_pk=organisation_pk, user_pk=user_pk, kind=kind, subject=subject[:500],
        details=json.dumps(details, sort_keys=True), created_at=clock.now()))
    _wake.set()  # the mailer of this process, if any, looks soon (it polls anyway)
    return int(result.inserted_primary_key[0])  # type: ignore[index]


# -- reading them in the API ------------------------------------------------------------------
def _mine(who: Principal) -> Any:
    parts = []
    if who.user_pk is not None:
        parts.append(n.c.user_pk == who.user_pk)
    if who.organisation_pk is not None:
        parts.append(and_(n.c.organisation_pk == who.organisation_pk, n.c.user_pk.is_(None)))
    return or_(*parts) if parts else n.c.pk.is_(None)


def _as_json(row: Any) -> dict[str, Any]:
    return {"id": row.pk, "kind": row.kind, "subject": row.subject,
            "details": json.loads(row.details), "for_organisation": row.user_pk is None,
            "created_at": clock.iso(clock.aware(row.created_at)),
            "read_at": clock.iso(clock.aware(row.read_at)), "read": row.read_at is not None}


_COLUMNS = (n.c.pk, n.c.kind, n.c.subject, n.c.details, n.c.user_pk, n.c.created_at,
            n.c.read_at)


def list_notifications(engine: Engine, who: Principal, unread: bool = False,
                       kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The caller's notifications (its own and its organisation's), newest first."""
    stmt = select(*_COLUMNS).where(_mine(who)).order_by(n.c.pk.desc()).limit(limit)
    if unread:
        stmt = stmt.where(n.c.read_at.is_(None))
    if kind:
        stmt = stmt.where(n.c.kind == kind)
    with engine.connect() as conn:
        return [_as_json(r) for r in conn.execute(stmt)]


def mark_read(engine: Engine, who: Principal, notification_id: int) -> dict[str, Any]:
    """Mark one of the caller's notifications read (an organisation's row is read for all
    its users). Others' answer NotFound, like missing ones."""
    with engine.begin() as conn:
        conn.execute(update(n).where(n.c.pk == notification_id, _mine(who),
                                     n.c.read_at.is_(None)).values(read_at=clock.now()))
        row = conn.execute(select(*_COLUMNS).where(n.c.pk == notification_id,
                                                   _mine(who))).first()
    if row is None:
        raise NotFound(f"no notification {notification_id}")
    return _as_json(row)


# -- users' e-mail addresses ------------------------------------------------------------------
_EMAIL = re.compile(r"^[^@\s<>\"',;]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def clean_email(text: str | None) -> str | None:
    """A plausible address (local@domain), or None for an empty value."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if len(text) > 320 or not _EMAIL.match(text) or ".." in text.split("@")[1]:
        raise InvalidInput(f"{text[:100]!r} is not an e-mail address (name@example.org)")
    return text


def set_email(engine: Engine, user: str, email: str | None) -> None:
    """Set or clear (None, "") a user's e-mail address."""
    email = clean_email(email)
    with engine.begin() as conn:
        done = conn.execute(update(s.user).where(s.user.c.name == user).values(email=email))
        if done.rowcount == 0:
            raise NotFound(f"no user {user!r}")


def emails(engine: Engine, organisation_pk: int | None = None) -> dict[str, str | None]:
    """User name -> e-mail address (None: none), of one organisation or all."""
    stmt = select(s.user.c.name, s.user.c.email)
    if organisation_pk is not None:
        stmt = stmt.where(s.user.c.organisation_pk == organisation_pk)
    with engine.connect() as conn:
        return {r[0]: r[1] for r in conn.execute(stmt)}


# -- e-mail delivery -------------------------------------------------------------------------
def start_mailer(engine: Engine, settings: Settings) -> None:
    """Start this process's mailer once, when SMTP is configured. Cheap to call often."""
    global _mailer
    if not settings.smtp_host or _mailer is not None:
        return
    with _mailer_lock:
        if _mailer is None:
            _mailer = Mailer(engine, settings)
            _mailer.start()


class Mailer(threading.Thread):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        super().__init__(name="dicomshare-mailer", daemon=True)
        self.engine = engine
        self.settings = settings

    def run(self) -> None:
        while True:
            _wake.wait(_POLL_SECONDS)
            _wake.clear()
            try:
                while deliver_pending(self.engine, self.settings) > 0:
                    pass
            except Exception:  # the database is away: try again on the next round
                log.exception("e-mail delivery failed")


def _recipients(conn: Connection, organisation_pk: int, user_pk: int | None) -> list[str]:
    u = s.user
    stmt = select(u.c.email).where(u.c.email.is_not(None), u.c.disabled_at.is_(None))
    if user_pk is not None:
        stmt = stmt.where(u.c.pk == user_pk)
    else:
        stmt = stmt.where(u.c.organisation_pk == organisation_pk)
    return sorted({r[0] for r in conn.execute(stmt) if r[0]})


def deliver_pending(engine: Engine, settings: Settings, batch: int = 20) -> int:
    """Claim and send up to ``batch`` queued notifications; return how many were claimed."""
    since = clock.now() - MAIL_MAX_AGE
    with engine.connect() as conn:
        rows = conn.execute(select(n.c.pk, n.c.organisation_pk, n.c.user_pk, n.c.subject)
                            .where(n.c.emailed_at.is_(None), n.c.created_at > since)
                            .order_by(n.c.pk).limit(batch)).all()
    claimed = 0
    for row in rows:
        with engine.begin() as conn:
            done = conn.execute(update(n).where(n.c.pk == row.pk, n.c.emailed_at.is_(None))
                                .values(emailed_at=clock.now()))
            if done.rowcount != 1:
                continue  # another process took it
            recipients = _recipients(conn, row.organisation_pk, row.user_pk)
        claimed += 1
        error = None
        if not recipients:
            error = "no recipient has an e-mail address"
        else:
            try:
                _send(settings, row.subject, recipients)
            except (smtplib.SMTPException, OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:1000]
                log.warning("could not e-mail notification %s: %s", row.pk, error)
        if error is not None:
            with engine.begin() as conn:
                conn.execute(update(n).where(n.c.pk == row.pk).values(email_error=error))
    return claimed


def server_link(settings: Settings) -> str:
    if settings.public_url:
        return settings.public_url.rstrip("/") + "/"
    return f"http://{settings.http_host}:{settings.http_port}/"


def _send(settings: Settings, subject: str, recipients: list[str]) -> None:
    """One message per recipient (nobody learns the others' addresses), one connection."""
    clean = " ".join(subject.split())[:200]
    body = (f"{clean}\n\nSign in to dicomshare to see the details:\n{server_link(settings)}\n\n"
            "This message was sent automatically; it holds no patient information.\n")
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        for address in recipients:
            msg = EmailMessage()
            msg["From"] = settings.smtp_from
            msg["To"] = address
            msg["Subject"] = f"[dicomshare] {clean}"
            msg["Date"] = formatdate(localtime=False)
            msg["Message-ID"] = make_msgid(domain=settings.smtp_from.rpartition("@")[2] or None)
            msg["Auto-Submitted"] = "auto-generated"
            msg.set_content(body)
            smtp.send_message(msg)
